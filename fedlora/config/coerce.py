"""A value from a config file, a flag or a saved config, as its setting's type."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedlora.config.setting import Setting
from fedlora.errors import UserError


def coerce(s: Setting, key: str, value: Any) -> Any:
    """``value`` as ``s``'s type; a mismatch is a user error naming ``key``."""
    try:
        if s.is_tuple:
            return _items(value, _SCALARS[s.kind])
        if value is None and s.optional:
            return None
        return _SCALARS[s.kind](value)
    except (TypeError, ValueError):
        raise UserError(f"config key {key!r} has a value of the wrong type: {value!r}") from None


def _int(value: Any) -> int:
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise TypeError
    return int(value)


def _float(value: Any) -> float:
    if isinstance(value, bool):
        raise TypeError
    return float(value)


def _str(value: Any) -> str:
    if not isinstance(value, (str, Path)):
        raise TypeError
    return str(value)


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):  # TOML's true/false, a flag, a saved config; not "yes" or 1
        raise TypeError
    return value


_SCALARS: dict[type, Callable[[Any], Any]] = {int: _int, float: _float, str: _str, bool: _bool}


def _items(value: Any, item: Callable[[Any], Any]) -> tuple:
    """A list, or a comma-separated string as flags give it."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)):
        raise TypeError
    if item is _int and any(isinstance(v, str) and not v.isdigit() for v in value):
        raise ValueError  # "-1" or "1.5" in a list of ranks or partition ids
    return tuple(item(v) for v in value)
