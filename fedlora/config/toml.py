"""Config files: the settings as top-level keys, under [fedlora], or in their group's table."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedlora.config.run_config import BY_NAME, SCHEMA
from fedlora.config.setting import GROUPS, spoken
from fedlora.errors import UserError

# group name -> {key in its table: setting name}; [attack] says clients, not attack_clients
TABLES: dict[str, dict[str, str]] = {g.name: {s.key: s.name for s in SCHEMA if s.group == g} for g in GROUPS}
MOVED = {"poison_clients", "poison_scale"}


def load_toml(path: str | Path) -> dict[str, Any]:
    """The settings a TOML config file sets, by setting name (not yet type-checked)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"malformed config {path}: {exc}") from None
    return settings_from_toml(data)


def settings_from_toml(data: Mapping[str, Any], top: bool = True) -> dict[str, Any]:
    """Flatten a parsed config: ``[fedlora]`` (at the top only) and group tables such as
    ``[privacy]`` or ``[attack]`` into setting names; any other key passes as it is."""
    found: dict[str, Any] = {}
    for key, value in data.items():
        if top and key == "fedlora" and isinstance(value, dict):
            pairs = settings_from_toml(value, top=False)
        elif key in TABLES and (isinstance(value, dict) or key not in BY_NAME):  # model = "dir" is a setting
            pairs = _table(key, value)
        elif key in MOVED:
            raise UserError(f"config key {key!r} moved: use an [attack] table with clients, kind and scale")
        else:
            pairs = {key: value}
        for name, v in pairs.items():
            if name in found:
                raise UserError(f"config key {name!r} is set twice")
            found[name] = v
    return found


def _table(group: str, table: Any) -> dict[str, Any]:
    keys = TABLES[group]
    if not isinstance(table, dict):
        raise UserError(f"{group} must be a table: [{group}] with {spoken(list(keys), 'and')}")
    unknown = sorted(set(table) - set(keys))
    if unknown:
        raise UserError(f"unknown key {unknown[0]!r} in [{group}]: use {spoken(list(keys), 'and')}")
    return {keys[k]: v for k, v in table.items()}
