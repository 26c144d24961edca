"""The default job's wall time (``fedlora simulate`` with no options) against other commands
that run a job, alternating on the same machine, as ratios.

    python simulations/default_job_benchmark.py [--repeats 2] [--out DIR] \
        [--baseline 'LABEL=COMMAND --out {out}' ...]

Each repeat runs this checkout's default job and every baseline once, in an order that
rotates between repeats, so that a host whose speed drifts slows each alike. A baseline's
COMMAND is run by the shell with ``{out}`` replaced by a fresh folder; it must write
``summary.json`` there, as ``fedlora simulate`` does. Another commit's default job makes a
baseline without installing it: check the commit out with ``git worktree add``, and give a
venv of its own two ``.pth`` lines, this venv's site-packages and a folder whose
``fedlora`` mirrors pyproject's ``package-dir`` (``server``, ``client`` and
``strategies`` linked under ``fedlora``), plus copies of this venv's Flower executables
with that venv's interpreter on their first line, so that Flower's own processes import
that commit as well (docs/benchmarks.md: Default job time).

Prints each job's median wall time and final accuracy, and each baseline's time over this
checkout's.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = "this checkout"


def run_job(command: str, out: Path) -> tuple[float, float]:
    """Wall seconds and final accuracy of one job run by ``command`` into ``out``."""
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    done = subprocess.run(command.replace("{out}", shlex.quote(str(out))), shell=True, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
        raise SystemExit(f"{command!r} exited with {done.returncode}: {tail[0]}")
    summary = json.loads((out / "summary.json").read_text())
    return seconds, summary["final_accuracy"]


def parse_baseline(text: str) -> tuple[str, str]:
    label, sep, command = text.partition("=")
    if not sep or not label or "{out}" not in command:
        raise SystemExit(f"--baseline takes LABEL=COMMAND with {{out}} in COMMAND, got {text!r}")
    return label, command


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="runs/default-job-benchmark")
    parser.add_argument("--baseline", action="append", default=[], help="LABEL=COMMAND, COMMAND naming {out}")
    args = parser.parse_args()
    own = str(Path(sys.executable).parent / "fedlora") + " simulate --out {out}"
    jobs = dict([(HERE, own), *(parse_baseline(b) for b in args.baseline)])
    times: dict[str, list[float]] = {label: [] for label in jobs}
    accuracy: dict[str, float] = {}
    labels = list(jobs)
    for repeat in range(args.repeats):
        shift = repeat % len(labels)
        for label in labels[shift:] + labels[:shift]:
            out = Path(args.out) / f"{label.replace(' ', '-')}-{repeat}"
            seconds, accuracy[label] = run_job(jobs[label], out)
            times[label].append(seconds)
            print(f"repeat {repeat + 1} {label}: {seconds:.1f} s, final accuracy {accuracy[label]:.4f}", flush=True)
    own_median = statistics.median(times[HERE])
    print()
    print("| job | median wall time | runs | final accuracy | time / this checkout's |")
    print("|---|---|---|---|---|")
    for label in labels:
        median = statistics.median(times[label])
        runs = ", ".join(f"{t:.0f}" for t in times[label])
        print(f"| {label} | {median:.1f} s | {runs} | {accuracy[label]:.4f} | {median / own_median:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
