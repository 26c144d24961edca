"""One hostile client against the default job: final accuracy clean, attacked with the
default defences, and attacked with the defences off, for every simulated attack kind.

    python simulations/attack_benchmark.py [--out DIR] [--kinds scale,nan,...] [--attacker 2] [--reuse]

Each attack runs the default job (``fedlora simulate``: BBC, 4 clients, 5 rounds) with
one attacker (partition ``--attacker``) named in a config file's ``[attack]`` table. The
attacks aimed at one strategy run on it: ``flora-rank1`` on FLoRA, ``init-sketch`` on
Fed-SB; the rest on the default FedAvg. "Defences off" is ``--robust-norm-multiple 0
--robust-weight-cap 0``; the decoder's checks (non-finite values, size limits) cannot be
turned off. Prints a table; each run's folder stays under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from fedlora.config import ATTACKS

STRATEGY_OF = {"flora-rank1": "flora", "init-sketch": "fedsb"}
SCALE_OF = {"init-sketch": 1e12}  # the sketch entries of 1e17 that the issue measured, from gradients near 1e-5
DEFENCES_OFF = ["--robust-norm-multiple", "0", "--robust-weight-cap", "0"]


def run(out: Path, name: str, strategy: str, extra: list[str], reuse: bool) -> float:
    folder = out / name
    summary = folder / "summary.json"
    if not (reuse and summary.is_file()):
        cmd = [
            sys.executable,
            "-m",
            "fedlora.cli",
            "simulate",
            "--strategy",
            strategy,
            "--out",
            str(folder),
            "--overwrite",
            *extra,
        ]
        print(f"... {name}", flush=True)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return json.loads(summary.read_text())["final_accuracy"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/attack-benchmark")
    parser.add_argument("--kinds", default=",".join(ATTACKS))
    parser.add_argument("--attacker", type=int, default=2)
    parser.add_argument("--reuse", action="store_true", help="keep runs in --out that finished")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = sorted(set(kinds) - set(ATTACKS))
    if unknown:
        sys.exit(f"unknown attack kind {unknown[0]!r}: choose from {', '.join(ATTACKS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    clean: dict[str, float] = {}
    rows = []
    for strategy in dict.fromkeys(STRATEGY_OF.get(k, "fedavg") for k in kinds):
        clean[strategy] = run(out, f"{strategy}-clean", strategy, [], args.reuse)
    clean_off = run(out, "fedavg-clean-defences-off", "fedavg", DEFENCES_OFF, args.reuse)
    for kind in kinds:
        strategy = STRATEGY_OF.get(kind, "fedavg")
        config = out / f"{kind}.toml"
        config.write_text(
            f'[attack]\nclients = [{args.attacker}]\nkind = "{kind}"\nscale = {SCALE_OF.get(kind, 20.0)}\n'
        )
        on = run(out, f"{kind}-defended", strategy, ["--config", str(config)], args.reuse)
        off = run(out, f"{kind}-undefended", strategy, ["--config", str(config), *DEFENCES_OFF], args.reuse)
        rows.append((kind, strategy, clean[strategy], on, off))
    print(
        f"\nhonest default job (fedavg): defences on {clean['fedavg']:.4f}, off {clean_off:.4f} "
        f"(cost {100 * (clean_off - clean['fedavg']):+.2f} points)\n"
    )
    print("| attack | strategy | clean | attacked, defences on | attacked, defences off | on minus clean (points) |")
    print("|---|---|---|---|---|---|")
    for kind, strategy, c, on, off in rows:
        print(f"| {kind} | {strategy} | {c:.4f} | {on:.4f} | {off:.4f} | {100 * (on - c):+.2f} |")


if __name__ == "__main__":
    main()
