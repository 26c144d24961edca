"""fedlora status on a real run's folder: finished, mid-run (live or stopped), past a crash
between metrics and checkpoint, under DP; a folder that holds no run is one line, exit 2."""

import json
import os
import shutil
import time

import pytest

from fedlora.cli import main
from fedlora.io import status
from fedlora.io.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from fedlora.io.report import read_metrics


def _status(capsys, path) -> tuple[int, str, str]:
    code = main(["status", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def mid_run(tracked_run, tmp_path):
    """The real run's folder as it stood after round 2 of 5: no summary, adapter or report yet."""
    run = tmp_path / "run"
    shutil.copytree(tracked_run, run, ignore=shutil.ignore_patterns("tensorboard", "adapter", "*.sock"))
    for name in ("summary.json", "report.png"):
        (run / name).unlink()
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "rounds": 5}))
    return run


def test_a_finished_run(tracked_run, capsys):
    code, out, err = _status(capsys, tracked_run)
    summary = json.loads((tracked_run / "summary.json").read_text())
    last = read_metrics(tracked_run / "metrics.jsonl")[-1]
    assert code == 0 and err == ""
    assert "finished" in out and "2 of 2 done" in out
    assert f"round 2: accuracy {last['accuracy']:.4f}  loss {last['loss']:.4f}" in out
    assert f"{last['clients']} aggregated of {last['sampled']} sampled in round 2" in out
    assert f"accuracy {summary['final_accuracy']:.4f}" in out.split("final", 1)[1]
    assert "epsilon" not in out  # no DP


def test_a_run_mid_way_looks_live_while_it_writes(mid_run, capsys):
    code, out, _ = _status(capsys, mid_run)
    assert code == 0 and "2 of 5 done" in out and "looks live: round 3 under way" in out and "final" not in out


def test_a_run_that_stopped_writing_looks_stopped_and_says_how_to_resume(mid_run, capsys):
    old = time.time() - 3 * 3600
    for path in mid_run.iterdir():
        os.utime(path, (old, old))
    code, out, _ = _status(capsys, mid_run)
    assert code == 0 and "looks stopped (last write 3.0 h ago)" in out
    assert f"fedlora simulate --resume --out {mid_run}" in out


def test_a_crash_between_metrics_and_checkpoint_and_a_cut_line(mid_run, capsys):
    state, meta = load_checkpoint(mid_run)
    save_checkpoint(mid_run, state, {k: v for k, v in meta.items() if k != "format"} | {"round": 1})
    with (mid_run / "metrics.jsonl").open("a") as fh:
        fh.write('{"round": 3, "strat')  # killed while appending
    code, out, _ = _status(capsys, mid_run)
    assert code == 0 and "1 of 5 done" in out and "also holds round 2, past the checkpoint" in out


def test_epsilon_spent_under_dp(mid_run, capsys):
    config = json.loads((mid_run / "config.json").read_text())
    (mid_run / "config.json").write_text(json.dumps({**config, "dp_epsilon": 8.0}))
    rows = read_metrics(mid_run / "metrics.jsonl")
    (mid_run / "metrics.jsonl").write_text("".join(json.dumps({**r, "epsilon": r["round"] * 1.5}) + "\n" for r in rows))
    _, out, _ = _status(capsys, mid_run)
    assert "epsilon   3.000 spent by the most-spent client, of a budget of 8" in out


@pytest.mark.parametrize("make", ["missing", "empty", "file", "bad-config", "bad-checkpoint", "bad-metrics"])
def test_a_folder_that_is_not_a_run_is_one_line_and_exit_2(mid_run, tmp_path, capsys, make):
    target = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "file": mid_run / "config.json"}.get(
        make, mid_run
    )
    if make == "empty":
        target.mkdir()
    elif make == "bad-config":
        (mid_run / "config.json").write_text("{not json")
    elif make == "bad-checkpoint":
        (mid_run / CHECKPOINT).write_bytes(b"\xff" * 64)
    elif make == "bad-metrics":
        (mid_run / "metrics.jsonl").write_text('garbage\n{"round": 1}\n')
    code, out, err = _status(capsys, target)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and err.startswith("fedlora: error: ")


def test_status_reads_the_checkpoint_the_run_writes():
    assert status.CHECKPOINT == CHECKPOINT
