"""Simulated attackers against the default job: final accuracy clean and attacked, with the
default defences, with the defences off and, on the strategies whose aggregate is linear in
what clients send (FFA-LoRA, Fed-SB), with each robust aggregate; and how far the attackers
turned the aggregate their way.

    python simulations/attack_benchmark.py [--out DIR] [--kinds steer,sketch-capture] [--attackers 2]
        [--strategies ffa] [--defences defaults,off] [--rounds N] [--reuse]

Each attack runs the default job (``fedlora simulate``: BBC, 4 clients, 5 rounds) with the
attackers (partitions ``--attackers``, comma-separated: colluders) named in a config file's
``[attack]`` table, on the strategies it is aimed at: ``flora-rank1`` on FLoRA,
``init-sketch`` and ``sketch-capture`` on Fed-SB, ``steer`` on FedAvg and FFA-LoRA, the rest
on FedAvg. Defence settings: ``defaults``; ``off`` (``--robust-norm-multiple 0
--robust-weight-cap 0``; the decoder's checks, non-finite values and size limits, cannot be
turned off); ``trimmed-mean`` and ``median`` (``--robust-aggregate``, the other defaults kept;
linear strategies only: FedAvg refuses them). Each attacked run is compared with the clean
run of the same strategy and defence setting.

What the attackers achieved is measured from the run itself, not from a second run: in a
simulation the attack mod (fedlora/flower/attacks.py) writes, for every message an attacker
answers, the global state it received and the reply it sent to
``<run>/clients/<partition>/attack/``; the aggregate that followed is the next round's
received state, or the final checkpoint.

- **attacker's cosine**: train-round attacks, the cosine between the round's change of the
  global model and the attackers' mean sent change, both as effects (each adapted module's
  dense change s·B·A, then each head's change, flattened together), averaged over rounds
  weighted by the norm of what the attackers sent;
  the sketch attacks, the cosine between Fed-SB's initial update s·B·R0·A and the attackers'
  mean proposed one, -η·U·S·Vᵀ. Near 1: the aggregate moved where the attackers sent it.
  Not measured for FLoRA (its stacked aggregate has no one change to compare).
- **share of span(B)** (sketch attacks): ||Pᵀ B||²_F / r per module, averaged, with P an
  orthonormal basis of the attackers' sent U directions and B the run's frozen B: the share
  of Fed-SB's trainable subspace the attackers chose.

Prints a table; each run's folder stays under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedlora.config import ATTACKS, RunConfig
from fedlora.io.checkpoint import load_checkpoint
from fedlora.ml.adapters import ROLE_A, ROLE_B, ROLE_HEAD, ROLE_R, role_of
from fedlora.strategies.base import lora_deltas
from fedlora.strategies.fedsb import GRAD_U, GRAD_V

STRATEGIES_OF = {
    "flora-rank1": ("flora",),
    "init-sketch": ("fedsb",),
    "sketch-capture": ("fedsb",),
    "steer": ("fedavg", "ffa"),
}
LINEAR = ("ffa", "fedsb")  # the robust aggregates combine what clients send entry by entry
SCALE_OF = {"init-sketch": 1e12}  # the sketch entries of 1e17 that the issue measured, from gradients near 1e-5
SKETCH_ATTACKS = ("init-sketch", "sketch-capture")
DEFENCES = {
    "defaults": [],
    "off": ["--robust-norm-multiple", "0", "--robust-weight-cap", "0"],
    "trimmed-mean": ["--robust-aggregate", "trimmed-mean"],
    "median": ["--robust-aggregate", "median"],
}


def settings_for(strategy: str) -> list[str]:
    return list(DEFENCES) if strategy in LINEAR else ["defaults", "off"]


def run(folder: Path, strategy: str, extra: list[str], reuse: bool) -> Path:
    summary = folder / "summary.json"
    if not (reuse and summary.is_file()):
        cmd = [sys.executable, "-m", "fedlora.cli", "simulate", "--strategy", strategy, "--out", str(folder)]
        print(f"... {folder.name}", flush=True)
        subprocess.run([*cmd, "--overwrite", *extra], check=True, stdout=subprocess.DEVNULL)
    return folder


def accuracy(folder: Path) -> float:
    return json.loads((folder / "summary.json").read_text())["final_accuracy"]


# ----- what the attackers achieved, from a finished run folder ---------------------------------


def effect(before: dict, after: dict, alpha: float) -> torch.Tensor:
    """The change from ``before`` to ``after`` as an effect: dense module changes, then heads."""
    dense_before, dense_after = lora_deltas(before, alpha), lora_deltas(after, alpha)
    parts = [dense_after[m] - dense_before.get(m, 0.0) for m in sorted(dense_after)]
    for name in sorted(n for n in after if role_of(n) == ROLE_HEAD):
        parts.append(after[name].to(torch.float64) - before.get(name, torch.zeros_like(after[name])).to(torch.float64))
    return torch.cat([p.flatten() for p in parts])


def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(x @ y / (x.norm() * y.norm()).clamp_min(1e-300))


def records(folder: Path, cfg: RunConfig) -> dict[str, list[tuple[dict, dict]]]:
    """Per message (``init``, ``round-N``): each attacker's (received global state, sent reply)."""
    out: dict[str, list[tuple[dict, dict]]] = {}
    for pid in cfg.attack_clients:
        for path in sorted((folder / "clients" / str(pid) / "attack").glob("*.safetensors")):
            tensors = load_file(str(path))
            split = ({}, {})
            for name, t in tensors.items():
                part, key = name.split("/", 1)
                split[part == "sent"][key] = t
            out.setdefault(path.stem, []).append(split)
    return out


