"""Where a round's time goes: clients' local training against everything else.

    python simulations/round_overhead_benchmark.py [--run-dir DIR] [-- simulate options]
    python simulations/round_overhead_benchmark.py --deployed [-- coordinator options]

Runs the default job (``fedlora simulate``, or reads a finished run with ``--run-dir``)
and splits each round's wall time into: local training (the clients' optimiser loops,
summed: one simulation worker runs them one after another), the clients' set-up and
codec (decode the global state, load it into the cached model, extract and encode the
update), Flower's transport and scheduling (the rest of the time between sending and
receiving), the server's decoding, validation and aggregation, evaluation, and the
checkpoint (timed here by writing the run's own checkpoint again). Round 1 also pays
for the worker's one-off model load and is shown apart; the table averages the rest.
Rounds evaluate a seeded slice of the held-out split (``--round-eval-examples``); the
one evaluation of the whole split after the last round is printed on its own, and
also spread over the rounds.

``--deployed`` runs the job as a real deployment instead: ``fedlora coordinator`` and one
``fedlora client`` agent on loopback (``--insecure``), the agent's file being the whole
training split (``fedlora partition --clients 1``), and prints each round's wall time
over the client's training time (the agent's resident trainer serves every message; the
first message pays for loading the model, so round 1, or Fed-SB's initialisation, is
shown apart). Options after ``--`` go to the coordinator, e.g. ``-- --strategy fedsb``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedlora.io.checkpoint import load_checkpoint, save_checkpoint


def checkpoint_seconds(run_dir: Path, repeats: int = 5) -> float:
    state, meta = load_checkpoint(run_dir)
    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            save_checkpoint(Path(tmp), state, meta)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def breakdown(m: dict, checkpoint_s: float, waited_for_evaluation: bool) -> dict[str, float]:
    """A round's parts. A round counts its evaluation in its time only where it waited for
    it: the last round, and every round of a simulation whose clients train on the CPU;
    otherwise the evaluation runs beside the next round's training."""
    client_other = m["client_seconds"] - m["train_seconds"]
    evaluation = m["eval_seconds"] if waited_for_evaluation else 0.0
    transport = m["seconds"] - m["client_seconds"] - m["aggregate_seconds"] - evaluation
    return {
        "local training": m["train_seconds"],
        "client set-up and codec": client_other,
        "Flower transport and scheduling": transport,
        "server validation and aggregation": m["aggregate_seconds"],
        "evaluation, waited for": evaluation,
        "checkpoint": checkpoint_s,
    }


def evaluates_before_next_round(run_dir: Path) -> bool:
    """A simulation on this machine waits for each round's evaluation where its clients
    train on the CPU (server/app.py)."""
    from fedlora.config import RunConfig
    from fedlora.flower.simulation import clients_train_on_cpu

    return clients_train_on_cpu(RunConfig.from_dict(json.loads((run_dir / "config.json").read_text())))


def deploy(tmp: Path, run_dir: Path, extra: list[str], pin: bool = False) -> None:
    """A coordinator and one agent on loopback, until the run is done; both stopped after.
    ``pin``: the coordinator on CPU 0 and the agent on CPU 1, as if on two machines."""
    from fedlora.deploy.processes import free_loopback_port, stop

    cli = [sys.executable, "-m", "fedlora.cli"]
    subprocess.run([*cli, "partition", "--out", str(tmp / "parts"), "--clients", "1"], check=True)
    address = f"127.0.0.1:{free_loopback_port()}"
    coordinator = [*cli, "coordinator", "--address", address, "--insecure", "--min-clients", "1"]
    agent = [*cli, "client", "--coordinator", address, "--insecure", "--data", str(tmp / "parts" / "client-1.jsonl")]
    agent += ["--state-dir", str(tmp / "agent"), "--device", "cpu"]
    with contextlib.ExitStack() as stack:
        procs = []
        commands = [coordinator + ["--out", str(run_dir), *extra], agent]
        if pin:
            commands = [["taskset", "-c", str(cpu), *cmd] for cpu, cmd in enumerate(commands)]
        for cmd, log in zip(commands, ("coordinator.out", "agent.out")):
            out = stack.enter_context((tmp / log).open("wb"))
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        try:
            while procs[0].poll() is None:
                if procs[1].poll() is not None:
                    raise SystemExit(f"the agent stopped: {(tmp / 'agent.out').read_text()[-2000:]}")
                time.sleep(1.0)
            if procs[0].returncode != 0:
                raise SystemExit(f"the coordinator failed: {(tmp / 'coordinator.out').read_text()[-2000:]}")
        finally:
            for proc in procs:
                stop(proc, grace_s=30)


