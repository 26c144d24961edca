"""Simulated hostile clients, for tests and benchmarks only: never part of an agent.

A config file's ``[attack]`` table names the clients (partition ids), the kind and a
scale; ``fedlora simulate`` then runs the ordinary ClientApp wrapped in a Flower mod
that rewrites those clients' replies after honest training:

- ``scale``: the honest change, ``scale`` times larger (g + scale·(u − g));
- ``claim-examples``: the honest update, claiming 10**12 examples: uncapped, the global
  model becomes this one client's;
- ``flora-rank1``: FLoRA, one rank-1 pair per module along the honest update's top
  direction, ``scale`` times its strength, using scaling alpha/1;
- ``init-sketch``: Fed-SB, its initialisation sketches' U S multiplied by ``scale``;
- ``nan``: a NaN in the first tensor;
- ``oversized``: an extra tensor that takes the payload past ``max_update_mb``;
- ``steer``: the client trains again from the same global state, with the same local
  steps, on its data with every label mapped to class ``STEER_CLASS`` (all colluders pick
  the same one), and sends that change rescaled until its effect norm is ``MARGIN`` x the
  bound it can estimate (the run's ``robust_norm_multiple`` x its own honest update's effect
  norm: the coordinator's reference is a median of honest-looking norms), claiming 10**12
  examples; with the norm bound off it sends the steered change as trained;
- ``sketch-capture``: Fed-SB's initialisation, a sketch with a flat spectrum over its r
  slots along directions orthogonal to its own honest sketch's (U and V both), its effect
  norm ``MARGIN`` x the run's multiple x the honest sketch's (1 x with the bound off),
  claiming 10**12 examples: undefended, it becomes most of the frozen B. Colluders draw
  the directions from the run's seed, so theirs nearly coincide.

``scale`` is unused by ``steer`` and ``sketch-capture``. For the benchmark, an attacker
records what it received and sent (``record_attack``) in its simulation folder.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors.torch import save_file

from fedlora.client.handler import HELD, read_request, start_local_run, train, train_reply
from fedlora.config import RunConfig
from fedlora.flower.messages import FACTS, PHASE_INIT, RECORD, RunFacts
from fedlora.io import wire
from fedlora.ml.adapters import ROLE_A, ROLE_B, role_of
from fedlora.ml.data import TextDataset
from fedlora.strategies import build_strategy
from fedlora.strategies.base import AdapterStrategy, State, lora_deltas
from fedlora.strategies.fedsb import GRAD_U, GRAD_V

CLAIMED_EXAMPLES = wire.MAX_EXAMPLES  # the most the decoder lets through: the weight cap must stop it
STEER_CLASS = 0  # every colluder's target: they agree without talking
MARGIN = 0.99  # how far under the estimated bound the bounded attacks aim
RESCALE_TRIES = 30
RECORDS = "attack"  # <client_state_dir>/<partition>/attack/: what an attacker received and sent
UNRECORDED = ("nan", "oversized")  # nothing to measure in them


def _scaled_change(tensors: State, received: State, scale: float) -> State:
    return {n: received[n] + scale * (t - received[n]) if n in received else scale * t for n, t in tensors.items()}


def _rank1(tensors: State, alpha: float, scale: float) -> State:
    out = {n: t for n, t in tensors.items() if role_of(n) not in (ROLE_A, ROLE_B)}
    for m, dense in lora_deltas(tensors, alpha).items():
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        c = (scale * float(s[0]) / alpha) ** 0.5
        out[f"{m}.{ROLE_A}.weight"] = (c * vh[:1]).to(torch.float32)
        out[f"{m}.{ROLE_B}.weight"] = (c * u[:, :1]).to(torch.float32)
    return out


def estimated_bound(cfg: RunConfig, honest_norm: float) -> float | None:
    """The norm bound an attacker can estimate from its own honest update (None: bound off)."""
    return cfg.robust_norm_multiple * honest_norm if cfg.robust_norm_multiple > 0 else None


def rescaled(strategy: AdapterStrategy, global_state: State, tensors: State, target: float) -> State:
    """``tensors`` moved along their change from ``global_state`` (shrunk or stretched) until
    the strategy's effect norm is ``target``. The first step is exact for an effect linear in
    what is sent; a product of two trained factors (FedAvg) takes damped steps after it."""
    if target <= 0.0:
        return strategy.shrink(global_state, tensors, 0.0)
    factor, out = 1.0, tensors
    for i in range(RESCALE_TRIES):
        norm = strategy.effect_norm(global_state, out)
        if norm == 0.0 or abs(norm / target - 1.0) < 1e-4:
            break
        factor *= (target / norm) ** (1.0 if i == 0 else 0.5)
        out = strategy.shrink(global_state, tensors, factor)
    return out


def _steered(cfg: RunConfig, honest: State, steered: State, received: State) -> State:
    strategy = build_strategy(cfg)
    bound = estimated_bound(cfg, strategy.effect_norm(received, honest))
    return steered if bound is None else rescaled(strategy, received, steered, MARGIN * bound)


def _complement_basis(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """As many orthonormal columns as ``x`` has, orthogonal to span(x) as far as its height allows."""
    q = torch.linalg.qr(x).Q
    z = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    for _ in range(2):  # twice: orthogonal to float precision
        z = z - q @ (q.T @ z)
    return torch.linalg.qr(z).Q


def capture_sketch(cfg: RunConfig, tensors: State) -> State:
    """Fed-SB's LoRA-SB initialisation captured: per module, orthonormal U and V orthogonal to
    the honest sketch's, a flat spectrum whose norm is MARGIN x the run's multiple x the honest
    sketch's. A truncated SVD in form, so ``FedSB.check_init`` accepts it."""
    reach = MARGIN * (cfg.robust_norm_multiple if cfg.robust_norm_multiple > 0 else 1.0)
    gen = torch.Generator().manual_seed(cfg.seed)  # the colluders' shared directions
    out = dict(tensors)
    for name in sorted(n for n in tensors if n.endswith(GRAD_U)):
        module = name[: -len(GRAD_U)]
        us, v = tensors[name].to(torch.float64), tensors[f"{module}{GRAD_V}"].to(torch.float64)
        level = reach * float(us.norm()) / us.shape[1] ** 0.5
        out[name] = (level * _complement_basis(us, gen)).to(torch.float32)
        out[f"{module}{GRAD_V}"] = _complement_basis(v, gen).to(torch.float32)
    return out


