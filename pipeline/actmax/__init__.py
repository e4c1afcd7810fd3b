"""Activation maximization: objectives -> optimised input images (`optimize`)."""
