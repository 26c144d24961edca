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


def listening_ports(root_pid: int) -> set[int]:
    """The TCP ports that ``root_pid`` and every process below it listen on."""
    import psutil

    ports = set()
    root = psutil.Process(root_pid)
    for proc in (root, *root.children(recursive=True)):
        try:
            ports |= {c.laddr.port for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN}
        except psutil.NoSuchProcess:
            continue
    return ports


OTHER_UID = 54321  # a user of no one: no passwd entry needed to be it


def connect_as_another_user(cwd: Path, socket_path: str) -> str:
    """Connect to the Unix socket at ``socket_path`` (relative to ``cwd``) as another OS user:
    a child that enters ``cwd`` as root (the folders above it, the test's temporary ones, are
    root's alone), drops to ``OTHER_UID`` and tries. "connected", or the error's text. Needs root."""
    code = (
        "import os, socket, sys\n"
        "os.chdir(sys.argv[1])\n"
        f"os.setgroups([]); os.setgid({OTHER_UID}); os.setuid({OTHER_UID})\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[2]); print('connected')\n"
        "except OSError as exc:\n    print(exc.strerror)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(cwd), socket_path], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


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
