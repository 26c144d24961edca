"""The settings schema: --help names each real default, config keys round-trip, and an
out-of-bounds value gives one line that names its flag."""

import argparse
import json
import math
import re
from pathlib import Path

import pytest

from fedlora.cli import build_parser, main, run_config_from_args
from fedlora.config import BY_NAME, COORDINATOR, SCHEMA, SIMULATE, RunConfig, load_toml
from fedlora.errors import UserError

# "(default 3e-3; ffa 1e-2, fedsb 1e-2; causal-lm 5e-4; under DP 1e-3)", "(default 3; 0: off)",
# "(default 0: all)", "(default: off)"
DEFAULT = re.compile(
    r"\(default(?:: (?P<shown>[^()]+)|"
    r" (?P<value>[^;:()]+)(?:; (?P<strategies>[a-z]+ [^;:(), ]+(?:, [a-z]+ [^;:(), ]+)*))?"
    r"(?:; causal-lm (?P<causal>[^;:()]+))?(?:; under DP (?P<dp>[^;:()]+))?(?:(?:: |; 0: )[^()]+)?)\)$"
)
ROOT = Path(__file__).resolve().parents[1]


def command_parser(command: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def causal_lm() -> RunConfig:
    cfg = RunConfig()
    cfg.update({"task": "causal-lm"})
    return cfg


def parse_default(text: str, name: str):
    s = BY_NAME[name]
    if s.kind is bool:
        return {"on": True, "off": False}[text]
    if s.is_tuple:
        return () if text == "none" else tuple(s.kind(v) for v in text.split(","))
    return s.kind(text)


@pytest.mark.parametrize("command", [SIMULATE, COORDINATOR])
def test_every_option_help_names_the_real_default(command):
    actions = {a.dest: a for a in command_parser(command)._actions if a.dest in BY_NAME}
    assert set(actions) == {s.name for s in SCHEMA if s.flag(command)}
    plain, causal = RunConfig(), causal_lm()
    for name, action in actions.items():
        m = DEFAULT.search(action.help)
        assert m, f"{action.option_strings[0]}: no default at the end of {action.help!r}"
        if m["shown"]:  # a default in words stands for an unset value the run fills in
            assert getattr(plain, name) in (None, "", ()), action.help
            continue
        assert parse_default(m["value"], name) == getattr(plain, name), action.help
        if name == "task":
            continue
        if m["causal"] and m["causal"] == BY_NAME[name].shown:
            expected = None  # unset under causal-lm: the run picks (the head's rate: --lr)
        else:
            expected = parse_default(m["causal"], name) if m["causal"] else getattr(plain, name)
        assert expected == getattr(causal, name), f"{action.help!r}: causal-lm default {getattr(causal, name)!r}"
        check_situational_defaults(name, m, action.help)


def configured(**values) -> RunConfig:
    cfg = RunConfig()
    cfg.update(values)
    return cfg


def check_situational_defaults(name: str, m: re.Match, help_text: str) -> None:
    """The strategy and DP defaults that --help names are the ones a run gets."""
    from fedlora.strategies import STRATEGY_NAMES

    named = dict(item.split(" ") for item in m["strategies"].split(", ")) if m["strategies"] else {}
    assert set(named) <= set(STRATEGY_NAMES), help_text
    if name in ("strategy", "dp_epsilon"):
        return
    for strategy in STRATEGY_NAMES:
        expected = parse_default(named.get(strategy, m["value"]), name)
        assert getattr(configured(strategy=strategy), name) == expected, f"{help_text!r} under {strategy}"
    if m["dp"]:
        assert getattr(configured(dp_epsilon=3.0), name) == parse_default(m["dp"], name), help_text
    else:
        assert getattr(configured(dp_epsilon=3.0), name) == getattr(RunConfig(), name), help_text


def test_the_coordinators_clients_flag_is_min_clients():
    actions = {a.dest: a for a in command_parser(COORDINATOR)._actions}
    assert actions["clients"].option_strings == ["--min-clients"]
    assert actions["clients"].help == "clients to wait for before round 1 (default 4)"
    assert "attack_clients" not in actions and "eval_batch_size" not in actions


def test_lr_help_names_both_task_defaults_and_strategies_come_from_the_registry():
    from fedlora.strategies import STRATEGY_NAMES

    lr_help = command_parser(SIMULATE)._option_string_actions["--lr"].help
    assert lr_help.endswith("(default 3e-3; ffa 0.01, flora 6e-3, fedsb 0.01; causal-lm 5e-4; under DP 1e-3)"), lr_help
    text = command_parser(SIMULATE).format_help()
    assert ", ".join(STRATEGY_NAMES[:-1]) in " ".join(text.split())


def test_causal_lm_changes_only_the_settings_left_at_their_defaults():
    args = build_parser().parse_args(["simulate", "--task", "causal-lm", "--lr", "0.01"])
    cfg = run_config_from_args(args)
    assert (cfg.lr, cfg.max_length, cfg.target_modules, cfg.head_modules) == (0.01, 256, ("q_proj", "v_proj"), ())
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def non_default_config() -> RunConfig:
    cfg = RunConfig()
    cfg.update(
        {
            "task": "causal-lm",
            "strategy": "flora",
            "ranks": [16, 8],
            "dp_epsilon": 2.0,
            "dp_delta": 1e-6,
            "head_modules": ["lm_head"],
            "out": "runs/x",
            "prompt_column": "q",
            "attack_clients": [1],
            "attack_kind": "nan",
            "eval_batch_size": 8,
            "robust_mode": "reject",
            "init_dtype": "bf16",
            "gpus_per_client": 0.5,
            "quantize": "8bit",
            "gradient_checkpointing": True,
        }
    )
    return cfg


def toml_lines(values: dict) -> list[str]:
    return [f"{k} = {json.dumps(v)}" for k, v in values.items() if v is not None]


def test_to_dict_round_trips():
    for cfg in (RunConfig(), causal_lm(), non_default_config()):
        assert RunConfig.from_dict(cfg.to_dict()) == cfg
        assert json.loads(json.dumps(cfg.to_dict())) == cfg.to_dict()


def test_toml_keys_round_trip_flat_wrapped_and_in_group_tables(tmp_path):
    cfg = non_default_config()
    values = cfg.to_dict()
    flat = tmp_path / "flat.toml"
    flat.write_text("\n".join(toml_lines(values)) + "\n")
    wrapped = tmp_path / "wrapped.toml"
    wrapped.write_text("\n".join(["[fedlora]", *toml_lines(values)]) + "\n")
    grouped = tmp_path / "grouped.toml"
    lines = []
    for group in dict.fromkeys(s.group for s in SCHEMA):
        lines.append(f"[{group.name}]")
        lines += toml_lines({s.key: values[s.name] for s in SCHEMA if s.group == group})
    grouped.write_text("\n".join(lines) + "\n")
    for path in (flat, wrapped, grouped):
        assert RunConfig.from_dict(load_toml(path)) == cfg, path.name


def test_the_attack_table_sits_beside_the_fedlora_table(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        '[fedlora]\nrounds = 2\nmodel = "m"\n\n[attack]\nclients = [1]\nkind = "nan"\n\n[privacy]\ndp_epsilon = 3.0\n'
    )
    assert load_toml(path) == {
        "rounds": 2,
        "model": "m",
        "attack_clients": [1],
        "attack_kind": "nan",
        "dp_epsilon": 3.0,
    }


@pytest.mark.parametrize(
    "text,needle",
    [
        (
            "[privacy]\nepsilon = 2.0\n",
            "unknown key 'epsilon' in [privacy]: use dp_epsilon, dp_delta, dp_clip and dp_accountant",
        ),
        ("rounds = 2\n[federation]\nrounds = 3\n", "config key 'rounds' is set twice"),
        ("privacy = 2\n", "privacy must be a table"),
    ],
)
def test_bad_group_tables(text, needle, tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(UserError, match=re.escape(needle)):
        load_toml(path)


def test_the_default_config_file_spells_out_the_defaults():
    assert RunConfig.from_dict(load_toml(ROOT / "simulations" / "configs" / "default.toml")) == RunConfig()


def out_of_bounds(name: str) -> str:
    r = BY_NAME[name].range
    if r.high is not None:
        return str(r.high + 1)
    return str(r.low if r.low_open else r.low - 1)


BOUNDED = [s.name for s in SCHEMA if s.range is not None and s.flag(SIMULATE)]


@pytest.mark.parametrize("name", BOUNDED)
def test_a_flag_out_of_bounds_is_one_line_naming_the_flag(name, capsys, tmp_path):
    flag = BY_NAME[name].flag(SIMULATE).name
    assert main(["simulate", "--out", str(tmp_path / "o"), flag, out_of_bounds(name)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"fedlora: error: {flag} must "), err
    assert not (tmp_path / "o").exists()


def test_the_coordinator_names_its_own_flag(capsys, tmp_path):
    base = ["coordinator", "--address", "127.0.0.1:1", "--insecure", "--out", str(tmp_path / "o")]
    assert main([*base, "--min-clients", "0"]) == 2
    assert capsys.readouterr().err.strip() == "fedlora: error: --min-clients must be >= 1, got 0"
    assert main([*base, "--resume", "--min-clients", "3"]) == 2
    assert capsys.readouterr().err.strip().endswith("drop --min-clients")


@pytest.mark.parametrize(
    "values,message",
    [
        ({"eval_batch_size": 0}, "eval_batch_size must be >= 1, got 0"),
        ({"attack_scale": math.inf}, "[attack] scale must be a finite number, got inf"),
        ({"ranks": [4, 0]}, "--ranks must all be >= 1, got [4, 0]"),
        ({"target_modules": []}, "--target-modules must name at least one module"),
        ({"robust_mode": "drop"}, "unknown robust mode 'drop': choose from clip, reject"),
        ({"eval_max_examples": -1}, "--eval-max-examples must be >= 0 (0: all), got -1"),
        ({"fraction": 0.0}, "--fraction must be in (0, 1], got 0.0"),
    ],
)
def test_file_settings_out_of_bounds(values, message):
    with pytest.raises(UserError) as err:
        RunConfig.from_dict(values).validate()
    assert str(err.value) == message


def test_unset_settings_pass_and_wrong_types_are_refused():
    RunConfig(init_dtype="", dp_epsilon=None, model=None).validate()
    for values in ({"rounds": True}, {"rounds": 2.5}, {"ranks": ["-1"]}, {"target_modules": "a,b", "model": 3}):
        with pytest.raises(UserError, match="wrong type"):
            RunConfig.from_dict(values)


def test_strategy_defaults_follow_the_strategy_but_never_override_a_given_value():
    cfg = configured(strategy="fedsb")
    assert (cfg.lr, cfg.init_dtype, cfg.rank) == (1e-2, "bf16", 20)
    cfg.update({"strategy": "fedavg"})  # a later file or flag changes the strategy: defaults follow
    assert (cfg.lr, cfg.init_dtype, cfg.rank) == (3e-3, "", 16)
    given = configured(strategy="fedsb", lr=1e-2, init_dtype="fp32", rank=16)
    assert (given.lr, given.init_dtype, given.rank) == (1e-2, "fp32", 16)
    assert configured(strategy="fedsb", task="causal-lm").lr == 5e-4  # the task's default wins
    coded = RunConfig(lr=7e-3)  # a value set in code is not a default, and stays
    coded.update({"strategy": "ffa"})
    assert coded.lr == 7e-3
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_a_dp_run_takes_dps_defaults_for_what_it_leaves_unset_and_says_so(capsys, tmp_path):
    from fedlora.cli import _run_settings

    cfg = configured(dp_epsilon=3.0)
    assert (cfg.batch_size, cfg.lr, cfg.head_lr) == (64, 1e-3, 3e-2)
    assert cfg.dp_adjustments() == {"batch_size": 64, "lr": 1e-3}
    given = configured(dp_epsilon=3.0, strategy="fedsb", lr=5e-3)
    assert (given.lr, given.batch_size) == (5e-3, 64) and "lr" not in given.dp_adjustments()
    assert configured().dp_adjustments() == {} and configured(task="causal-lm").head_lr is None
    assert RunConfig.from_dict(cfg.to_dict()).dp_adjustments() == {}  # a saved config is all explicit
    _run_settings(build_parser().parse_args(["simulate", "--dp-epsilon", "3", "--out", str(tmp_path)]), SIMULATE)
    assert "under DP: --batch-size 64, --lr 1e-3 (DP's own" in capsys.readouterr().out
    _run_settings(build_parser().parse_args(["simulate", "--out", str(tmp_path)]), SIMULATE)
    assert "under DP" not in capsys.readouterr().out
