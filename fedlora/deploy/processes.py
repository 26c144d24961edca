"""Child processes of ``fedlora coordinator`` and ``fedlora client``: Flower's executables,
each under ``fedlora.deploy.guard`` in a session of its own, so that stopping it (or our own
death) stops everything it started."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

from fedlora.deploy import guard
from fedlora.errors import UserError

FLOWER_APP_RUNTIMES = ("flwr-simulation", "flwr-serverapp")  # the processes a ServerApp runs in


def flower_executable(name: str) -> str:
    """``flower-superlink``, ``flwr``...: the one beside this interpreter, else on PATH."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise UserError(f"cannot find Flower's {name} executable: is flwr installed in this environment?")
    return found


def child_env(flower_home: Path) -> dict[str, str]:
    """Flower keeps its state under FLWR_HOME; our interpreter's folder goes first on PATH
    so that Flower's own children (superexec, serverapp, clientapp) come from the same install."""
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flower_home)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage events to flower.ai from private deployments
    return env


def start(cmd: Sequence[str], env: dict[str, str], log_path: Path | None, cwd: Path | None = None) -> subprocess.Popen:
    """``cmd`` under ``fedlora.deploy.guard`` in a new session: stopping the returned process's
    group stops everything ``cmd`` started, and so does our own death."""
    guarded = [sys.executable, "-m", "fedlora.deploy.guard", *cmd]
    # the child holds its own copy of the log's descriptor; ours closes at once
    log = open(log_path, "ab") if log_path is not None else contextlib.nullcontext(subprocess.PIPE)
    with log as out:
        return subprocess.Popen(guarded, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)


STOP_MARGIN_S = 2.0  # beyond the guard's own longest stop, before its group is killed


def stop(proc: subprocess.Popen, grace_s: float | None = None) -> None:
    """SIGTERM to the whole process group, then SIGKILL to what is left. ``grace_s`` (by
    default a guard's longest stop, ``guard.stop_s()``, and a margin) lets a guard stop its
    tree its own way, its command first, before anything in the group is killed."""
    if grace_s is None:
        grace_s = guard.stop_s() + STOP_MARGIN_S
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; children left in its group get the same signal once more
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        break


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL ``proc`` (a guard) and every process below it, for a runtime whose work is done
    and saved, where a graceful stop would only cost time. The descendants go first, until
    none is left: the guard, their subreaper, adopts what a killed one had started."""
    with contextlib.suppress(psutil.NoSuchProcess):
        guard = psutil.Process(proc.pid)
        for _ in range(100):  # a killed process is a zombie until the guard goes: not counted
            living = [p for p in guard.children(recursive=True) if _living(p)]
            if not living:
                break
            for child in living:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            time.sleep(0.02)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()
    proc.wait()


def _living(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def runs_flower_app(root: subprocess.Popen) -> bool:
    """Whether a process under ``root`` (a SuperLink we started) is running a ServerApp."""
    try:
        tree = psutil.Process(root.pid).children(recursive=True)
    except psutil.Error:
        return False
    for proc in tree:
        try:
            command = proc.cmdline()[:2]  # the executable, or an interpreter and its script
        except psutil.Error:
            continue
        if any(Path(part).name in FLOWER_APP_RUNTIMES for part in command):
            return True
    return False


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UserError(f"address must be HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(host: str, port: int, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise UserError(f"{what} exited with status {proc.returncode} while starting")
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError:
            time.sleep(0.3)
    raise UserError(f"{what} did not open {host}:{port} within {timeout_s:.0f} s")


def _interrupt(signum, frame) -> None:
    # once: a stop of our group and a guard's stop of us both send SIGTERM, and the second
    # would land in the clean-up (or in atexit callbacks) as a traceback
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def terminate_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt, so that ``finally`` blocks stop the children."""
    signal.signal(signal.SIGTERM, _interrupt)


def disarm_sigterm() -> None:
    """Once the command's own clean-up is done: a late SIGTERM (a stop of a child's group that
    reaches this process as it exits) would raise inside atexit callbacks, so it is ignored."""
    if signal.getsignal(signal.SIGTERM) is _interrupt:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def last_line(path: Path, needles: Sequence[str] = ("error", "Error", "ERROR", "refused", "failed")) -> str:
    """The last log line that says what went wrong (or the last line at all)."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    for line in reversed(lines):
        if any(n in line for n in needles):
            return line
    return lines[-1] if lines else ""
