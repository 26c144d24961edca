"""The GPU check: one call on a lent GPU machine, at most about 8 minutes, one table.

    python simulations/gpu_check.py [--budget-s 450] [--out DIR] [--gsm8k DIR] [--model DIR]

SmolLM2-135M-Instruct (or ``--model``) on GSM8K from ../shared/data/gsm8k, each stage a
real fedlora run on CUDA:

- FedAvg and Fed-SB deployed: a coordinator and 4 client agents over loopback, the 4
  agents sharing the one GPU (round time, client training time, tokens/s per client,
  perplexity before and after, bytes);
- one DP round (Fed-SB, epsilon 3) deployed the same way;
- one simulated round with ``--gpus-per-client 0.25`` (skipped, with the reason, where
  Ray is not installed: its wheel is too large to carry to the device machine);
- one round on a 4-bit base (``--quantize 4bit``; skipped where the quantization
  backend is missing).

Stages run in that order while the budget lasts; a stage that fails or is skipped says
why in its row, and the table is printed after every stage, so a cut-off call still
returns what it measured. Without CUDA it says so and exits 2 (``--allow-cpu`` runs the
same stages on the CPU: slow, a check of the script itself).

On the device machine (Python 3.12 with torch, transformers and peft, no Flower),
fedlora and what it lacks there travel as wheels: see docs/benchmarks.md, "GPU check".
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import causal_lm_benchmark as bench  # noqa: E402  (a sibling script, not a package)

COLUMNS = (
    "stage",
    "status",
    "round s",
    "train s / client",
    "tokens/s / client",
    "ppl before",
    "ppl after",
    "MB up",
    "MB down",
)


def stage_args(args, strategy: str, rounds: int, deploy: bool, extra: list[str]) -> argparse.Namespace:
    """The causal-LM benchmark's options for one stage: 4 clients, small rounds."""
    return argparse.Namespace(
        extra=[*(["--model", str(args.model)] if args.model else []), *extra],
        model=str(args.model) if args.model else None,
        clients=4, rounds=rounds, per_client=args.per_client, local_steps=args.local_steps, batch_size=8, rank=16,
        max_length=256, max_new_tokens=64, eval_examples=args.eval_examples, eval_batch_size=32,
        strategies=strategy, deploy=deploy, device="cuda" if args.device == "cuda" else "cpu", gsm8k=args.gsm8k,
    )  # fmt: skip


def row(stage: str, metrics: list[dict], summary: dict, base_ppl: float | None) -> dict:
    trained = [m for m in metrics if m.get("train_seconds")]
    clients = max(1, max((m["clients"] for m in trained), default=1))
    train_s = sum(m["train_seconds"] for m in trained) / max(1, len(trained)) / clients
    tokens = sum(m.get("train_tokens", 0) for m in trained)
    return {
        "stage": stage,
        "status": "ok",
        "round s": " / ".join(f"{m['seconds']:.1f}" for m in metrics),
        "train s / client": f"{train_s:.1f}",
        "tokens/s / client": f"{tokens / max(1e-9, sum(m['train_seconds'] for m in trained)):,.0f}",
        "ppl before": f"{base_ppl:.3f}" if base_ppl else "",
        "ppl after": f"{summary.get('final_perplexity', float('nan')):.3f}",
        "MB up": f"{summary['bytes_up_total'] / 1e6:.2f}",
        "MB down": f"{summary['bytes_down_total'] / 1e6:.2f}",
    }


def print_table(rows: list[dict]) -> None:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    print("\n".join(lines), flush=True)


def run_stage(name: str, sa, train: Path, test: Path, out: Path, base_ppl) -> dict:
    """One fedlora run through the causal-LM benchmark's runner."""
    folder = out / name.replace(" ", "-").replace(",", "").replace(".", "")
    folder.mkdir(parents=True, exist_ok=True)
    metrics, summary = bench.run(sa.strategies, train, test, folder, sa)
    return row(name, metrics, summary, base_ppl)


def stages(args) -> list[tuple[str, str, int, bool, list[str], str | None]]:
    """(name, strategy, rounds, deployed, extra options, why skipped)."""
    no_ray = None if importlib.util.find_spec("ray") else "Ray is not installed here"
    no_4bit = None if importlib.util.find_spec("bitsandbytes") or importlib.util.find_spec("torchao") else (
        "no quantization backend (bitsandbytes or torchao) installed here"
    )  # fmt: skip
    return [
        ("fedavg deployed", "fedavg", args.rounds, True, [], None),
        ("fedsb deployed", "fedsb", args.rounds, True, [], None),
        ("fedsb DP round", "fedsb", 1, True, ["--dp-epsilon", "3"], None),
        ("simulated round, 0.25 GPU each", "fedavg", 1, False, ["--gpus-per-client", "0.25"], no_ray),
        ("4-bit base", "fedavg", 1, True, ["--quantize", "4bit"], no_4bit),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=450.0, help="start no stage after this many seconds")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-client", type=int, default=64)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--gsm8k", type=Path, default=bench.SHARED_GSM8K)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--model", type=Path, default=None, help="a local causal-LM folder (default: SmolLM2-135M)")
    parser.add_argument(
        "--allow-cpu", action="store_true", help="run on the CPU where there is no CUDA (slow; a script check)"
    )
    args = parser.parse_args()
    import torch  # lazy: --help without torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cpu" and not args.allow_cpu:
        print("gpu_check: no CUDA device here; nothing measured (--allow-cpu checks the script on the CPU)")
        return 2
    if not (args.gsm8k / "train.jsonl").is_file():
        print(f"gpu_check: GSM8K not found at {args.gsm8k}")
        return 2
    start = time.monotonic()
    out = args.out or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    print(f"gpu_check on {gpu}, torch {torch.__version__}, budget {args.budget_s:.0f} s, outputs in {out}", flush=True)
    train, test = bench.gsm8k_slices(args.gsm8k, out, 4 * args.per_client, args.eval_examples, seed=0)
    base_ppl = None
    rows: list[dict] = []
    for name, strategy, rounds, deploy, extra, skipped in stages(args):
        if skipped or time.monotonic() - start > args.budget_s:
            rows.append({"stage": name, "status": f"skipped: {skipped or 'out of time'}"})
        else:
            sa = stage_args(args, strategy, rounds, deploy, extra)
            try:
                if base_ppl is None:
                    base_ppl = bench.base_scores(test, sa)["perplexity"]
                rows.append(run_stage(name, sa, train, test, out, base_ppl))
            except (SystemExit, subprocess.SubprocessError, OSError, KeyError, ValueError) as exc:
                rows.append(
                    {
                        "stage": name,
                        "status": f"failed: {str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__}",
                    }
                )
        print_table(rows)
    (out / "gpu-check.json").write_text(json.dumps(rows, indent=1))
    print(f"gpu_check: {time.monotonic() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
