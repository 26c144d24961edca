"""Why DP runs stay at chance: one SST-2 client, plain training against the DP code path
with the noise switched off, at several per-sample clip norms.

    python simulations/dp_clip_diagnosis.py [--clips 1000000,5,1] [--lr 3e-3] [--chunks 3] [--steps 16]

FedAvg's adapters on the default model (rank 16 on query, value and pooler.dense, the
classifier in full), client 0 of an IID 4-way split of ../shared/data/sst2, batches of
16 at 32 tokens. Each chunk is one call of the local training function (a fresh Adam,
as in a round); after each, the training loss and the accuracy on 300 dev sentences.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from strategy_benchmark import COMMON, SHARED_SST2, sst2_files  # noqa: E402


def run(mode: str, clip: float, args, data: dict) -> list[str]:
    from fedlora import privacy
    from fedlora.adapters import set_trainable
    from fedlora.config import RunConfig
    from fedlora.strategies import make_strategy
    from fedlora.task import adapted_model, initial_adapter_state, load_splits, lora_spec, tokenizer_for
    from fedlora.training import evaluate, train_local

    cfg = RunConfig()
    cfg.update({**COMMON, **data, "max_length": 32})
    splits = load_splits(cfg)
    local, dev = splits.train.subset(splits.partitions[0]), splits.test.subset(range(300))
    strategy = make_strategy("fedavg", lora_spec(cfg))
    state = strategy.setup(initial_adapter_state(None, 2, strategy.spec, 0))
    net = adapted_model(None, 2, strategy.client_spec())
    strategy.prepare_client_model(net, state, 1)
    set_trainable(net, strategy.trained_roles)
    tok = tokenizer_for(None)
    dp = privacy.DPPlan(1.0, 1e-5, clip, 0.0, 16 / len(local))  # noise multiplier 0: clipping alone
    out = []
    for chunk in range(args.chunks):
        kw = {"steps": args.steps, "batch_size": 16, "lr": args.lr, "max_length": 32, "seed": chunk}
        stats = train_local(net, tok, local, **kw) if mode == "plain" else privacy.private_train(net, tok, local, dp=dp, history=[], **kw)[0]
        accuracy, _ = evaluate(net, tok, dev, batch_size=64, max_length=32)
        out.append(f"{stats.loss:.3f} / {accuracy:.3f}")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", default="1000000,5,1")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--chunks", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    args = parser.parse_args()
    if not SHARED_SST2.is_dir():
        print(f"SST-2 not found at {SHARED_SST2}")
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        data = sst2_files(Path(tmp))
        rows = [("plain local training", run("plain", 0.0, args, data))]
        for clip in [float(c) for c in args.clips.split(",") if c]:
            rows.append((f"DP path, no noise, clip {clip:g}", run("dp", clip, args, data)))
    print("| mode | " + " | ".join(f"chunk {i + 1}: train loss / accuracy" for i in range(args.chunks)) + " |")
    print("|---|" + "---|" * args.chunks)
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
