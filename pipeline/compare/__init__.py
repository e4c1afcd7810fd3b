"""Comparison of two networks on the same images: layer similarity, matched channels, selectivity.

Pure compute above `pipeline.stats` (no Ray, no file I/O but the worker body's decode):
`cka` the unbiased minibatch HSIC / linear CKA grid, `pearson` the channel cross sums and their
matching, `selectivity` the class-selectivity index, `result` the per-shard collection of all
three with its minibatch rule, `runner` the two truncated forwards that feed it. `jobs.compare`
shards the images and merges the states; docs/compare.md defines every estimator.
"""