def attacked_payload(cfg: RunConfig, reply: bytes, received: State, steered: State | None = None) -> bytes:
    """The reply ``cfg.attack_kind`` makes of an honest one. ``received``: the global state
    the client trained from (with what it holds); ``steered``: for ``steer``, what it trained
    towards its wrong target."""
    payload = wire.decode(reply)
    tensors, claimed, kind, scale = payload.tensors, payload.num_examples, cfg.attack_kind, cfg.attack_scale
    if payload.kind == "init":
        if kind == "init-sketch":
            tensors = {n: t * scale if n.endswith(GRAD_U) else t for n, t in tensors.items()}
        elif kind == "sketch-capture":
            tensors, claimed = capture_sketch(cfg, tensors), CLAIMED_EXAMPLES
    elif kind == "scale":
        tensors = _scaled_change(tensors, received, scale)
    elif kind == "claim-examples":
        claimed = CLAIMED_EXAMPLES
    elif kind == "flora-rank1":
        tensors = _rank1(tensors, cfg.lora_alpha, scale)
    elif kind == "steer":
        if steered is None:
            raise ValueError("a steer attack needs the steered update")
        tensors, claimed = _steered(cfg, tensors, steered, received), CLAIMED_EXAMPLES
    if kind == "nan":
        first = next(iter(tensors))
        tensors = {**tensors, first: torch.full_like(tensors[first], float("nan"))}
    if kind == "oversized":
        tensors = {**tensors, "oversized.weight": torch.zeros(cfg.max_update_mb * 1024 * 1024 // 4 + 1)}
    return wire.encode(
        tensors,
        kind=payload.kind,
        strategy=payload.strategy,
        round_num=payload.round,
        num_examples=claimed,
        metrics=payload.metrics,
        dp=payload.dp,
    )


def steered_update(msg: Message, context: Context) -> State:
    """What this client sends after training from the same global state, with the same local
    steps and batches, on its data with every label ``STEER_CLASS``; without DP noise (an
    attacker spends no budget on it). The handler's own pieces, with the data relabelled."""
    req = read_request(msg, context, deployed=False)
    data = req.setup.data
    if not isinstance(data, TextDataset):
        raise ValueError("a steer attack needs a classification task")
    req.setup = replace(req.setup, data=replace(data, labels=[STEER_CLASS] * len(data)), dp_epsilon=None)
    content = train_reply(req, start_local_run(req, context), context, time.perf_counter())
    return wire.decode(content[RECORD]["payload"]).tensors


def held_state(context: Context, received: State) -> State:
    """The global state a client trained from: what it holds (frozen A, B) under what it received."""
    if HELD not in context.state.config_records:
        return received
    return {**wire.decode(context.state.config_records[HELD]["blob"]).tensors, **received}


def record_attack(folder: Path, name: str, received: State, sent: State) -> None:
    """One message's global state and attacker reply, for simulations/attack_benchmark.py."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"global/{n}": t for n, t in received.items()} | {f"sent/{n}": t for n, t in sent.items()}
    save_file({n: t.detach().to("cpu", torch.float32).contiguous() for n, t in tensors.items()}, folder / name)


def attack_mod(msg: Message, context: Context, call_next) -> Message:
    """A Flower mod: the named clients' replies are rewritten after honest training."""
    reply = call_next(msg, context)
    record = msg.content.config_records.get(RECORD)
    if record is None or reply.has_error():
        return reply
    cfg = RunConfig.from_dict(json.loads(record["run_config"]))
    pid = int(context.node_config["partition-id"])
    if pid not in cfg.attack_clients:
        return reply
    out = reply.content.config_records.get(RECORD)
    if out is None or "payload" not in out:  # declined
        return reply
    init = record.get("phase") == PHASE_INIT
    received = held_state(context, wire.decode(record["payload"]).tensors)
    steered = steered_update(msg, context) if cfg.attack_kind == "steer" and not init else None
    out["payload"] = attacked_payload(cfg, out["payload"], received, steered)
    facts = RunFacts.from_json(str(record.get(FACTS, "{}")))
    if facts.client_state_dir and cfg.attack_kind not in UNRECORDED:
        name = "init.safetensors" if init else f"round-{int(record['round'])}.safetensors"
        sent = wire.decode(out["payload"]).tensors
        record_attack(Path(facts.client_state_dir) / str(pid) / RECORDS, name, received, sent)
    return reply


def attacking_client_app() -> ClientApp:
    """The production ClientApp's handler behind ``attack_mod``."""
    app = ClientApp(mods=[attack_mod])
    app.train()(train)
    return app


app = attacking_client_app()  # ``fedlora.flower.attacks:app``: the ClientApp of a simulation under attack
