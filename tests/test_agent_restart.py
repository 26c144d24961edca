"""A client agent killed after round 1 of Fed-SB and started again on the same state
folder is caught up correctly: it trains against the frozen A and B it was sent once
(kept on its disk, checked by the coordinator's held-tensor digest), never declines,
and both clients train again in the rounds after it rejoins."""

import json
import subprocess

import pytest
from deployment_helpers import fedlora, kill_group, prepare, rounds_logged, stop_all, supernode_pids, wait_until

ROUNDS = 8  # with the resident trainer a round takes seconds: room for the restarted agent to rejoin


@pytest.mark.slow
def test_a_restarted_agent_trains_against_what_it_was_sent(tmp_path):
    certs, parts, config, address = prepare(tmp_path, keys=2, partitions=2)
    out = tmp_path / "run"

    def agent(i: int) -> subprocess.Popen:
        client = certs / "clients" / f"client-{i}"
        return fedlora(
            "client",
            "--coordinator",
            address,
            "--data",
            str(parts / f"client-{i}.jsonl"),
            "--root-cert",
            str(client / "ca.crt"),
            "--auth-key",
            str(client / "client.key"),
            "--state-dir",
            str(tmp_path / f"agent-{i}"),
            log=tmp_path / f"agent-{i}.out",
        )

    procs: list[subprocess.Popen] = []
    try:
        coordinator = fedlora(
            "coordinator",
            "--address",
            address,
            "--min-clients",
            "2",
            "--strategy",
            "fedsb",
            "--rounds",
            str(ROUNDS),
            "--tls-dir",
            str(certs / "coordinator"),
            "--auth-keys",
            str(certs / "coordinator" / "auth-keys"),
            "--out",
            str(out),
            "--config",
            str(config),
            log=tmp_path / "coordinator.out",
        )
        procs += [coordinator, agent(1), agent(2)]
        wait_until(lambda: rounds_logged(out) >= 1 or coordinator.poll() is not None, 600, "round 1")
        assert coordinator.poll() is None, (tmp_path / "coordinator.out").read_text()
        for pid in supernode_pids(str(tmp_path / "agent-1")):
            kill_group(pid)
        kill_group(procs[1].pid)
        procs[1].wait(timeout=30)
        assert list((tmp_path / "agent-1" / "runs").glob("*/held.bin")), "agent 1 kept nothing on its disk"
        # the SuperLink lets the node in again once its missed heartbeats mark it offline,
        # which also ends round 2 without it
        wait_until(lambda: rounds_logged(out) >= 2 or coordinator.poll() is not None, 600, "round 2")
        procs.append(agent(1))  # the same machine, the same state folder, a fresh process

        coordinator.wait(timeout=900)
        log = (tmp_path / "coordinator.out").read_text()
        assert coordinator.returncode == 0, log
    finally:
        stop_all(procs, tmp_path)

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))
    # rounds are seconds apart: the fresh agent (its trainer loads torch first) rejoins within a few
    assert any(m["clients"] == 2 for m in metrics[2:]) and all(m["rejected"] == 0 for m in metrics)
    assert all(m["declined"] == 0 for m in metrics)  # it never lacked what it had been sent
    assert all(m["aggregation_error"] is None or m["aggregation_error"] < 1e-4 for m in metrics)