def print_deployed(metrics: list[dict], run_dir: Path) -> None:
    """Round wall time over the client's training time, round by round."""
    print("| round | round s | training s | client handler s | evaluation s | round / training |")
    print("|---|---|---|---|---|---|")
    for m in metrics:
        ratio = m["seconds"] / m["train_seconds"] if m["train_seconds"] else float("nan")
        print(
            f"| {m['round']} | {m['seconds']:.2f} | {m['train_seconds']:.2f} | {m['client_seconds']:.2f}"
            f" | {m['eval_seconds']:.2f} | {ratio:.2f} |"
        )
    steady = metrics[1:-1] or metrics[1:] or metrics  # the last round waits for its own evaluation
    wall = statistics.mean(m["seconds"] for m in steady)
    train = statistics.mean(m["train_seconds"] for m in steady)
    evaluation = statistics.mean(m["eval_seconds"] for m in steady)
    span = f"rounds 2-{len(metrics) - 1}" if len(metrics) > 2 else "rounds 2+"
    print(f"\n{span}: {wall:.2f} s a round, training {train:.2f} s: round / training = {wall / train:.2f}")
    print(f"the coordinator's evaluation ({evaluation:.2f} s) ran beside the next round's training")
    init = [line for line in (run_dir / "coordinator.log").read_text().splitlines() if "initialisation from" in line]
    if init:
        print(f"initialisation: {init[-1].strip()}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="a finished run to read instead of running the default job")
    parser.add_argument("--deployed", action="store_true", help="a coordinator and one agent on loopback")
    parser.add_argument("--pin", action="store_true", help="--deployed: coordinator on CPU 0, agent on CPU 1")
    parser.add_argument("--keep", help="--deployed: keep the run, the agent's state and both logs in this new folder")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        run_dir = Path(args.run_dir) if args.run_dir else work / "run"
        if args.deployed and not args.run_dir:
            work.mkdir(parents=True, exist_ok=not args.keep)  # --keep: a new folder
            deploy(work, run_dir, extra, pin=args.pin)
        elif not args.run_dir:
            cmd = [sys.executable, "-m", "fedlora.cli", "simulate", "--out", str(run_dir), *extra]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
        ckpt = checkpoint_seconds(run_dir)
        if args.deployed:
            print_deployed(metrics, run_dir)
    if any("client_seconds" not in m for m in metrics):
        raise SystemExit("this run predates the timing fields (client_seconds, aggregate_seconds)")
    every_round_waits = not args.deployed and evaluates_before_next_round(run_dir)
    rows = [
        breakdown(m, ckpt, waited_for_evaluation=every_round_waits or i == len(metrics) - 1)
        for i, m in enumerate(metrics)
    ]
    steady = rows[1:-1] or rows[1:] or rows
    parts = {k: statistics.mean(r[k] for r in steady) for k in steady[0]}
    total = sum(parts.values())
    first_total = sum(rows[0].values())
    print(
        f"rounds {len(metrics)}; round 1 took {first_total:.1f} s (model load included); rounds 2 to {len(metrics) - 1}"
        f" average {total:.2f} s\n"
    )
    print("| part of a round | seconds | share |")
    print("|---|---|---|")
    for name, seconds in parts.items():
        print(f"| {name} | {seconds:.3f} | {seconds / total:.1%} |")
    overhead = total - parts["local training"]
    print(f"\nround overhead (everything but local training): {overhead:.2f} s = {overhead / total:.1%} of the round")
    evaluation = statistics.mean(m["eval_seconds"] for m in metrics[1:-1] or metrics)
    when = (
        "before the next round's training (the clients train on this CPU)"
        if every_round_waits
        else "beside the next round's training (the last round waits for its own)"
    )
    print(
        f"evaluation of each round on {metrics[-1].get('eval_examples', '?')} held-out examples: {evaluation:.2f} s, {when}"
    )
    final_s = summary.get("final_eval_seconds", 0.0)
    if final_s:
        spread = final_s / len(metrics)
        print(
            f"final evaluation, once after the last round, on all {summary['final_eval_examples']} held-out examples:"
            f" {final_s:.2f} s; spread over the {len(metrics)} rounds, overhead {(overhead + spread) / (total + spread):.1%}"
        )


if __name__ == "__main__":
    main()
