"""Memory of a simulation with many clients against one with few, at the same clients per round.

    python simulations/scale_benchmark.py [--rounds 3] [--per-round 10] [--many 100]

Runs ``fedlora simulate`` twice, each in its own process tree: ``--clients PER_ROUND``
with everyone in every round, then ``--clients MANY --fraction PER_ROUND/MANY``. While
each runs, the proportional set size (PSS: shared pages split between the processes
that map them) of the whole tree (the driver, Ray's services and its worker) is
sampled every 0.5 s; the peak is reported, with the ratio many/few. The base model and
the data are loaded once per simulation worker, so the number of clients should barely
show. Pass run options after ``--``, e.g. ``-- --local-steps 4``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def tree_pss(pid: int) -> int:
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def run(clients: int, fraction: float, rounds: int, extra: list[str], out: Path) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "fedlora.cli",
        "simulate",
        "--clients",
        str(clients),
        "--fraction",
        str(fraction),
        "--rounds",
        str(rounds),
        "--out",
        str(out),
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_pss(proc.pid))
            time.sleep(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    sampler.join()
    if proc.returncode != 0:
        raise SystemExit(f"simulate --clients {clients} failed: {err.strip().splitlines()[-1:]}")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "clients": clients,
        "fraction": fraction,
        "per_round": metrics[-1]["clients"],
        "peak_gib": peak[0] / 2**30,
        "seconds": time.perf_counter() - start,
        "final_accuracy": metrics[-1]["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--many", type=int, default=100)
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    with tempfile.TemporaryDirectory() as tmp:
        few = run(args.per_round, 1.0, args.rounds, extra, Path(tmp) / "few")
        many = run(args.many, args.per_round / args.many, args.rounds, extra, Path(tmp) / "many")
    print("| clients | fraction | clients per round | peak memory (PSS, whole tree) | wall time | final accuracy |")
    print("|---|---|---|---|---|---|")
    for r in (few, many):
        print(
            f"| {r['clients']} | {r['fraction']:g} | {r['per_round']} | {r['peak_gib']:.2f} GiB | {r['seconds']:.0f} s | {r['final_accuracy']:.4f} |"
        )
    print(f"\npeak memory ratio {args.many} / {args.per_round} clients: {many['peak_gib'] / few['peak_gib']:.2f}")


if __name__ == "__main__":
    main()
