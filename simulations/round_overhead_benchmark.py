"""Where a round's time goes: clients' local training against everything else.

    python simulations/round_overhead_benchmark.py [--run-dir DIR] [-- simulate options]

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
"""

from __future__ import annotations

import argparse
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


def breakdown(m: dict, checkpoint_s: float) -> dict[str, float]:
    client_other = m["client_seconds"] - m["train_seconds"]
    transport = m["seconds"] - m["client_seconds"] - m["aggregate_seconds"] - m["eval_seconds"]
    return {
        "local training": m["train_seconds"],
        "client set-up and codec": client_other,
        "Flower transport and scheduling": transport,
        "server validation and aggregation": m["aggregate_seconds"],
        "evaluation": m["eval_seconds"],
        "checkpoint": checkpoint_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", help="a finished run to read instead of running the default job")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.run_dir) if args.run_dir else Path(tmp) / "run"
        if not args.run_dir:
            cmd = [sys.executable, "-m", "fedlora.cli", "simulate", "--out", str(run_dir), *extra]
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        summary = json.loads((run_dir / "summary.json").read_text())
        ckpt = checkpoint_seconds(run_dir)
    if any("client_seconds" not in m for m in metrics):
        raise SystemExit("this run predates the timing fields (client_seconds, aggregate_seconds)")
    rows = [breakdown(m, ckpt) for m in metrics]
    steady = rows[1:] or rows
    parts = {k: statistics.mean(r[k] for r in steady) for k in steady[0]}
    total = sum(parts.values())
    first_total = sum(rows[0].values())
    print(
        f"rounds {len(metrics)}; round 1 took {first_total:.1f} s (model load included); rounds 2+ average {total:.2f} s\n"
    )
    print("| part of a round | seconds | share |")
    print("|---|---|---|")
    for name, seconds in parts.items():
        print(f"| {name} | {seconds:.3f} | {seconds / total:.1%} |")
    overhead = total - parts["local training"]
    print(f"\nround overhead (everything but local training): {overhead:.2f} s = {overhead / total:.1%} of the round")
    print(
        f"without evaluation: {overhead - parts['evaluation']:.2f} s = {(overhead - parts['evaluation']) / total:.1%}"
    )
    print(f"evaluation in each round: {metrics[-1].get('eval_examples', '?')} held-out examples")
    final_s = summary.get("final_eval_seconds", 0.0)
    if final_s:
        spread = final_s / len(metrics)
        print(
            f"final evaluation, once after the last round, on all {summary['final_eval_examples']} held-out examples:"
            f" {final_s:.2f} s; spread over the {len(metrics)} rounds, overhead {(overhead + spread) / (total + spread):.1%}"
        )


if __name__ == "__main__":
    main()
