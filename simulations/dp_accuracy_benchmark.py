"""Accuracy under differential privacy at several epsilons against the same run without DP.

    python simulations/dp_accuracy_benchmark.py [--settings defaults|tuned] [--dataset sst2|bbc]
        [--epsilons 1,3,8] [--strategies fedavg,ffa,fedsb] [--rounds R] [--out DIR]
        [--baseline-dir DIR]

Every cell is a real `fedlora simulate` on 4 clients. ``--settings defaults`` (the default):
fedlora's own defaults for each strategy, with and without DP, as a user who names only
the strategy and ``--dp-epsilon`` gets them (under DP: Poisson batches of 64, adapters at
1e-3, the head at its own rate, the classifier on the mean of the token states, the PRV
accountant). ``--settings tuned``: the settings the first DP table was measured with
(the strategy benchmark's tuned rank and learning rates, the head at the adapters' rate,
batches of 64 at 32 tokens, mean pooling with adapters on query and value, RDP). SST-2 is
split IID (a Dirichlet split of two labels leaves a client with mostly one), BBC as the
strategy benchmark splits it. The DP runs add `--dp-epsilon E` (delta 1e-5, clip 1.0),
which fixes each client's noise multiplier up front for the whole run. Prints a table of
final held-out accuracy and the worst client's final epsilon.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategy_benchmark import (  # noqa: E402
    COMMON,
    DEFAULTS,
    LR,
    SHARED_SST2,
    load_run,
    run_strategy,
    sst2_files,
    strategy_options,
    with_pooling,
)

# what only the comparison needs at --settings defaults: every run on the same split, and
# each round's accuracy on fedlora's default subset (the table reads the final evaluation)
SHARED = {k: v for k, v in DEFAULTS.items() if k != "round_eval_examples"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", choices=("defaults", "tuned"), default="defaults")
    parser.add_argument("--dataset", choices=("sst2", "bbc"), default="sst2")
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--strategies", default="fedavg,ffa,fedsb")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default="runs/dp-accuracy-benchmark")
    parser.add_argument(
        "--baseline-dir", help="take the no-DP runs from an earlier run of this benchmark with the same settings"
    )
    args = parser.parse_args()
    epsilons = [float(e) for e in args.epsilons.split(",") if e]
    strategies = [s for s in args.strategies.split(",") if s]
    tuned = args.settings == "tuned"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_settings = {}
        if args.dataset == "sst2":
            data_settings = sst2_files(Path(tmp))
            if data_settings is None:
                print(f"SST-2 not found at {SHARED_SST2}")
                return 1
        if tuned:
            settings = {**COMMON, "batch_size": 64, "max_length": 32, "dp_accountant": "rdp"}
            settings = with_pooling(settings, "mean")
        else:
            settings = dict(SHARED)
        settings.update(rounds=args.rounds, **data_settings)
        cells: dict[str, dict[str, tuple[float, float | None]]] = {}
        for strategy in strategies:
            cells[strategy] = {}
            for eps in [None, *epsilons]:
                label = "no DP" if eps is None else f"ε={eps:g}"
                print(f"[{args.dataset}] {strategy}, {label} ...", flush=True)
                if eps is None and args.baseline_dir:
                    run_dir = Path(args.baseline_dir) / f"{args.dataset}-{args.settings}-{strategy}-nodp"
                    _, summary = load_run(run_dir)
                    saved = json.loads((run_dir / "config.json").read_text())
                    if any(saved.get(k) != v for k, v in settings.items() if k not in ("data", "eval_data")):
                        raise SystemExit(f"{run_dir} was run with other settings")
                else:
                    run_settings = settings if eps is None else {**settings, "dp_epsilon": eps}
                    cell = "nodp" if eps is None else f"eps{eps:g}"
                    run_dir = out / f"{args.dataset}-{args.settings}-{strategy}-{cell}"
                    options = strategy_options(strategy, LR, {}, "fp32", None, tuned=True) if tuned else {}
                    run_strategy(strategy, run_settings, run_dir, options)
                    _, summary = load_run(run_dir)
                cells[strategy][label] = (summary["final_accuracy"], summary["epsilon"])
    labels = ["no DP", *[f"ε={e:g}" for e in epsilons]]
    rows = [
        f"| strategy | {' | '.join(labels)} |",
        "|---|" + "---|" * len(labels),
    ]
    for strategy, by_label in cells.items():
        parts = []
        for label in labels:
            acc, spent = by_label[label]
            parts.append(f"{acc:.4f}" if spent is None else f"{acc:.4f} (spent {spent:.2f})")
        rows.append(f"| {strategy} | {' | '.join(parts)} |")
    table = "\n".join(rows)
    (out / f"{args.dataset}-{args.settings}-dp-table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
