"""Accuracy under differential privacy at several epsilons against the same run without DP.

    python simulations/dp_accuracy_benchmark.py [--dataset sst2|bbc] [--epsilons 1,3,8]
        [--strategies fedavg,ffa,fedsb] [--rounds R] [--pooling mean|pooler] [--out DIR]
        [--baseline-dir DIR]

Every cell is a real `fedlora simulate` with the settings of the strategy benchmark
(same clients, split, local steps, rank and learning rate per strategy) except three:
- the batch: DP-SGD adds noise of norm about sigma * C * sqrt(d) / B to each step's mean
  gradient, so it needs far larger batches than plain training (default 64 examples,
  at 32 tokens, which SST-2's sentences mostly fit);
- the classifier reads the mean of the token states (`--pooling mean`), not BERT's
  pooler output: under DP noise the pooler output drives every run to one class
  (see dp_clip_diagnosis.py); `--pooling pooler` restores it;
- with mean pooling there is no pooler layer, so the adapters sit on query and value only.
The DP runs add `--dp-epsilon E` (delta 1e-5, clip 1.0), which fixes each client's noise
multiplier up front for the whole run; the no-DP column uses the same settings. Prints a
table of final held-out accuracy and the worst client's final epsilon.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategy_benchmark import COMMON, SHARED_SST2, load_run, run_strategy, sst2_files, with_pooling  # noqa: E402

from fedlora.config import POOLINGS  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=("sst2", "bbc"), default="sst2")
    parser.add_argument("--epsilons", default="1,3,8")
    parser.add_argument("--strategies", default="fedavg,ffa,fedsb")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", default="runs/dp-accuracy-benchmark")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=32)
    parser.add_argument("--pooling", choices=POOLINGS, default="mean")
    parser.add_argument(
        "--baseline-dir", help="take the no-DP runs from an earlier run of this benchmark with the same settings"
    )
    args = parser.parse_args()
    epsilons = [float(e) for e in args.epsilons.split(",") if e]
    strategies = [s for s in args.strategies.split(",") if s]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data_settings = {}
        if args.dataset == "sst2":
            data_settings = sst2_files(Path(tmp))
            if data_settings is None:
                print(f"SST-2 not found at {SHARED_SST2}")
                return 1
        settings = {
            **COMMON,
            "rounds": args.rounds,
            **data_settings,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
        }
        settings = with_pooling(settings, args.pooling)
        cells: dict[str, dict[str, tuple[float, float | None]]] = {}
        for strategy in strategies:
            cells[strategy] = {}
            for eps in [None, *epsilons]:
                label = "no DP" if eps is None else f"ε={eps:g}"
                print(f"[{args.dataset}] {strategy}, {label} ...", flush=True)
                if eps is None and args.baseline_dir:
                    run_dir = Path(args.baseline_dir) / f"{args.dataset}-{strategy}-nodp"
                    _, summary = load_run(run_dir)
                    saved = json.loads((run_dir / "config.json").read_text())
                    if any(
                        saved.get(k) != settings[k]
                        for k in ("rounds", "batch_size", "max_length", "local_steps", "pooling")
                    ):
                        raise SystemExit(f"{run_dir} was run with other settings")
                else:
                    run_settings = settings if eps is None else {**settings, "dp_epsilon": eps}
                    run_dir = out / (f"{args.dataset}-{strategy}-" + ("nodp" if eps is None else f"eps{eps:g}"))
                    run_strategy(strategy, run_settings, run_dir)
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
    (out / f"{args.dataset}-dp-table.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
