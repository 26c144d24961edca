"""Benchmarks that measure each mode in a fresh process of their own script: the shared
options and the call that runs one such child and reads the JSON line it prints last."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def add_loop_options(parser: argparse.ArgumentParser, steps: int) -> None:
    """The local-training loop every mode runs, and how many times each mode is repeated."""
    parser.add_argument("--steps", type=int, default=steps)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)


def run_child(script: str, mode_flag: str, mode: str, args: argparse.Namespace) -> dict:
    """Run ``script`` with ``mode_flag mode`` and the loop options; its last stdout line, parsed."""
    cmd = [
        sys.executable,
        script,
        mode_flag,
        mode,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)