def round_cosine(recs: dict, final: dict, last_round: int, alpha: float) -> float | None:
    """cos(global change, attackers' mean sent change) per round, averaged with each round
    weighted by the norm of what the attackers sent: a round in which they sent (almost)
    nothing, a steered model already at its target, says nothing about where they turned it."""
    total = weight = 0.0
    for key, sent in recs.items():
        if not key.startswith("round-"):
            continue
        rnd = int(key.split("-")[1])
        after = final if rnd == last_round else (recs[f"round-{rnd + 1}"][0][0] if f"round-{rnd + 1}" in recs else None)
        if after is None:
            continue
        before = sent[0][0]
        attacker = torch.stack([effect(before, {**before, **s}, alpha) for _, s in sent]).mean(0)
        norm = float(attacker.norm())
        total += norm * cosine(effect(before, after, alpha), attacker)
        weight += norm
    return total / weight if weight > 0 else None


def sketch_measures(recs: dict, final: dict, cfg: RunConfig) -> tuple[float | None, float | None]:
    """(cos(initial update, attackers' proposed one), attackers' share of span(B))."""
    if "init" not in recs:
        return None, None
    sketches = [s for _, s in recs["init"]]
    modules = sorted(n[: -len(GRAD_U)] for n in sketches[0] if n.endswith(GRAD_U))
    shares, proposed, initial = [], [], []
    scaling = cfg.lora_alpha / cfg.rank
    after_init = recs["round-1"][0][0] if "round-1" in recs else None
    for m in modules:
        us = [s[f"{m}{GRAD_U}"].to(torch.float64) for s in sketches]
        basis = torch.linalg.qr(torch.cat([u / u.norm(dim=0).clamp_min(1e-300) for u in us], 1)).Q
        b = final[f"{m}.{ROLE_B}.weight"].to(torch.float64)
        shares.append(float((basis.T @ b).norm() ** 2) / b.shape[1])
        if after_init is not None:
            vs = [s[f"{m}{GRAD_V}"].to(torch.float64) for s in sketches]
            proposed.append(-cfg.lr * sum(u @ v.T for u, v in zip(us, vs)) / len(us))
            left = scaling * after_init[f"{m}.{ROLE_B}.weight"].to(torch.float64)
            r0 = after_init[f"{m}.{ROLE_R}.weight"].to(torch.float64)
            initial.append(left @ r0 @ after_init[f"{m}.{ROLE_A}.weight"].to(torch.float64))
    cos = None
    if proposed:
        cos = cosine(torch.cat([p.flatten() for p in initial]), torch.cat([p.flatten() for p in proposed]))
    return cos, sum(shares) / len(shares)


