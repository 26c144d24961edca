"""A real deployment on loopback: a coordinator and three client agents as separate
processes, TLS and node authentication on, three rounds of Fed-SB tracked in TensorBoard.
Strangers are refused, a client killed mid-run leaves the others to finish, and an agent
whose resident trainer is killed starts it again and goes on."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from deployment_helpers import (
    fedlora,
    kill_group,
    listening_ports,
    prepare,
    rounds_logged,
    stop_all,
    supernode_pids,
    trainer_pids,
    wait_until,
)
from safetensors.torch import load_file

from fedlora.deploy.processes import wait_for_port


@pytest.mark.slow
def test_coordinator_and_three_agents_over_tls_with_node_auth(tmp_path):
    certs, parts, config, address = prepare(tmp_path, keys=4, partitions=3)
    stranger_ca, out = tmp_path / "other-ca", tmp_path / "run"
    assert (
        subprocess.run(
            [sys.executable, "-m", "fedlora.cli", "certs", "--out", str(stranger_ca), "--clients", "0"]
        ).returncode
        == 0
    )
    (certs / "coordinator" / "auth-keys" / "client-4.pub").unlink()  # client 4 has a key pair, but it is not registered

    procs: list[subprocess.Popen] = []
    try:
        coordinator = fedlora(
            "coordinator",
            "--address",
            address,
            "--min-clients",
            "3",
            "--strategy",
            "fedsb",
            "--rounds",
            "3",
            "--init-dtype",
            "bf16",
            "--tls-dir",
            str(certs / "coordinator"),
            "--auth-keys",
            str(certs / "coordinator" / "auth-keys"),
            "--out",
            str(out),
            "--config",
            str(config),
            "--track",
            "tensorboard",
            log=tmp_path / "coordinator.out",
        )
        procs.append(coordinator)

        def agent(i: int, key: str, ca: Path, name: str, *extra: str) -> subprocess.Popen:
            proc = fedlora(
                "client",
                "--coordinator",
                address,
                "--data",
                str(parts / f"client-{min(i, 3)}.jsonl"),
                "--root-cert",
                str(ca / "ca" / "ca.crt"),
                "--auth-key",
                str(certs / "clients" / key / "client.key"),
                "--state-dir",
                str(tmp_path / name),
                *extra,
                log=tmp_path / f"{name}.out",
            )
            procs.append(proc)
            return proc

        for i in (1, 2, 3):
            agent(i, f"client-{i}", certs, f"agent-{i}")
        # the strangers give up after 30 s: spent before the coordinator listens (it checks
        # its inputs and registers the keys first), that reads as unreachable, not refused
        host, port = address.rsplit(":", 1)
        wait_for_port(host, int(port), coordinator, 300, "the coordinator")
        unregistered = agent(4, "client-4", certs, "unregistered", "--max-wait", "30")
        no_ca = agent(1, "client-1", stranger_ca, "no-ca", "--max-wait", "30")  # trusts another CA only

        refusals = {}
        for proc, name in ((unregistered, "unregistered"), (no_ca, "no-ca")):
            proc.wait(timeout=120)
            text = (tmp_path / f"{name}.out").read_text()
            assert proc.returncode != 0, text
            errors = [line for line in text.splitlines() if line.startswith("fedlora: error:")]
            assert len(errors) == 1 and "agent stopped" in errors[0], text
            assert "Traceback" not in text
            refusals[name] = errors[0]
        assert "key" in refusals["unregistered"] and "registered" in refusals["unregistered"]
        assert "TLS handshake" in refusals["no-ca"]

        wait_until(lambda: rounds_logged(out) >= 1 or coordinator.poll() is not None, 600, "round 1")
        assert coordinator.poll() is None, (tmp_path / "coordinator.out").read_text()
        # mid-run (SuperLink, SuperExec, ServerApp): nothing listens but the agents' Fleet API,
        # the control and runtime APIs are a socket only the operator opens
        assert listening_ports(coordinator.pid) == {int(port)}
        victims = supernode_pids(str(tmp_path / "agent-3"))
        assert victims, "agent 3's SuperNode not found"
        for pid in victims:  # the client's machine goes away: its node and everything it runs
            kill_group(pid)
        kill_group(procs[3].pid)
        trainers = trainer_pids(str(tmp_path / "agent-2"))
        assert len(trainers) == 1, "agent 2's resident trainer not found"
        os.kill(trainers[0], signal.SIGKILL)  # agent 2 starts it again; the agent itself goes on

        coordinator.wait(timeout=600)
        log = (tmp_path / "coordinator.out").read_text()
        assert coordinator.returncode == 0, log
        assert procs[2].poll() is None  # agent 2 outlived its trainer
    finally:
        stop_all(procs, tmp_path)
    wait_until(lambda: not trainer_pids(str(tmp_path)), 30, "every trainer to stop")

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["clients"] == 3 and metrics[0]["rejected"] == 0
    # round 1's line is written once its evaluation, which runs beside round 2's training, is
    # done, and before round 3 is sent: round 2 may still have had agent 3, round 3 cannot.
    # Agent 2 served round 3 through its restarted trainer, or declined it cleanly.
    assert metrics[2]["clients"] + metrics[2]["declined"] == 2 and metrics[2]["clients"] >= 1
    agent_2 = (tmp_path / "agent-2.out").read_text()
    assert "the trainer stopped" in agent_2 and agent_2.count("fedlora trainer: ready") == 2
    assert metrics[2]["failed"] >= 1 or metrics[2]["sampled"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == "fedsb" and summary["rounds"] == 3
    # each agent sent its gradient sketches (as many numbers as A and B) in bf16, as the coordinator asked
    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    sketch_numbers = sum(t.numel() for n, t in adapter.items() if "lora_A" in n or "lora_B" in n)
    assert 3 * 2 * sketch_numbers <= summary["init_bytes_up"] < 3 * 2 * sketch_numbers * 1.1
    coordinator_log = (out / "coordinator.log").read_text()
    assert "initialisation from 3 clients" in coordinator_log
    assert "no reply from client" in coordinator_log or "disconnected since the last round" in coordinator_log
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))  # --track on a deployed coordinator
    shared = (out / ".flower" / "run-config.toml").read_text()  # what every agent receives
    assert "tensorboard" not in shared and str(tmp_path) not in shared  # no --track, no coordinator path
