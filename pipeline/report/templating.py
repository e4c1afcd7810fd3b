"""The Jinja2 environment of the report: templates are package data under `templates/`.

Autoescape is on for every template, so every value a section hands over is text; only the
rendered sections themselves (already escaped) are passed on as markup.
"""
from __future__ import annotations

from functools import lru_cache

import jinja2
from markupsafe import Markup

__all__ = ["environment", "render"]


@lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    """Built on first use (nothing happens at import)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("pipeline.report", "templates"),
        autoescape=True, undefined=jinja2.StrictUndefined,
        trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def render(template: str, **context: object) -> Markup:
    return Markup(environment().get_template(template).render(**context))
