"""Run configuration: the settings schema, config files, command-line options, checks."""

from fedlora.config.choices import (
    ATTACKS,
    PARTITIONS,
    POOLINGS,
    QUANTIZE,
    ROBUST_AGGREGATES,
    ROBUST_MODES,
    TASKS,
    TRACKERS,
    WIRE_DTYPES,
)
from fedlora.config.flags import add_run_options, flag_values, given_flags, help_text
from fedlora.config.run_config import BY_NAME, CAUSAL_LM_DEFAULTS, SCHEMA, RunConfig
from fedlora.config.setting import COORDINATOR, GROUPS, SIMULATE, Flag, Group, Range, Setting
from fedlora.config.toml import load_toml, settings_from_toml

__all__ = [
    "ATTACKS",
    "BY_NAME",
    "CAUSAL_LM_DEFAULTS",
    "COORDINATOR",
    "GROUPS",
    "PARTITIONS",
    "POOLINGS",
    "QUANTIZE",
    "ROBUST_AGGREGATES",
    "ROBUST_MODES",
    "SCHEMA",
    "SIMULATE",
    "TASKS",
    "TRACKERS",
    "WIRE_DTYPES",
    "Flag",
    "Group",
    "Range",
    "RunConfig",
    "Setting",
    "add_run_options",
    "flag_values",
    "given_flags",
    "help_text",
    "load_toml",
    "settings_from_toml",
]
