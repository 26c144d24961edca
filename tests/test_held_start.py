"""``fedlora simulate`` starts Flower's runtime while it checks the inputs: the ServerApp waits
until the checks release it, and bad input stops Flower and leaves no trace of the run."""

import contextlib
import io
import json
import subprocess
import sys
import threading

import psutil
import pytest

from fedlora.cli import main
from fedlora.errors import UserError
from fedlora.server.app import wait_until_released


def test_the_serverapp_waits_until_the_checks_release_it(tmp_path):
    release = tmp_path / "inputs-checked"
    timer = threading.Timer(0.5, release.touch)
    timer.start()
    wait_until_released(release, timeout_s=120)
    assert release.exists()
    timer.join()


def test_a_run_never_released_fails_in_one_line(tmp_path):
    with pytest.raises(UserError, match="waited 0 s for its input checks"):
        wait_until_released(tmp_path / "never", timeout_s=0.2)


def test_a_run_without_a_hold_starts_at_once():
    wait_until_released(None, timeout_s=0)


def test_the_apps_and_the_command_load_without_torch():
    """Flower loads both apps under one lock before its runtime starts Ray, and the command
    starts Flower before its checks: none of them may import torch on the way."""
    code = (
        "import sys, fedlora.cli, fedlora.deploy.simulate, fedlora.server.app, fedlora.client.app\n"
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert (proc.returncode, proc.stdout.strip()) == (0, "[]"), proc.stderr


def _simulate_with_an_unknown_column(tmp_path, *args: str) -> str:
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"t {i}", "label": i % 2}) for i in range(8)))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["simulate", "--data", str(data), "--text-column", "body", *args])
    assert code != 0
    return err.getvalue()


def _superlinks_under(folder) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get("FLWR_HOME", "").startswith(str(folder)):
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_bad_input_leaves_no_run_folder_and_no_flower_process(tmp_path):
    out = tmp_path / "new" / "run"
    err = _simulate_with_an_unknown_column(tmp_path, "--out", str(out))
    assert len(err.strip().splitlines()) == 1 and err.startswith("fedlora: error:") and "column 'body'" in err
    assert not (tmp_path / "new").exists()
    assert _superlinks_under(tmp_path) == []


def test_bad_input_keeps_the_earlier_run_it_was_to_overwrite(tmp_path):
    earlier = tmp_path / "run"
    (earlier / ".flower").mkdir(parents=True)
    kept = {"config.json": '{"rounds": 3}', "run.log": "round 1/3 ...\n", "metrics.jsonl": '{"round": 1}\n'}
    for name, text in kept.items():
        (earlier / name).write_text(text)
    err = _simulate_with_an_unknown_column(tmp_path, "--overwrite", "--out", str(earlier))
    assert "column 'body'" in err
    assert {name: (earlier / name).read_text() for name in kept} == kept
    assert not (earlier / ".flower" / "inputs-checked").exists()
    assert _superlinks_under(tmp_path) == []
