"""A client agent killed after round 1 of Fed-SB and started again on the same state
folder is caught up correctly: it trains against the frozen A and B it was sent once
(kept on its disk, checked by the coordinator's held-tensor digest), never declines,
and both clients train again in the rounds after it rejoins. Throughout, only the agent
answers for the agent: its tree listens on no TCP port, its SuperNode's runtime API is a
socket no other user can connect to, and no task token shows on a command line."""

import json
import os
import subprocess
import threading
from pathlib import Path

import psutil
import pytest
from deployment_helpers import (
    connect_as_another_user,
    fedlora,
    kill_group,
    listening_ports,
    prepare,
    rounds_logged,
    stop_all,
    supernode_pids,
    wait_until,
)

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
    watch = None
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
        watch = CommandLines(procs[2].pid, tmp_path / "agent-2" / "api" / "tokens")
        wait_until(lambda: rounds_logged(out) >= 1 or coordinator.poll() is not None, 600, "round 1")
        assert coordinator.poll() is None, (tmp_path / "coordinator.out").read_text()
        # mid-run, only the agent answers for the agent: its tree listens on no TCP port, and its
        # SuperNode's runtime API is a socket another user of the machine cannot connect to
        assert listening_ports(procs[2].pid) == set()
        api = tmp_path / "agent-2" / "api"
        assert (api / "supernode.sock").stat().st_mode & 0o777 == 0o600 and api.stat().st_mode & 0o777 == 0o700
        if os.geteuid() == 0:  # else no other user can be become: the modes above are the check
            assert connect_as_another_user(tmp_path / "agent-2", "api/supernode.sock") == "Permission denied"
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
        if watch is not None:
            watch.stop()
        stop_all(procs, tmp_path)
    # no task token on any command line of agent 2's tree in all its rounds: each ClientApp
    # was handed its token in a private file
    assert watch.clientapps and all("--token-file" in cmd for cmd in watch.clientapps), watch.clientapps
    assert watch.tokens and not any(t in " ".join(cmd) for t in watch.tokens for cmd in watch.seen)
    assert not any("--token" in cmd for cmd in watch.seen)

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in metrics] == list(range(1, ROUNDS + 1))
    # rounds are seconds apart: the fresh agent (its trainer loads torch first) rejoins within a few
    assert any(m["clients"] == 2 for m in metrics[2:]) and all(m["rejected"] == 0 for m in metrics)
    assert all(m["declined"] == 0 for m in metrics)  # it never lacked what it had been sent
    assert all(m["aggregation_error"] is None or m["aggregation_error"] < 1e-4 for m in metrics)


class CommandLines:
    """Every command line seen in the process tree under ``root`` (polled), the ClientApp
    ones apart, and the task tokens found in the token folder meanwhile."""

    def __init__(self, root: int, tokens: Path):
        self.root, self.token_dir = root, tokens
        self.seen: set[tuple[str, ...]] = set()
        self.clientapps: set[tuple[str, ...]] = set()
        self.tokens: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.05):
            try:
                tree = psutil.Process(self.root).children(recursive=True)
            except psutil.Error:
                continue
            for proc in tree:
                try:
                    cmd = tuple(proc.cmdline())
                except psutil.Error:
                    continue
                self.seen.add(cmd)
                if any(part.endswith("flwr-clientapp") for part in cmd[:2]):
                    self.clientapps.add(cmd)
            for path in self.token_dir.glob("*") if self.token_dir.is_dir() else ():
                try:
                    self.tokens.add(path.read_text().strip())
                except OSError:
                    continue  # read and removed by its ClientApp meanwhile

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
