"""``python -m fedlora.deploy.guard CMD...``: run CMD, and take down everything below this process
when our parent dies (even by SIGKILL), when we are signalled, or when CMD exits.

Flower's SuperLink and SuperNode start children of their own (executors, in sessions of
their own, and ServerApp or ClientApp processes) that outlive them when they are killed;
a leftover ServerApp of a killed coordinator would go on writing into the run folder.
``fedlora coordinator`` and ``fedlora client`` therefore start each Flower process under
this guard: the kernel sends the guard SIGTERM when its parent dies (Linux
PR_SET_PDEATHSIG), the guard is the subreaper of everything below it (orphans are
re-parented to it, not to init), and it stops the whole tree: the command first, then
what is left.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
GRACE_S = 10.0  # the command's time to stop after our SIGTERM
LEFTOVER_GRACE_S = 3.0  # what is left below us: time to stop by itself
KILL_WAIT_S = 5.0  # then SIGKILL, and this long for it to land


def stop_s() -> float:
    """The longest a signalled guard takes to stop its tree: whoever stops a guard waits this
    long (``processes.stop``) before it SIGKILLs the guard's group."""
    return GRACE_S + LEFTOVER_GRACE_S + KILL_WAIT_S


def _prctl(option: int, value: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value)
    except (OSError, AttributeError):
        pass


def kill_leftovers() -> None:
    """Give every process below this one ``LEFTOVER_GRACE_S`` to exit by itself, then SIGKILL it.

    Descendants, not the process group: Flower starts its executors in sessions of their own."""
    import psutil  # lazy: only the exit path needs it

    tree = psutil.Process().children(recursive=True)
    _, alive = psutil.wait_procs(tree, timeout=LEFTOVER_GRACE_S)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=KILL_WAIT_S)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m fedlora.deploy.guard CMD [ARGS...]", file=sys.stderr)
        return 2
    parent = os.getppid()
    child: subprocess.Popen | None = None
    pending: list[int] = []  # a signal that came while the command was being started

    def on_signal(signum, frame) -> None:
        if child is None:  # Popen is under way: the command is stopped as soon as it exists
            pending.append(signum)
            return
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stop_command_then_leftovers(child.pid)
        os._exit(128 + signum)

    # armed before the command starts: a stop that lands while it starts must not kill this
    # guard alone (default handling) and leave the command running. The command itself starts
    # with default handling all the same: exec resets a handled signal, where an ignored one
    # (a parent's SIG_IGN, inherited) would survive it and the command would sit out our stop
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    _prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans below us stay ours to clean up
    if os.getppid() != parent or pending:  # the parent died, or we were stopped, before anything started
        return 128 + (pending[0] if pending else signal.SIGTERM)
    child = subprocess.Popen(argv)
    if pending:
        on_signal(pending[0], None)
    code = child.wait()
    kill_leftovers()  # whatever the command left behind
    return code if code >= 0 else 128 - code


def stop_command_then_leftovers(pid: int) -> None:
    """SIGTERM the command alone, then give what it started time to stop by itself before
    SIGKILL. Flower's processes watch their parents and raise SIGINT in themselves when it
    goes; a SIGTERM of ours on top of that raced their own shutdown into a
    KeyboardInterrupt traceback (a red CI run)."""
    import psutil  # lazy: only the exit path needs it

    try:  # psutil's wait, not Popen's: this runs in a signal handler that interrupted Popen.wait
        command = psutil.Process(pid)
        command.terminate()
        command.wait(timeout=GRACE_S)
    except (psutil.NoSuchProcess, psutil.TimeoutExpired):
        pass
    kill_leftovers()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
