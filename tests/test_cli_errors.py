"""Bad input gives one line on stderr, a non-zero exit, and no traceback."""

import json
import subprocess
import sys

import pytest


def run_cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fedlora.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


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
        (["--lora-alpha", "0"], "lora-alpha must be > 0"),
        (["--resume", "--rounds", "9"], "drop --rounds"),
    ],
)
def test_bad_flags(args, needle, tmp_path):
    assert_one_line_error(run_cli("simulate", "--out", str(tmp_path / "o"), *args), needle)


def test_a_fresh_run_into_an_earlier_runs_folder_is_refused_and_the_run_kept(tmp_path):
    earlier = tmp_path / "run"
    earlier.mkdir()
    (earlier / "config.json").write_text('{"rounds": 3}')
    (earlier / "metrics.jsonl").write_text('{"round": 1}\n')
    assert_one_line_error(run_cli("simulate", "--out", str(earlier)), "holds an earlier run")
    assert (earlier / "metrics.jsonl").read_text() == '{"round": 1}\n'
    assert sorted(p.name for p in earlier.iterdir()) == ["config.json", "metrics.jsonl"]
    assert_one_line_error(run_cli("simulate", "--resume", "--overwrite", "--out", str(earlier)), "drop --overwrite")


def test_unknown_column(tmp_path):
    data = _tiny_jsonl(tmp_path)
    assert_one_line_error(run_cli("simulate", "--data", str(data), "--text-column", "body"), "column 'body'")


def test_more_clients_than_examples(tmp_path):
    data = _tiny_jsonl(tmp_path)
    assert_one_line_error(run_cli("simulate", "--data", str(data), "--clients", "50"), "more clients")


def test_malformed_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [unclosed\n")
    assert_one_line_error(run_cli("simulate", "--config", str(bad)), "malformed config")
    unknown = tmp_path / "unknown.toml"
    unknown.write_text("roundz = 3\n")
    assert_one_line_error(run_cli("simulate", "--config", str(unknown)), "unknown config key")
    wrong_type = tmp_path / "type.toml"
    wrong_type.write_text('rounds = "many"\n')
    assert_one_line_error(run_cli("simulate", "--config", str(wrong_type)), "wrong type")


def test_unknown_command():
    assert_one_line_error(run_cli("fly"), "invalid choice")
