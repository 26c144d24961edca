"""Why DP runs stay at chance: one SST-2 client, plain training against the DP code path
with the noise switched off, at several per-sample clip norms, and with the noise of a budget.

    python simulations/dp_clip_diagnosis.py [--clips 1000000,5,1] [--epsilons 50,8] [--lr 3e-3]
        [--chunks 3] [--steps 16] [--batch-size 16]

FedAvg's adapters on the default model (rank 16 on query, value and pooler.dense, the
classifier in full), client 0 of an IID 4-way split of ../shared/data/sst2, batches of
16 (--batch-size) at 32 tokens. Each chunk is one call of the local training function
(a fresh Adam, as in a round); after each, the training loss and the accuracy on 300 dev
sentences. With --epsilons, the noise multiplier is planned for all the chunks' steps.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategy_benchmark import COMMON, SHARED_SST2, sst2_files  # noqa: E402


def client_setup(data: dict):
    """(model with fresh trainable adapters, tokenizer, client 0's data, 300 dev sentences)."""
    from fedlora.config import RunConfig
    from fedlora.ml.adapters import set_trainable
    from fedlora.ml.task import adapted_model, initial_adapter_state, load_splits, lora_spec, tokenizer_for
    from fedlora.strategies import make_strategy

    cfg = RunConfig()
    cfg.update({**COMMON, **data, "max_length": 32})
    splits = load_splits(cfg)
    strategy = make_strategy("fedavg", lora_spec(cfg))
    state = strategy.setup(initial_adapter_state(None, 2, strategy.spec, 0))
    net = adapted_model(None, 2, strategy.client_spec())
    strategy.prepare_client_model(net, state, 1)
    set_trainable(net, strategy.trained_roles)
    return net, tokenizer_for(None), splits.train.subset(splits.partitions[0]), splits.test.subset(range(300))


def clipping_at_start(data: dict, clip: float = 1.0, n: int = 16) -> str:
    """Per-sample gradient norms of the first n examples at the start, and the cosine
    between their clipped mean and their plain mean."""
    import torch
    import torch.nn.functional as F

    net, tok, local, _ = client_setup(data)
    params = [p for p in net.parameters() if p.requires_grad]
    net.train()
    torch.manual_seed(0)
    grads = []
    for i in range(n):
        inputs, labels = local.batch(tok, [i], 32)
        loss = F.cross_entropy(net(**inputs).logits, labels)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    net.eval()
    stacked = torch.stack(grads)
    norms = stacked.norm(dim=1)
    clipped = (stacked * (clip / norms).clamp(max=1.0)[:, None]).mean(0)
    cosine = F.cosine_similarity(clipped, stacked.mean(0), dim=0).item()
    return (
        f"at the start, per-sample gradient norms of {n} examples: median {norms.median():.2f}, "
        f"range {norms.min():.2f}-{norms.max():.2f}; cosine(clipped mean at {clip:g}, mean) = {cosine:.4f}"
    )


def classifier_input_geometry(data: dict, n: int = 256) -> str:
    """How well the classifier's input separates the classes at the start: its mean norm,
    the norm of its common mean, and the distance between the two class means; for the
    pooler output the classifier reads, and for the mean of the encoder's token states
    (the pooling the default model was trained with)."""
    import torch

    from fedlora.ml.models import MaskedMeanPooler

    net, tok, local, _ = client_setup(data)
    inputs, labels = local.batch(tok, list(range(min(n, len(local)))), 32)
    mean_pooler = MaskedMeanPooler()
    mean_pooler.attention_mask = inputs["attention_mask"]
    with torch.no_grad():
        out = net.base_model(**inputs)
        token_mean = mean_pooler(out.last_hidden_state)
    parts = []
    for name, feats in (
        ("pooler output (the classifier's input)", out.pooler_output),
        ("mean of token states", token_mean),
    ):
        gap = feats[labels == 1].mean(0) - feats[labels == 0].mean(0)
        parts.append(
            f"{name} over {len(labels)} examples: mean norm {feats.norm(dim=1).mean():.2f}, "
            f"norm of the common mean {feats.mean(0).norm():.2f}, distance between the class means {gap.norm():.2f}"
        )
    return "\n".join(parts)


def run(mode: str, clip: float, args, data: dict, epsilon: float | None = None) -> tuple[list[str], float]:
    """Train in chunks and score after each. ``epsilon`` adds the noise that the DP plan
    of a client with this budget over all the chunks' steps would use."""
    from fedlora.ml import privacy
    from fedlora.ml.training import evaluate, train_local

    net, tok, local, dev = client_setup(data)
    if epsilon is None:
        dp = privacy.DPPlan(
            1.0, 1e-5, clip, 0.0, privacy.poisson_sample_rate(len(local), args.batch_size)
        )  # clipping alone
    else:
        dp = privacy.plan(epsilon, 1e-5, clip, len(local), args.batch_size, args.chunks * args.steps)
    out = []
    for chunk in range(args.chunks):
        kw = {"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "max_length": 32, "seed": chunk}
        stats, _ = train_local(net, tok, local, dp=None if mode == "plain" else dp, **kw)
        accuracy, _ = evaluate(net, tok, dev, batch_size=64, max_length=32)
        out.append(f"{stats.loss:.3f} / {accuracy:.3f}")
    return out, dp.noise_multiplier


def positive_numbers(text: str) -> list[float]:
    """A comma-separated list of numbers above zero (clip norms, budgets)."""
    try:
        values = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"every value must be above 0: {text!r}")
    return values


def positive_int(text: str) -> int:
    value = int(text) if text.isdigit() else 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a whole number above 0: {text!r}")
    return value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=positive_numbers, default="1000000,5,1")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--chunks", type=positive_int, default=3)
    parser.add_argument("--steps", type=positive_int, default=16)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument(
        "--epsilons",
        type=positive_numbers,
        default="",
        help="also run the DP path with the noise of these budgets, clip 1",
    )
    args = parser.parse_args()
    if not SHARED_SST2.is_dir():
        print(f"SST-2 not found at {SHARED_SST2}")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        data = sst2_files(Path(tmp))
        start = clipping_at_start(data) + "\n" + classifier_input_geometry(data)
        rows = [("plain local training", run("plain", 0.0, args, data)[0])]
        for clip in args.clips:
            rows.append((f"DP path, no noise, clip {clip:g}", run("dp", clip, args, data)[0]))
        for eps in args.epsilons:
            cells, noise = run("dp", 1.0, args, data, eps)
            rows.append((f"DP path, epsilon {eps:g} (noise multiplier {noise:.3f}), clip 1", cells))
    print(start + "\n")
    print("| mode | " + " | ".join(f"chunk {i + 1}: train loss / accuracy" for i in range(args.chunks)) + " |")
    print("|---|" + "---|" * args.chunks)
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
