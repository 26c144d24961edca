"""Bad input gives one line on stderr, a non-zero exit, and no traceback.

A few cases run the CLI as a user's shell does, in a fresh interpreter (so what libraries
print on import or load counts too); the rest call it in this process, which checks the same
line for a fraction of the time (each fresh interpreter imports torch and transformers)."""

import contextlib
import io
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from fedlora.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "fedlora.cli", *args], capture_output=True, text=True, timeout=300)


def call_cli(*args) -> SimpleNamespace:
    """fedlora's CLI in this process: its exit status and what it wrote to stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own refusals
            code = exc.code
    return SimpleNamespace(returncode=code, stderr=err.getvalue())


def assert_one_line_error(proc, needle):
    assert proc.returncode != 0
    err = proc.stderr.strip()
    assert "Traceback" not in proc.stderr
    assert len(err.splitlines()) == 1, err
    assert err.startswith("fedlora: error:")
    assert needle in err


def _tiny_jsonl(tmp_path, n=6):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t {i}", "label": i % 2}) for i in range(n)))
    return path


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--data", "/nonexistent/data.jsonl"], "not found"),
        (["--strategy", "nope"], "unknown strategy"),
        (["--pooling", "max"], "unknown pooling"),
        (["--task", "causal-lm", "--pooling", "mean"], "--pooling applies to --task classify only"),
        (["--pooling", "mean", "--target-modules", "query,value,pooler.dense"], "['pooler.dense'] match no nn.Linear"),
        (["--target-modules", "query,q_proj"], "['q_proj'] match no nn.Linear"),
        (["--clients", "0"], "clients"),
        (["--clients", "abc"], "invalid int"),
        (["--partition", "zipf"], "unknown partition"),
        (["--init-dtype", "fp8"], "unknown init dtype"),
        (["--model", "/nonexistent/model"], "model folder"),
        (["--config", "/nonexistent.toml"], "config file not found"),
        (["--lr", "nan"], "lr must be a finite number"),
        (["--robust-norm-multiple", "inf"], "robust-norm-multiple must be a finite number"),
        (["--robust-aggregate", "median"], "not a combination of their updates for --strategy fedavg"),
        (["--robust-aggregate", "mode"], "unknown robust aggregate 'mode'"),
        (["--strategy", "ffa", "--robust-trim", "0.5"], "--robust-trim must be in (0, 0.5)"),
        (["--lora-alpha", "0"], "lora-alpha must be > 0"),
        (["--resume", "--rounds", "9"], "drop --rounds"),
    ],
)
def test_bad_flags(args, needle, tmp_path):
    in_a_fresh_interpreter = args[0] == "--data" or "pooler.dense" in args[-1]  # reading data; loading the model
    cli = run_cli if in_a_fresh_interpreter else call_cli
    assert_one_line_error(cli("simulate", "--out", str(tmp_path / "o"), *args), needle)


def test_a_fresh_run_into_an_earlier_runs_folder_is_refused_and_the_run_kept(tmp_path):
    earlier = tmp_path / "run"
    earlier.mkdir()
    (earlier / "config.json").write_text('{"rounds": 3}')
    (earlier / "metrics.jsonl").write_text('{"round": 1}\n')
    assert_one_line_error(call_cli("simulate", "--out", str(earlier)), "holds an earlier run")
    assert (earlier / "metrics.jsonl").read_text() == '{"round": 1}\n'
    assert sorted(p.name for p in earlier.iterdir()) == ["config.json", "metrics.jsonl"]
    assert_one_line_error(call_cli("simulate", "--resume", "--overwrite", "--out", str(earlier)), "drop --overwrite")


def test_unknown_column(tmp_path):
    data = _tiny_jsonl(tmp_path)
    assert_one_line_error(call_cli("simulate", "--data", str(data), "--text-column", "body"), "column 'body'")


def test_more_clients_than_examples(tmp_path):
    data = _tiny_jsonl(tmp_path)
    assert_one_line_error(call_cli("simulate", "--data", str(data), "--clients", "50"), "more clients")


def test_malformed_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [unclosed\n")
    assert_one_line_error(run_cli("simulate", "--config", str(bad)), "malformed config")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("roundz = 3\n")
    assert_one_line_error(call_cli("simulate", "--config", str(unknown)), "unknown config key")
    wrong_type = tmp_path / "type.toml"
    wrong_type.write_text('rounds = "many"\n')
    assert_one_line_error(call_cli("simulate", "--config", str(wrong_type)), "wrong type")


def test_unknown_command():
    assert_one_line_error(run_cli("fly"), "invalid choice")


@pytest.mark.parametrize(
    "table,needle",
    [
        ('[attack]\nclients = [1]\nkind = "bribe"\n', "unknown attack kind 'bribe'"),
        ('[attack]\nclients = [9]\nkind = "scale"\n', "attack clients must be partition ids in 0..3"),
        ("[attack]\nclients = [1]\nstrength = 3\n", "unknown key 'strength' in [attack]"),
        ("attack = 3\n", "attack must be a table"),
        ("poison_clients = [2]\n", "moved: use an [attack] table"),
    ],
)
def test_bad_attack_tables(table, needle, tmp_path):
    config = tmp_path / "attack.toml"
    config.write_text(table)
    assert_one_line_error(call_cli("simulate", "--out", str(tmp_path / "o"), "--config", str(config)), needle)


def test_a_coordinator_refuses_simulated_attackers(tmp_path):
    config = tmp_path / "attack.toml"
    config.write_text('[attack]\nclients = [1]\nkind = "scale"\n')
    proc = run_cli(
        "coordinator", "--address", "127.0.0.1:1", "--insecure", "--out", str(tmp_path / "o"), "--config", str(config)
    )
    assert_one_line_error(proc, "fedlora simulate only")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag,value", [("--robust-weight-cap", "-1"), ("--robust-max-norm", "0")])
def test_bad_defence_settings(flag, value, tmp_path):
    assert_one_line_error(call_cli("simulate", "--out", str(tmp_path / "o"), flag, value), flag.lstrip("-"))


@pytest.mark.parametrize(
    "flag,value,needle",
    [
        ("--dp-delta", "2", "dp-delta must be in (0, 1)"),
        ("--dp-clip", "0", "dp-clip must be > 0"),
        ("--dp-max-steps", "0", "dp-max-steps must be >= 1"),
        ("--dp-epsilon", "-1", "dp-epsilon must be > 0"),
    ],
)
def test_bad_agent_privacy_settings(flag, value, needle, tmp_path):
    data = _tiny_jsonl(tmp_path)
    cli = run_cli if flag == "--dp-delta" else call_cli
    proc = cli(
        "client",
        "--coordinator",
        "127.0.0.1:1",
        "--insecure",
        "--data",
        str(data),
        "--state-dir",
        str(tmp_path / "s"),
        flag,
        value,
    )
    assert_one_line_error(proc, needle)
