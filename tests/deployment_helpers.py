"""Processes for the deployment tests: fedlora commands in their own sessions, found and
stopped by what their command lines mention."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SMALL = "[fedlora]\nlocal_steps = 2\nbatch_size = 8\neval_max_examples = 40\nmax_length = 32\ninit_batches = 1\n"


def prepare(tmp_path: Path, keys: int, partitions: int) -> tuple[Path, Path, Path, str]:
    """``fedlora certs`` for ``keys`` clients, ``partitions`` client data files, the small
    run config and a free loopback address: (certs, parts, config, address)."""
    from fedlora.deploy.processes import free_loopback_port

    certs, parts, config = tmp_path / "certs", tmp_path / "parts", tmp_path / "small.toml"
    assert (
        subprocess.run(
            [sys.executable, "-m", "fedlora.cli", "certs", "--out", str(certs), "--clients", str(keys)]
        ).returncode
        == 0
    )
    assert (
        subprocess.run(
            [sys.executable, "-m", "fedlora.cli", "partition", "--out", str(parts), "--clients", str(partitions)]
        ).returncode
        == 0
    )
    config.write_text(SMALL)
    return certs, parts, config, f"127.0.0.1:{free_loopback_port()}"


def fedlora(*args: str, log: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedlora.cli", *args],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def processes_mentioning(*markers: str) -> list[int]:
    """Processes (other than this one) whose command line contains every marker."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if all(m in cmd for m in markers) and int(entry.name) != os.getpid():
                found.append(int(entry.name))
    return found


def supernode_pids(marker: str) -> list[int]:
    """SuperNodes whose command line mentions ``marker`` (a client's state folder): Flower's
    own, or fedlora's entry point to it."""
    return sorted(
        {*processes_mentioning("flower-supernode", marker), *processes_mentioning("deploy.supernode", marker)}
    )


def trainer_pids(marker: str) -> list[int]:
    """Resident trainers (not the guards above them) whose command line mentions ``marker``."""
    guards = set(processes_mentioning("fedlora.deploy.guard", marker))
    return [pid for pid in processes_mentioning("fedlora.deploy.trainer", marker) if pid not in guards]


def kill_group(pid: int, sig=signal.SIGKILL) -> None:
    """Signal the process group ``pid`` belongs to."""
    try:
        os.killpg(os.getpgid(pid), sig)
    except ProcessLookupError:
        pass


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1.0)
    raise AssertionError(f"timed out waiting for {what}")


def rounds_logged(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.is_file() else 0


def stop_all(procs: list[subprocess.Popen], tmp_path: Path) -> None:
    for proc in procs:
        kill_group(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            kill_group(proc.pid)
    for pid in supernode_pids(str(tmp_path)):
        kill_group(pid)
