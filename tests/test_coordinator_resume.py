"""A deployed coordinator killed with SIGKILL after round 1 takes its SuperLink with it;
``fedlora coordinator --resume`` continues from round 1's checkpoint with the same client
agents, which reconnect on their own, and every round is logged exactly once. A key
removed from --auth-keys before the resume is refused after it (the SuperLink's database
still held its registration), and a resume without --auth-keys is refused."""

import json
import signal
import subprocess

import psutil
import pytest
from deployment_helpers import fedlora, prepare, rounds_logged, stop_all, wait_until

from fedlora.deploy.processes import free_loopback_port, wait_for_port

# rounds enough that, on a loaded machine too, the kill after round 1 leaves some to resume
ROUNDS = 4


def started_by(proc: subprocess.Popen, marker: str, timeout_s: float = 60) -> list[psutil.Process]:
    """Everything below ``proc`` once a process whose command line has ``marker`` is among
    them: its own children, not another job's Flower processes on the same machine."""
    tree: list[psutil.Process] = []

    def command_line(p: psutil.Process) -> str:
        try:
            return " ".join(p.cmdline())
        except psutil.Error:  # gone meanwhile
            return ""

    def found() -> bool:
        tree[:] = psutil.Process(proc.pid).children(recursive=True)
        return any(marker in command_line(p) for p in tree)

    wait_until(found, timeout_s, f"{marker} below the coordinator")
    return tree


@pytest.mark.slow
def test_killed_coordinator_resumes_with_the_same_agents(tmp_path):
    certs, parts, config, address = prepare(tmp_path, keys=3, partitions=2)
    out = tmp_path / "run"
    deployment = [
        "--address",
        address,
        "--tls-dir",
        str(certs / "coordinator"),
        "--auth-keys",
        str(certs / "coordinator" / "auth-keys"),
    ]

    procs: list[subprocess.Popen] = []
    try:
        first = fedlora(
            "coordinator",
            *deployment,
            "--min-clients",
            "2",
            "--rounds",
            str(ROUNDS),
            "--out",
            str(out),
            "--config",
            str(config),
            log=tmp_path / "first.out",
        )
        procs.append(first)
        for i in (1, 2):
            procs.append(
                fedlora(
                    "client",
                    "--coordinator",
                    address,
                    "--data",
                    str(parts / f"client-{i}.jsonl"),
                    "--root-cert",
                    str(certs / "clients" / f"client-{i}" / "ca.crt"),
                    "--auth-key",
                    str(certs / "clients" / f"client-{i}" / "client.key"),
                    "--state-dir",
                    str(tmp_path / f"agent-{i}"),
                    log=tmp_path / f"agent-{i}.out",
                )
            )
        wait_until(lambda: rounds_logged(out) >= 1 or first.poll() is not None, 600, "round 1")
        assert first.poll() is None, (tmp_path / "first.out").read_text()
        started = started_by(first, "flwr-serverapp")
        first.send_signal(signal.SIGKILL)  # the coordinator alone: its SuperLink must follow it
        first.wait(timeout=30)
        # the SuperLink and the run's ServerApp: a leftover ServerApp would write into the run folder
        _, alive = psutil.wait_procs(started, timeout=60)
        assert not alive, [p.cmdline()[:3] for p in alive]
        killed_after = rounds_logged(out)
        assert killed_after < ROUNDS

        weakened = fedlora(
            "coordinator", *deployment[:-2], "--resume", "--out", str(out), log=tmp_path / "weakened.out"
        )
        assert weakened.wait(timeout=120) != 0
        assert "resume it with --auth-keys" in (tmp_path / "weakened.out").read_text()

        (certs / "coordinator" / "auth-keys" / "client-3.pub").unlink()  # revoked: client 3 may join no more
        second = fedlora("coordinator", *deployment, "--resume", "--out", str(out), log=tmp_path / "second.out")
        procs.append(second)
        host, port = address.rsplit(":", 1)
        wait_for_port(host, int(port), second, 300, "the resumed coordinator")
        revoked = fedlora(
            "client",
            "--coordinator",
            address,
            "--data",
            str(parts / "client-2.jsonl"),
            "--root-cert",
            str(certs / "clients" / "client-3" / "ca.crt"),
            "--auth-key",
            str(certs / "clients" / "client-3" / "client.key"),
            "--state-dir",
            str(tmp_path / "agent-3"),
            "--max-wait",
            "30",
            log=tmp_path / "agent-3.out",
        )
        procs.append(revoked)
        assert revoked.wait(timeout=120) != 0
        assert "refused this client's key" in (tmp_path / "agent-3.out").read_text()
        second.wait(timeout=900)
        log = (tmp_path / "second.out").read_text()
        assert second.returncode == 0, log
        assert "resuming" in log
    finally:
        stop_all(procs, tmp_path)

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))
    assert all(m["clients"] == 2 for m in metrics)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS and summary["resumed_after_round"] >= 1
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_sigterm_stops_the_coordinator_and_everything_it_started(tmp_path):
    out = tmp_path / "run"
    address = f"127.0.0.1:{free_loopback_port()}"
    proc = fedlora(
        "coordinator",
        "--address",
        address,
        "--insecure",
        "--min-clients",
        "2",
        "--out",
        str(out),
        log=tmp_path / "coordinator.out",
    )
    try:
        wait_until(
            lambda: "waiting for 2 clients" in (tmp_path / "coordinator.out").read_text() or proc.poll() is not None,
            120,
            "the coordinator to start",
        )
        assert proc.poll() is None, (tmp_path / "coordinator.out").read_text()
        started = started_by(proc, "flower-superexec")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        assert proc.returncode != 0
        _, alive = psutil.wait_procs(started, timeout=30)
        assert not alive, [p.cmdline()[:3] for p in alive]
    finally:
        stop_all([proc], tmp_path)
