"""All four strategies on the same split and budget: accuracy against bytes.

    python simulations/strategy_benchmark.py [--settings defaults|tuned] [--datasets bbc,sst2]
        [--rounds R] [--pooling auto|pooler|mean] [--seeds 0,1,2] [--lr fedsb=1e-2,...]
        [--rank fedsb=24,...] [--init-dtype bf16] [--out DIR] [--reuse | --report-only]

Each strategy runs as a real `fedlora simulate` (Flower's simulation engine) with the
same clients, Dirichlet split and rounds. ``--settings defaults`` (the default): BBC,
5 rounds, every strategy at fedlora's own defaults for it, as a user who only names
the strategy gets them. ``--settings tuned``: the settings the earlier tables were
measured with (15 rounds, BBC and SST-2, BERT's pooler, rank 16 with adapters on
``pooler.dense``, the learning rates in ``LR``), which chose those defaults. SST-2 is read from
../shared/data/sst2 when that folder exists. Prints, per data set, a table of final
accuracy, bytes up and down (measured on the serialized payloads, the one-off costs
such as Fed-SB's initialisation included), bytes to first reach the target accuracy,
and the ratio of total bytes against FedAvg; writes a plot of accuracy against
cumulative bytes. With several seeds (each one a different split, adapter
initialisation and batch order) it also prints each strategy's accuracy as the mean
and spread over the seeds; the first table and the plot are the first seed's. The
default of 15 rounds is a budget on which Fed-SB's one-off initialisation (about one
FedAvg round each way) is paid back; on short runs it dominates Fed-SB's bytes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from fedlora.config import POOLINGS, WIRE_DTYPES, RunConfig
from fedlora.strategies import STRATEGY_NAMES as STRATEGIES

SHARED_SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"

# --settings defaults: only what every run must share for the comparison; the rest is
# fedlora's per-strategy defaults
DEFAULTS = {
    "clients": 4,
    "partition": "dirichlet",
    "alpha": 1.0,
    "seed": 0,
    "round_eval_examples": 0,  # every round on the whole held-out split: the curves are the result
}
# --settings tuned: a small head (the classifier) and LoRA on BERT's pooler, so that the
# adapter payload, the part the strategies differ in, is what the bytes measure.
COMMON = {
    "target_modules": ["query", "value", "pooler.dense"],
    "head_modules": ["classifier"],
    "rank": 16,
    "lora_alpha": 32.0,
    "clients": 4,
    "partition": "dirichlet",
    "alpha": 1.0,
    "local_steps": 8,
    "batch_size": 16,
    "max_length": 64,
    "seed": 0,
    "round_eval_examples": 0,  # every round on the whole held-out split: the curves are the result
    "init_batches": 16,  # Fed-SB's initialisation: a gradient over 16 batches per client gives a steadier A, B
}
# Learning rates per strategy: those that train fewer parameters take larger steps
# (Fed-SB's 5e-3 from a sweep of 3e-3, 5e-3 and 1e-2 on BBC: 1e-2 oscillates).
LR = {"fedavg": 3e-3, "ffa": 1e-2, "flora": 3e-3, "fedsb": 5e-3}
# strategies that send tensors once (frozen A, Fed-SB's initialisation): what --init-dtype changes
ONE_OFF_TENSORS = ("ffa", "fedsb")


def with_pooling(settings: dict, pooling: str | None) -> dict:
    """``settings`` for a classifier that reads ``pooling`` (None: the run's default); with
    mean pooling the pooler layer is gone, and so is the adapter on it."""
    if pooling is None:
        return settings
    out = {**settings, "pooling": pooling}
    if pooling == "mean":
        out["target_modules"] = [m for m in settings["target_modules"] if not m.startswith("pooler")]
    return out


def sst2_files(tmp: Path) -> dict | None:
    """SST-2's `label sentence` lines as JSONL in a temporary folder (nothing copied into the tree)."""
    if not SHARED_SST2.is_dir():
        return None
    out = {}
    for split in ("train", "dev"):
        rows = []
        for line in (SHARED_SST2 / f"{split}.txt").read_text().splitlines():
            label, _, text = line.partition(" ")
            if text:
                rows.append(json.dumps({"text": text, "label": int(label)}))
        path = tmp / f"sst2-{split}.jsonl"
        path.write_text("\n".join(rows) + "\n")
        out[split] = str(path)
    # IID: a Dirichlet(1.0) split of two labels leaves each client with mostly one label,
    # and every strategy then stays at chance on the dev set (measured)
    return {"data": out["train"], "eval_data": out["dev"], "eval_max_examples": 0, "partition": "iid"}


def finished_with(out_dir: Path, settings: dict, strategy: str, options: dict) -> bool:
    """Whether ``out_dir`` holds a finished run of exactly the settings a run would get now,
    fedlora's defaults for what is left unset included (a run made under older defaults
    is run again). The data paths and the output folder are left out: SST-2's JSONL
    files are written afresh into a temporary folder each time. A setting added since the
    run was made is not in its config.json and is not compared."""
    try:
        config = json.loads((out_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    wanted = RunConfig.from_dict({**settings, "strategy": strategy, **options}).to_dict()
    compared = (k for k in wanted if k in config and k not in ("data", "eval_data", "out"))
    same = all(config[k] == wanted[k] for k in compared)
    return same and (out_dir / "summary.json").is_file()


def strategy_options(
    strategy: str, lrs: dict, ranks: dict, wire_dtype: str, init_dtype: str | None, tuned: bool = False
) -> dict:
    """The settings a strategy's run gets beyond the common ones, as config.json spells them.
    ``tuned``: as the tuned runs were made, before the head had its own rate and Fed-SB's
    one-off tensors their own dtype."""
    options = {"lr": lrs[strategy]} if strategy in lrs else {}
    options["wire_dtype"] = wire_dtype
    if tuned:
        options["head_lr"] = lrs[strategy]
    if strategy in ranks:
        options["rank"] = ranks[strategy]
    if strategy in ONE_OFF_TENSORS and (init_dtype or tuned):
        options["init_dtype"] = init_dtype or wire_dtype
    return options


def run_strategy(strategy: str, settings: dict, out_dir: Path, options: dict) -> None:
    cfg_path = out_dir.with_suffix(".toml")
    lines = ["[fedlora]"] + [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    cfg_path.write_text("\n".join(lines) + "\n")
    cmd = [
        sys.executable,
        "-m",
        "fedlora.cli",
        "simulate",
        "--config",
        str(cfg_path),
        "--strategy",
        strategy,
        *[arg for key, value in options.items() for arg in (f"--{key.replace('_', '-')}", str(value))],
        "--out",
        str(out_dir),
        "--overwrite",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} failed: {proc.stderr.strip().splitlines()[-1:]}")


def load_run(out_dir: Path) -> tuple[list[dict], dict]:
    metrics = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out_dir / "summary.json").read_text())
    return metrics, summary


def bytes_to_target(metrics: list[dict], summary: dict, target: float) -> int | None:
    total = summary["init_bytes_up"] + summary["init_bytes_down"]
    for m in metrics:
        total += m["bytes_up"] + m["bytes_down"]
        if m["accuracy"] >= target:
            return total
    return None


def total_bytes(summary: dict) -> int:
    return summary["bytes_up_total"] + summary["bytes_down_total"]


def last_rounds_mean(metrics: list[dict], k: int = 3) -> float:
    return sum(m["accuracy"] for m in metrics[-k:]) / len(metrics[-k:])


def mean_and_spread(values: list[float]) -> str:
    mean = sum(values) / len(values)
    return f"{mean:.4f} ({min(values):.4f}-{max(values):.4f})"


def ratio_range(ratios: list[float]) -> str:
    low, high = f"{min(ratios):.1f}x", f"{max(ratios):.1f}x"
    return low if low == high else f"{low}-{high}"


def seeds_report(name: str, by_seed: dict[int, dict[str, tuple[list[dict], dict]]]) -> str:
    """Each strategy's accuracy over the seeds: mean, and lowest-highest in brackets."""
    seeds = sorted(by_seed)
    rows = [
        f"### {name}, over seeds {', '.join(map(str, seeds))}",
        "",
        "| strategy | final accuracy | mean of last 3 rounds | final held-out loss | FedAvg bytes / bytes (total) |",
        "|---|---|---|---|---|",
    ]
    for label in by_seed[seeds[0]]:
        runs = [by_seed[s][label] for s in seeds]
        ratios = [total_bytes(baseline(by_seed[s])[1]) / total_bytes(summary) for s, (_, summary) in zip(seeds, runs)]
        rows.append(
            f"| {label} | {mean_and_spread([r[1]['final_accuracy'] for r in runs])}"
            f" | {mean_and_spread([last_rounds_mean(r[0]) for r in runs])}"
            f" | {mean_and_spread([r[1]['final_loss'] for r in runs])}"
            f" | {ratio_range(ratios)} |"
        )
    return "\n".join(rows)


def baseline(results: dict[str, tuple[list[dict], dict]]) -> tuple[list[dict], dict]:
    """FedAvg's run, the first one obtained: the denominator of every ratio."""
    return next(iter(results.values()))


def run_label(strategy: str, options: dict) -> str:
    """The strategy's name, plus what it runs with beyond the common settings and its learning rate."""
    extras = [options["wire_dtype"]] if options["wire_dtype"] != "fp32" else []
    if "rank" in options:
        extras.append(f"rank {options['rank']}")
    if options.get("init_dtype", options["wire_dtype"]) != options["wire_dtype"]:
        extras.append(f"{options['init_dtype']} init")
    return f"{strategy} ({', '.join(extras)})" if extras else strategy


def mb(n: int | None) -> str:
    return "not reached" if n is None else f"{n / 1e6:.2f} MB"


def report(
    name: str, results: dict[str, tuple[list[dict], dict]], target: float, plot_path: Path, plot_title: str
) -> str:
    base_metrics, base_summary = baseline(results)
    base_total = total_bytes(base_summary)
    base_round = base_metrics[-1]["bytes_up"] + base_metrics[-1]["bytes_down"]
    rows = [
        f"### {name} (target accuracy {target:.2f})",
        "",
        "| strategy | final accuracy | mean of last 3 rounds | bytes up | bytes down | bytes to target | FedAvg bytes / bytes (total) | FedAvg bytes / bytes (last round) | mean aggregation error |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for strategy, (metrics, summary) in results.items():
        total = total_bytes(summary)
        last = metrics[-1]["bytes_up"] + metrics[-1]["bytes_down"]
        err = sum(m["aggregation_error"] or 0.0 for m in metrics) / len(metrics)
        rows.append(
            f"| {strategy} | {summary['final_accuracy']:.4f} | {last_rounds_mean(metrics):.4f}"
            f" | {mb(summary['bytes_up_total'])} | {mb(summary['bytes_down_total'])}"
            f" | {mb(bytes_to_target(metrics, summary, target))} | {base_total / total:.1f}x | {base_round / last:.1f}x | {err:.1e} |"
        )
    plot(results, plot_path, plot_title)
    return "\n".join(rows)


def plot(results: dict[str, tuple[list[dict], dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, (metrics, summary) in results.items():
        total = summary["init_bytes_up"] + summary["init_bytes_down"]
        xs, ys = [], []
        for m in metrics:
            total += m["bytes_up"] + m["bytes_down"]
            xs.append(total / 1e6)
            ys.append(m["accuracy"])
        ax.plot(xs, ys, "o-", label=strategy)
    ax.set_xscale("log")
    # matplotlib labels every minor tick of a span under a decade, and they overlap
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("cumulative MB (up + down, initialisation included)")
    ax.set_ylabel("held-out accuracy")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def per_strategy(parser: argparse.ArgumentParser, flag: str, text: str, cast: type) -> dict:
    """``fedsb=1e-2,ffa=5e-3`` as {strategy: value}; a bad pair is a one-line usage error."""
    values = {}
    for item in [i for i in text.split(",") if i.strip()]:
        strategy, _, raw = item.partition("=")
        try:
            value = cast(raw)
        except ValueError:
            parser.error(f"{flag} takes strategy=value pairs, got {item!r}")
        if strategy.strip() not in STRATEGIES or not value > 0:
            parser.error(f"{flag}: {item!r} needs one of {', '.join(STRATEGIES)} and a positive value")
        values[strategy.strip()] = value
    return values


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--settings", choices=("defaults", "tuned"), default="defaults", help="fedlora's defaults, or the tuned runs"
    )
    parser.add_argument("--datasets", help="default: bbc; tuned bbc,sst2")
    parser.add_argument("--rounds", type=int, help="default: 5; tuned 15")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--out", default="runs/strategy-benchmark")
    parser.add_argument(
        "--wire-dtypes",
        help="16-bit wire dtypes to also run fedavg and fedsb with ('' for none; default: none, tuned bf16)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="tabulate the runs already in --out instead of running"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="keep the runs in --out that finished with the same settings"
    )
    parser.add_argument("--lr", default="", help="learning rates other than the defaults, e.g. fedsb=1e-2,fedavg=3e-3")
    parser.add_argument("--rank", default="", help="ranks other than the common 16, e.g. fedsb=24")
    parser.add_argument(
        "--init-dtype",
        choices=WIRE_DTYPES,
        help="fedlora simulate --init-dtype for ffa and fedsb, e.g. bf16 (default: their wire dtype)",
    )
    parser.add_argument(
        "--pooling", choices=POOLINGS, help="what the classifier reads (fedlora simulate --pooling; tuned: pooler)"
    )
    parser.add_argument(
        "--seeds", default="0", help="comma-separated seeds; runs for seed s > 0 go to <data>-<strategy>-seed<s>"
    )
    args = parser.parse_args()
    tuned = args.settings == "tuned"
    args.datasets = args.datasets or ("bbc,sst2" if tuned else "bbc")
    args.rounds = args.rounds or (15 if tuned else 5)
    args.wire_dtypes = ("bf16" if tuned else "") if args.wire_dtypes is None else args.wire_dtypes
    args.pooling = args.pooling or ("pooler" if tuned else None)
    try:
        seeds = sorted({int(s) for s in args.seeds.split(",") if s.strip()})
    except ValueError:
        parser.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    if not seeds or seeds[0] < 0:
        parser.error("--seeds needs at least one seed, none negative")
    lrs = {**(LR if tuned else {}), **per_strategy(parser, "--lr", args.lr, float)}
    ranks = per_strategy(parser, "--rank", args.rank, int)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    strategies = ["fedavg"] + [
        s for s in args.strategies.split(",") if s and s != "fedavg"
    ]  # fedavg first: the baseline
    with tempfile.TemporaryDirectory() as tmp:
        datasets = {}
        if "bbc" in args.datasets:
            datasets["bbc"] = ({}, 0.90)
        if "sst2" in args.datasets:
            sst2 = sst2_files(Path(tmp))
            if sst2 is None:
                print(f"SST-2 not found at {SHARED_SST2}: skipped")
            else:
                datasets["sst2"] = (sst2, 0.80)
        for name, (data_settings, target) in datasets.items():
            by_seed: dict[int, dict[str, tuple[list[dict], dict]]] = {}
            for seed in seeds:
                common = COMMON if tuned else DEFAULTS
                settings = with_pooling({**common, "rounds": args.rounds, "seed": seed, **data_settings}, args.pooling)
                suffix = f"-seed{seed}" if seed else ""
                results = by_seed[seed] = {}

                def obtain(
                    strategy: str,
                    run_dir: Path,
                    dtype: str = "fp32",
                    settings=settings,
                    name=name,
                    seed=seed,
                    results=results,
                ) -> None:
                    options = strategy_options(strategy, lrs, ranks, dtype, args.init_dtype, tuned)
                    label = run_label(strategy, options)
                    if args.reuse and finished_with(run_dir, settings, strategy, options):
                        print(f"[{name}, seed {seed}] {label}: finished run kept", flush=True)
                    elif not args.report_only:
                        print(f"[{name}, seed {seed}] running {label} ...", flush=True)
                        run_strategy(strategy, settings, run_dir, options)
                    elif not (run_dir / "summary.json").is_file():
                        raise SystemExit(f"--report-only: no finished run in {run_dir}")
                    results[label] = load_run(run_dir)

                for strategy in strategies:
                    obtain(strategy, out / f"{name}-{strategy}{suffix}")
                for dtype in [d for d in args.wire_dtypes.split(",") if d]:
                    for strategy in ("fedavg", "fedsb"):
                        obtain(strategy, out / f"{name}-{strategy}-{dtype}{suffix}", dtype)
            first = by_seed[seeds[0]]
            seed_label = f", seed {seeds[0]}" if seeds != [0] else ""
            title = f"{name}, {args.rounds} rounds, {args.pooling or 'default'} pooling{seed_label}"
            table = report(name + seed_label, first, target, out / f"{name}-accuracy-vs-bytes.png", title)
            if len(seeds) > 1:
                table += "\n\n" + seeds_report(name, by_seed)
            (out / f"{name}-table.md").write_text(table + "\n")
            print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
