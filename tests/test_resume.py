"""Crash safety: a real SIGKILL mid-run, then --resume; and checkpoint round trips."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from fedlora.errors import UserError
from fedlora.io.checkpoint import load_checkpoint, save_checkpoint

SMALL = [
    "--clients",
    "2",
    "--rounds",
    "3",
    "--local-steps",
    "2",
    "--max-length",
    "32",
    "--strategy",
    "flora",
    "--ranks",
    "4,2",
]


def test_checkpoint_round_trip_and_atomic_replace(tmp_path):
    state = {"a.lora_A.weight": torch.randn(2, 3), "merged.1.a.lora_B.weight": torch.randn(3, 2)}
    save_checkpoint(tmp_path, state, {"round": 4, "init": {"bytes_up": 1, "bytes_down": 2}, "seconds": 1.0})
    save_checkpoint(
        tmp_path,
        {k: v + 1 for k, v in state.items()},
        {"round": 5, "init": {"bytes_up": 1, "bytes_down": 2}, "seconds": 2.0},
    )
    got, meta = load_checkpoint(tmp_path)
    assert meta["round"] == 5 and not list(tmp_path.glob("*.tmp"))
    for k in state:
        torch.testing.assert_close(got[k], state[k] + 1)


def test_corrupt_checkpoint_is_a_user_error(tmp_path):
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    with pytest.raises(UserError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path)


def test_checkpoint_without_fedlora_metadata_is_a_user_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "checkpoint.safetensors"), metadata={"fedlora": "[1, 2]"})
    with pytest.raises(UserError, match="lacks fedlora metadata"):
        load_checkpoint(tmp_path)
    save_file({"x": torch.zeros(2)}, str(tmp_path / "checkpoint.safetensors"))
    with pytest.raises(UserError, match="unreadable checkpoint"):
        load_checkpoint(tmp_path)


def _cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", "simulate", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kw,
    )


def _eval_settings(tmp_path):
    cfg = tmp_path / "eval.toml"
    cfg.write_text("eval_max_examples = 32\n")
    return ["--config", str(cfg)]


@pytest.mark.slow
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    ref = tmp_path / "reference"
    proc = _cli(*SMALL, *_eval_settings(tmp_path), "--out", str(ref))
    assert proc.wait(timeout=600) == 0, proc.stdout.read()

    run = tmp_path / "killed"
    proc = _cli(*SMALL, *_eval_settings(tmp_path), "--out", str(run))
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 1):
        time.sleep(0.2)
    time.sleep(1.0)  # into round 2
    os.killpg(proc.pid, signal.SIGKILL)  # the coordinator and its simulation workers, as a lost machine
    proc.wait(timeout=60)
    assert not (run / "summary.json").exists()
    done_before = len(metrics.read_text().splitlines())
    assert 1 <= done_before < 3

    proc = _cli("--resume", "--out", str(run))
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output
    assert "resuming" in output
    rounds = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert rounds == [1, 2, 3]
    a = load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)
