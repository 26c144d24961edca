"""fedlora.guard: when the process that started it dies, even by SIGKILL, everything the
guarded command started goes too."""

import os
import signal
import subprocess
import sys
import time

PARENT = """
import subprocess, sys, time
guard = subprocess.Popen([sys.executable, "-m", "fedlora.guard", "sh", "-c", "sleep 300 & sleep 300"], start_new_session=True)
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
