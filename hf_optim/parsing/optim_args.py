"""One typed parser for ``optim_args``: JSON or ``k=v,...``, checked against a signature.

Accepts ``'{"betas": [0.9, 0.99]}'``, ``"betas=(0.9,0.99),eps=1e-6,amsgrad=true"``
or a mapping. Values are coerced to the type of the hyperparameter's default
(so YAML's ``"1e-5"`` becomes a float and ``"False"`` becomes ``False``, never
``bool("False")``); an unknown key is an error that lists the valid ones.
"""

from __future__ import annotations

import ast
import difflib
import json
from collections.abc import Mapping
from typing import Any

from .values import as_bool, as_int, as_number


def parse_optim_args(text: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Parse ``optim_args`` into a dict of Python values (not yet type-checked)."""
    if text is None:
        return {}
    if isinstance(text, Mapping):
        return dict(text)
    text = text.strip()
    if not text:
        return {}
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"optim_args is not valid JSON: {err}") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"optim_args JSON must be an object, got {type(parsed).__name__}")
        return parsed
    out: dict[str, Any] = {}
    for item in _split_top_level(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"optim_args: expected key=value, got {item.strip()!r}")
        if key in out:
            raise ValueError(f"optim_args: key {key!r} given twice")
        out[key] = _literal(value.strip())
    return out


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: ``betas=(0.9,0.99),eps=1e-8``."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item for item in items if item.strip()]


def _literal(value: str) -> Any:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value  # a bare word such as a codec name


def coerce_optim_args(
    values: Mapping[str, Any], defaults: Mapping[str, Any], owner: str, source: str = "optim_args"
) -> dict[str, Any]:
    """Check ``values`` against ``defaults`` (the signature) and coerce each type.

    ``source`` names where the values came from in error messages (``optim_args``,
    or ``create_optimizer`` for keyword arguments).
    """
    out = {}
    for key, value in values.items():
        if key not in defaults:
            hint = difflib.get_close_matches(key, list(defaults), n=1)
            raise ValueError(
                f"{source}: unknown key {key!r} for {owner}"
                + (f" (did you mean {hint[0]!r}?)" if hint else "")
                + f"; valid keys: {', '.join(sorted(defaults))}"
            )
        out[key] = _coerce(key, value, defaults[key], owner, source)
    return out


def _coerce(key: str, value: Any, default: Any, owner: str, source: str = "optim_args") -> Any:
    def fail(expected: str) -> ValueError:
        return ValueError(f"{source}: {key}={value!r} for {owner} is not {expected}")

    if isinstance(default, bool):
        flag = as_bool(value)
        if flag is None:
            raise fail("a boolean (true/false)")
        return flag
    if isinstance(default, tuple):
        if isinstance(value, str):
            value = _literal(value)
        if not isinstance(value, list | tuple) or len(value) != len(default):
            raise fail(f"a tuple of {len(default)} numbers")
        return tuple(_coerce(key, v, d, owner, source) for v, d in zip(value, default, strict=True))
    if isinstance(default, int):
        integer = as_int(value)
        if integer is None:
            raise fail("an integer")
        return integer
    if isinstance(default, float) or default is None:
        number = as_number(value)
        if number is None:
            if default is None:  # no default to type it: taken as given (e.g. a codec name)
                return value
            raise fail("a number")
        return number
    if isinstance(default, str):
        if not isinstance(value, str):
            raise fail("a string")
        return value
    return value
