"""What is known about one run setting: its group, help, bounds, choices and flags."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SIMULATE = "simulate"
COORDINATOR = "coordinator"
COMMANDS = (SIMULATE, COORDINATOR)


@dataclass(frozen=True)
class Group:
    name: str  # also the name of its table in a config file: [privacy]
    title: str  # the heading of its options in --help


RUN = Group("run", "run folder and tracking")
MODEL = Group("model", "model and adapters")
DATA = Group("data", "data")
FEDERATION = Group("federation", "federation")
TRAINING = Group("training", "local training")
HARDWARE = Group("hardware", "hardware: GPUs, quantized base, memory")
EVALUATION = Group("evaluation", "evaluation")
PRIVACY = Group("privacy", "differential privacy (sample-level DP-SGD on every client)")
WIRE = Group("wire", "wire format")
ROBUSTNESS = Group("robustness", "defences against hostile clients")
ATTACK = Group("attack", "simulated attack (config file [attack] table, fedlora simulate only)")
GROUPS = (RUN, MODEL, DATA, FEDERATION, TRAINING, HARDWARE, EVALUATION, PRIVACY, WIRE, ROBUSTNESS, ATTACK)


@dataclass(frozen=True)
class Range:
    """The values a number may take; a bound is left out (``high`` None) or open."""

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        if value < self.low or (self.low_open and value == self.low):
            return False
        return self.high is None or value < self.high or (not self.high_open and value == self.high)

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


COUNT = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
SHARE = Range(0, 1, low_open=True)
STRICT_SHARE = Range(0, 1, low_open=True, high_open=True)
UNIT = Range(0, 1)
BELOW_HALF = Range(0, 0.5, low_open=True, high_open=True)


@dataclass(frozen=True)
class Flag:
    command: str
    name: str  # --min-clients
    help: str = ""  # the setting's own help when empty


TOML_ONLY: tuple[Flag, ...] = ()


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


@dataclass(frozen=True)
class Setting:
    """One user setting. Declared once, as a RunConfig field with ``setting(...)``; bind()
    adds the field's name, type and default. From it come the CLI options, the TOML keys,
    the type coercion and the checks."""

    group: Group
    help: str  # "{choices}" stands for the choices, spelled "a, b or c"
    range: Range | None = None  # of each item, for a tuple
    choices: tuple[str, ...] = ()
    causal_lm: Any = UNSET  # the default under --task causal-lm, where it differs
    by_strategy: tuple[tuple[str, Any], ...] = ()  # (strategy, default) where a strategy's differs
    under_dp: Any = UNSET  # the default of a run under DP (--dp-epsilon), where it differs
    shown: str = ""  # the default in words, where it is unset (None or "") and the run picks
    zero: str = ""  # what 0 means, where it means something special (off, all)
    nonempty: str = ""  # what a tuple must name at least one of
    flags: tuple[Flag, ...] | None = None  # None: --the-name for both commands
    table_key: str = ""  # its key in its group's config table when not its name
    simulation_only: bool = False  # a coordinator refuses it when not at its default
    deployed: str = ""  # simulation_only: what takes its place in a deployment, for the refusal
    server_only: bool = False  # the coordinator's own (where it reports to): never sent to clients
    name: str = ""
    default: Any = None
    kind: type = str  # int, float, str or bool (an on/off flag); a tuple's item type
    is_tuple: bool = False
    optional: bool = False  # may be None

    @property
    def key(self) -> str:
        """Its key in its group's table."""
        return self.table_key or self.name

    def flag(self, command: str) -> Flag | None:
        return next((f for f in self.flags or () if f.command == command), None)

    def label(self, command: str | None = None) -> str:
        """How errors name it: the command's flag, else its place in a config file."""
        flag = self.flag(command or SIMULATE) or next(iter(self.flags or ()), None)
        if flag is not None:
            return flag.name
        return f"[{self.group.name}] {self.key}" if self.table_key else self.name


def setting(default: Any, group: Group, help: str, **meta: Any) -> Any:
    """A RunConfig field carrying its Setting."""
    return dataclasses.field(default=default, metadata={"setting": Setting(group, help, **meta)})


def bind(cls: type) -> tuple[Setting, ...]:
    """The settings of a dataclass declared with ``setting(...)``, completed from its fields."""
    hints = typing.get_type_hints(cls)
    return tuple(_bind(f, hints[f.name]) for f in dataclasses.fields(cls))


def _bind(field: dataclasses.Field, hint: Any) -> Setting:
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional:
        hint = next(a for a in args if a is not type(None))
    is_tuple = typing.get_origin(hint) is tuple
    flags = field.metadata["setting"].flags
    if flags is None:
        flags = tuple(Flag(c, "--" + field.name.replace("_", "-")) for c in COMMANDS)
    return dataclasses.replace(
        field.metadata["setting"],
        name=field.name,
        default=field.default,
        flags=flags,
        kind=typing.get_args(hint)[0] if is_tuple else hint,
        is_tuple=is_tuple,
        optional=optional,
    )


def spoken(items: Sequence[str], last: str = "or") -> str:
    """``a, b or c``."""
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {last} {items[-1]}"
