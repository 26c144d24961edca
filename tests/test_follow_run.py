"""How ``fedlora simulate`` and ``fedlora coordinator`` follow a run: Flower is asked for the
run's status (a ``flwr`` process, a second of CPU) only once the ServerApp's process is gone."""

import subprocess
import sys
import time

import psutil
import pytest

from fedlora.deploy import coordinator
from fedlora.deploy.processes import runs_flower_app, stop
from fedlora.errors import UserError

# a SuperLink stand-in: it starts a child whose script is named like Flower's app runtime
TREE = "import subprocess, sys; subprocess.run([sys.executable, sys.argv[1]]); import time; time.sleep(60)"


class FakeFlowerCli:
    def __init__(self):
        self.calls = []

    def call(self, *args):
        self.calls.append(args)
        return {"runs": [{"status": "finished:failed", "status-details": "the ServerApp raised"}]}


def start_tree(tmp_path, script_name: str, seconds: float) -> subprocess.Popen:
    script = tmp_path / script_name
    script.write_text(f"import time\ntime.sleep({seconds})\n")
    return subprocess.Popen([sys.executable, "-c", TREE, str(script)], start_new_session=True)


def wait_until(condition, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("runtime", ["flwr-simulation", "flwr-serverapp"])
def test_a_process_tree_runs_a_flower_app_while_its_runtime_lives(tmp_path, runtime):
    root = start_tree(tmp_path, runtime, seconds=1.5)
    try:
        wait_until(lambda: runs_flower_app(root))
        wait_until(lambda: not runs_flower_app(root))  # the runtime exited; the root lives on
        assert root.poll() is None
    finally:
        stop(root)


def test_other_processes_are_not_a_flower_app(tmp_path):
    root = start_tree(tmp_path, "flwr-simulation-notes", seconds=30)
    try:
        time.sleep(1.0)
        assert len(psutil.Process(root.pid).children()) == 1
        assert not runs_flower_app(root)
    finally:
        stop(root)


def test_flower_is_asked_only_once_the_app_has_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(coordinator, "POLL_S", 0.05)
    monkeypatch.setattr(coordinator, "STATUS_EVERY_S", 0.2)
    log = tmp_path / "run.log"
    log.write_text("")
    superlink = start_tree(tmp_path, "flwr-simulation", seconds=3.0)
    cli = FakeFlowerCli()
    try:
        wait_until(lambda: runs_flower_app(superlink))
        started = time.monotonic()
        with pytest.raises(UserError, match="finished:failed: the ServerApp raised"):
            coordinator.follow_run(cli, "1", superlink, tmp_path / "superlink.log", log, 0, print)
        # quiet for well over STATUS_EVERY_S while the app lived, and not one question
        assert len(cli.calls) == 1 and cli.calls[0][:1] == ("ls",)
        assert time.monotonic() - started > 1.5
    finally:
        stop(superlink)