def measure(folder: Path, kind: str) -> tuple[float | None, float | None]:
    """(attacker's cosine, share of span(B)) of an attacked run; None where not measured."""
    cfg = RunConfig.from_dict(json.loads((folder / "config.json").read_text()))
    checkpoint = load_checkpoint(folder)
    recs = records(folder, cfg)
    if checkpoint is None or not recs or cfg.strategy == "flora":
        return None, None
    final, meta = checkpoint
    if kind in SKETCH_ATTACKS:
        return sketch_measures(recs, final, cfg)
    return round_cosine(recs, final, int(meta["round"]), cfg.lora_alpha), None


def shown(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/attack-benchmark")
    parser.add_argument("--kinds", default=",".join(ATTACKS))
    parser.add_argument("--attackers", "--attacker", default="2", help="partition ids, comma-separated")
    parser.add_argument("--strategies", default="", help="only these strategies (default: each attack's own)")
    parser.add_argument("--defences", default=",".join(DEFENCES), help=f"of {', '.join(DEFENCES)}")
    parser.add_argument("--rounds", type=int, default=None, help="instead of the default job's (a quick check)")
    parser.add_argument("--reuse", action="store_true", help="keep runs in --out that finished")
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    defences = [d for d in args.defences.split(",") if d]
    only = {s for s in args.strategies.split(",") if s}
    for given, known, what in ((kinds, ATTACKS, "attack kind"), (defences, DEFENCES, "defence setting")):
        unknown = sorted(set(given) - set(known))
        if unknown:
            sys.exit(f"unknown {what} {unknown[0]!r}: choose from {', '.join(known)}")
    attackers = [int(a) for a in args.attackers.split(",") if a]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = ["--rounds", str(args.rounds)] if args.rounds else []
    suffix = f"-r{args.rounds}" if args.rounds else ""

    plan = [
        (kind, strategy, setting)
        for kind in kinds
        for strategy in STRATEGIES_OF.get(kind, ("fedavg",))
        if not only or strategy in only
        for setting in settings_for(strategy)
        if setting in defences
    ]
    clean = {}
    for strategy, setting in dict.fromkeys((s, d) for _, s, d in plan):
        folder = run(out / f"{strategy}-clean-{setting}{suffix}", strategy, [*DEFENCES[setting], *common], args.reuse)
        clean[strategy, setting] = accuracy(folder)
    rows = []
    for kind, strategy, setting in plan:
        config = out / f"{kind}.toml"
        config.write_text(f'[attack]\nclients = {attackers}\nkind = "{kind}"\nscale = {SCALE_OF.get(kind, 20.0)}\n')
        extra = ["--config", str(config), *DEFENCES[setting], *common]
        folder = run(out / f"{kind}-{strategy}-{setting}{suffix}", strategy, extra, args.reuse)
        rows.append((kind, strategy, setting, clean[strategy, setting], accuracy(folder), *measure(folder, kind)))

    print(f"\nattackers: partition(s) {attackers}\n")
    print(
        "| attack | strategy | defences | clean | attacked | minus clean (points) | attacker's cosine | share of span(B) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for kind, strategy, setting, c, a, cos, share in rows:
        share_text = shown(share) if kind in SKETCH_ATTACKS else ""
        print(
            f"| {kind} | {strategy} | {setting} | {c:.4f} | {a:.4f} | {100 * (a - c):+.2f} | {shown(cos)} | {share_text} |"
        )


if __name__ == "__main__":
    main()
