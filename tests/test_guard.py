"""fedlora.deploy.guard: when the process that started it dies, even by SIGKILL, everything the
guarded command started goes too."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from fedlora.deploy.processes import kill_tree, start, stop

PARENT = """
import subprocess, sys, time
guard = subprocess.Popen([sys.executable, "-m", "fedlora.deploy.guard", "sh", "-c", "sleep 300 & sleep 300"], start_new_session=True)
print(guard.pid, flush=True)
time.sleep(300)
"""


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_guarded_group_dies_with_its_parent():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    try:
        guard_pid = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(_members(guard_pid)) < 3:  # guard, sh, the backgrounded sleep
            time.sleep(0.1)
        assert len(_members(guard_pid)) >= 3
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and group_alive(guard_pid):
            time.sleep(0.1)
        assert not group_alive(guard_pid)
    finally:
        parent.kill()
        if group_alive(guard_pid):
            os.killpg(guard_pid, signal.SIGKILL)


def _members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    members.append(int(entry))
            except ProcessLookupError:
                continue
    return members


LEAVES_A_WATCHER = """
import subprocess, sys
watcher = '''
import os, signal, sys, time
log = open(sys.argv[1], "a")
signal.signal(signal.SIGTERM, lambda *_: (log.write("SIGTERM\\\\n"), log.flush()))
parent = os.getppid()
print("ready", flush=True)
while os.getppid() == parent:
    time.sleep(0.05)
log.write("parent gone\\\\n")
log.flush()
'''
proc = subprocess.Popen([sys.executable, "-c", watcher, sys.argv[1]], start_new_session=True, stdout=subprocess.PIPE, text=True)
proc.stdout.readline()
sys.exit(3)
"""


def test_leftovers_that_watch_the_command_stop_by_themselves_without_a_second_signal(tmp_path):
    """Flower's executors stop themselves (SIGINT) when their parent goes; a SIGTERM from the
    guard on top of that raced their shutdown into a KeyboardInterrupt traceback in CI."""
    log = tmp_path / "watcher.log"
    guard = subprocess.run(
        [sys.executable, "-m", "fedlora.deploy.guard", sys.executable, "-c", LEAVES_A_WATCHER, str(log)], timeout=60
    )
    assert guard.returncode == 3  # the command's own status
    assert log.read_text().splitlines() == ["parent gone"]


WAITS_WITH_A_WATCHER = LEAVES_A_WATCHER.replace(
    "sys.exit(3)", 'print("started", flush=True)\nimport time\ntime.sleep(300)'
)


# The guard with both grace periods far longer than the test waits: a guard that sat out
# either one on a process already gone would fail on the wait, however loaded the machine.
# Started with SIGTERM ignored too, as a process that ignores it (a CLI past its clean-up, a
# test runner after one) would start it: that disposition survives exec, and CI's guard
# once sat out its 10 s grace on a command that ignored its stop.
GUARD_WITH_LONG_GRACE = """
import signal, sys
from fedlora.deploy import guard
guard.GRACE_S = guard.LEFTOVER_GRACE_S = 600.0
if sys.argv[1] == "ignoring-sigterm":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
sys.exit(guard.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("started", ["as-usual", "ignoring-sigterm"])
def test_a_signalled_guard_stops_the_command_first_and_its_leftovers_stop_by_themselves(tmp_path, started):
    log = tmp_path / "watcher.log"
    command = [sys.executable, "-c", WAITS_WITH_A_WATCHER, str(log)]
    guard = subprocess.Popen(
        [sys.executable, "-c", GUARD_WITH_LONG_GRACE, started, *command],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert guard.stdout.readline().strip() == "started"
        guard.send_signal(signal.SIGTERM)
        assert guard.wait(timeout=120) == 128 + signal.SIGTERM  # no grace period sat out
        assert log.read_text().splitlines() == ["parent gone"]
    finally:
        guard.kill()


STOPPED_TWICE = """
import os, signal, time
from fedlora.deploy.processes import terminate_on_sigterm
terminate_on_sigterm()
try:
    os.kill(os.getpid(), signal.SIGTERM)  # a stop of the process group
    time.sleep(5)
except KeyboardInterrupt:
    os.kill(os.getpid(), signal.SIGTERM)  # its guard's stop, during the clean-up
    time.sleep(0.5)
    print("cleaned up")
"""


def test_a_second_sigterm_does_not_interrupt_the_clean_up_of_the_first():
    proc = subprocess.run([sys.executable, "-c", STOPPED_TWICE], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "cleaned up", "")


# A tree as Flower's simulation runtime leaves it: a child in a session of its own that
# ignores SIGTERM, and its own child; the command itself ignores SIGTERM too.
STUBBORN_TREE = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(["sh", "-c", "trap '' TERM; sleep 300 & echo $!; wait"], start_new_session=True, stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(300)
"""


def test_kill_tree_takes_down_a_guarded_tree_that_ignores_sigterm_at_once():
    guard = start([sys.executable, "-c", STUBBORN_TREE], dict(os.environ), None)
    pids = [int(pid) for pid in guard.stdout.readline().split()]
    command = [p for p in _descendants(guard.pid) if p not in pids]
    assert len(pids) == 2 and command
    kill_tree(guard)
    # killed by us, or ended by itself once its command was killed (128 + SIGKILL)
    assert guard.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)
    deadline = time.monotonic() + 30  # killed ones linger as zombies until init reaps them
    while time.monotonic() < deadline and any(_running(p) for p in [*pids, *command]):
        time.sleep(0.1)
    assert not any(_running(p) for p in [*pids, *command])


def _descendants(pid: int) -> list[int]:
    return [p.pid for p in psutil.Process(pid).children(recursive=True)]


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_stop_waits_out_the_longest_stop_of_a_guard(monkeypatch):
    """A guard may take its command's grace, then its leftovers', then a SIGKILL's wait: the
    SIGKILL of the whole group (``stop``) comes only after all of them, not in their midst."""
    from fedlora.deploy import guard, processes

    sent, waits = [], []

    class Guarded:
        pid = 2**22 + 1  # no process: os.killpg is a stand-in below

        def wait(self, timeout):
            waits.append(timeout)
            raise subprocess.TimeoutExpired("guard", timeout)

    monkeypatch.setattr(processes.os, "killpg", lambda pid, sig: sent.append(sig))
    processes.stop(Guarded())
    assert sent == [signal.SIGTERM, signal.SIGKILL]
    assert waits[0] > guard.GRACE_S + guard.LEFTOVER_GRACE_S + guard.KILL_WAIT_S


QUICK_GUARD = """
import sys
from fedlora.deploy import guard
guard.GRACE_S, guard.LEFTOVER_GRACE_S, guard.KILL_WAIT_S = 1.5, 1.0, 1.0
sys.exit(guard.main(sys.argv[1:]))
"""


def test_a_stopped_guard_finishes_its_own_stop_of_a_command_that_ignores_sigterm(monkeypatch):
    from fedlora.deploy import guard

    monkeypatch.setattr(guard, "GRACE_S", 1.5)  # what stop() waits for: the guard's, as in QUICK_GUARD
    monkeypatch.setattr(guard, "LEFTOVER_GRACE_S", 1.0)
    monkeypatch.setattr(guard, "KILL_WAIT_S", 1.0)
    command = ["sh", "-c", "trap '' TERM; echo started; sleep 300"]
    proc = subprocess.Popen(
        [sys.executable, "-c", QUICK_GUARD, *command], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        assert proc.stdout.readline().strip() == "started"
        shell = psutil.Process(proc.pid).children()[0]
        stop(proc)
        assert proc.returncode == 128 + signal.SIGTERM  # its own exit, not our SIGKILL
        assert not _running(shell.pid)
    finally:
        kill_group_quietly(proc.pid)


SIGNALLED_AS_THE_COMMAND_STARTS = """
import os, signal, subprocess, sys
from fedlora.deploy import guard
popen = subprocess.Popen
def started_then_stopped(*args, **kwargs):
    child = popen(*args, **kwargs)
    print(child.pid, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)  # a stop that lands before Popen has returned
    return child
subprocess.Popen = started_then_stopped
sys.exit(guard.main(sys.argv[1:]))
"""


def test_a_stop_that_lands_as_the_command_starts_stops_the_command_too():
    """The guard's handlers are armed before it starts the command: a stop in between used to
    kill the guard alone (default handling) and leave its command running."""
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGNALLED_AS_THE_COMMAND_STARTS, "sleep", "300"], stdout=subprocess.PIPE, text=True
    )
    command = int(proc.stdout.readline())
    try:
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and _running(command):
            time.sleep(0.1)
        assert not _running(command)
    finally:
        proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(command, signal.SIGKILL)


def kill_group_quietly(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
