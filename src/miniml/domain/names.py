"""Validation of names that end up in URLs, object keys and MLflow model names."""

from __future__ import annotations

import re

from miniml.errors import InvalidInput

SLUG_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# Dataset and model names: letters, digits, dot, dash, underscore; no separators or "..".
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_slug(value: str, *, what: str) -> str:
    if not SLUG_RE.fullmatch(value):
        raise InvalidInput(
            f"{what} name {value!r} is not valid: use 1-63 lowercase letters, digits and dashes, "
            "starting and ending with a letter or digit (e.g. 'demo' or 'fraud-2024')."
        )
    return value


def check_name(value: str, *, what: str) -> str:
    if not NAME_RE.fullmatch(value) or ".." in value:
        raise InvalidInput(
            f"{what} name {value!r} is not valid: use 1-128 letters, digits, '.', '-' or '_', starting "
            "with a letter or digit; no path separators, '..', spaces or control characters."
        )
    return value
