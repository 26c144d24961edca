"""The run settings as command-line options of ``fedlora simulate`` and ``fedlora coordinator``."""

from __future__ import annotations

import argparse
from typing import Any

from fedlora.config.run_config import SCHEMA
from fedlora.config.setting import GROUPS, UNSET, Flag, Setting, spoken

CHOICES = "{choices}"  # in a help text; left for the CLI to fill where the choices are not static


def add_run_options(parser: argparse.ArgumentParser, command: str) -> dict[str, Any]:
    """One argument group per settings group, with the settings that are flags of
    ``command``; returns the groups by name, for the command to add its own options to."""
    groups: dict[str, Any] = {}
    for group in GROUPS:
        flagged = [(s, f) for s in SCHEMA if s.group == group and (f := s.flag(command)) is not None]
        if not flagged:
            continue
        groups[group.name] = parser.add_argument_group(group.title)
        for s, flag in flagged:
            groups[group.name].add_argument(
                flag.name, dest=s.name, help=help_text(s, flag).replace("%", "%%"), **_kind(s, flag)
            )
    return groups


def _kind(s: Setting, flag: Flag) -> dict[str, Any]:
    """How argparse reads the value: an on/off setting is ``--x``/``--no-x``; unset (None)
    unless given, so that a config file's value stands."""
    if s.kind is bool:
        return {"action": argparse.BooleanOptionalAction, "default": None}
    return {
        "type": str if s.is_tuple else s.kind,  # a list comes comma-separated
        "metavar": flag.name.lstrip("-").replace("-", "_").upper(),
    }


def flag_values(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """The settings given on the command line, by setting name."""
    return {
        s.name: getattr(args, s.name) for s in SCHEMA if s.flag(command) and getattr(args, s.name, None) is not None
    }


def given_flags(args: argparse.Namespace, command: str) -> list[str]:
    """The setting flags given on the command line: ``--min-clients``, not ``clients``."""
    given = flag_values(args, command)
    return [s.flag(command).name for s in SCHEMA if s.name in given]


def help_text(s: Setting, flag: Flag | None = None) -> str:
    """The help of ``s`` (or of its ``flag``), its choices filled in, ending with its default."""
    text = flag.help if flag is not None and flag.help else s.help
    if s.choices:
        text = text.replace(CHOICES, spoken(s.choices)) if CHOICES in text else f"{text}: {spoken(s.choices)}"
    return f"{text} ({default_text(s)})"


def default_text(s: Setting) -> str:
    """``default 3e-3; fedsb 5e-3; causal-lm 5e-4``, ``default 3; 0: off``, ``default: off``."""
    if s.shown and s.default in (None, "", ()) and s.causal_lm is UNSET:
        return f"default: {s.shown}"
    text = f"default {show(s.default)}"
    if s.by_strategy:
        text += "; " + ", ".join(f"{name} {show(value)}" for name, value in s.by_strategy)
    if s.causal_lm is not UNSET:
        text += f"; causal-lm {s.shown if s.causal_lm is None and s.shown else show(s.causal_lm)}"
    if s.under_dp is not UNSET:
        text += f"; under DP {show(s.under_dp)}"
    if s.zero:
        text += f": {s.zero}" if s.default == 0 else f"; 0: {s.zero}"
    return text


def show(value: Any) -> str:
    """A default as a user would type it: 3e-3, query,value, none, off."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    if isinstance(value, float) and value and abs(value) < 1e-2:
        mantissa, exponent = f"{value:e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def options_table(command: str = "simulate") -> str:
    """The README's table of ``command``'s run options, one row per group, each with its default."""
    rows = ["| group | options (default) |", "|---|---|"]
    for group in GROUPS:
        cells = [
            f"`{flag.name}` ({default_text(s).removeprefix('default').lstrip(': ') or 'none'})"
            for s in SCHEMA
            if s.group == group and (flag := s.flag(command)) is not None
        ]
        if cells:
            rows.append(f"| {group.title} | {', '.join(cells)} |")
    return "\n".join(rows)
