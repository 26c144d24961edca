"""One run's task, shared by coordinator and clients: its data splits and its adapted model.

Both are cached per process, so a simulation worker loads the base model and the data
once and reuses them for every client and round it serves.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fedlora.config import RunConfig
from fedlora.errors import UserError
from fedlora.ml.adapters import LoRASpec, adapter_state, head_module, inject_lora, matches_target, reshape_adapters
from fedlora.ml.data import TextDataset, load_bbc_news, load_text_file, partition_indices, stratified_split
from fedlora.ml.instructions import InstructionDataset, load_instruction_file
from fedlora.ml.models import load_base_model, load_tokenizer, model_skeleton
from fedlora.ml.quantize import quantize_linears


@dataclass
class Splits:
    train: TextDataset | InstructionDataset
    test: TextDataset | InstructionDataset
    partitions: list[list[int]]  # indices into train, one list per client

    @property
    def label_names(self) -> list[str]:
        return self.train.label_names


def data_key(cfg: RunConfig) -> str:
    """The config fields that decide the data splits, as a hashable cache key."""
    keys = (
        "task",
        "data",
        "text_column",
        "label_column",
        "prompt_column",
        "response_column",
        "eval_data",
        "test_fraction",
        "seed",
        "partition",
        "alpha",
        "clients",
    )
    return json.dumps({k: getattr(cfg, k) for k in keys}, sort_keys=True)


def load_splits(cfg: RunConfig) -> Splits:
    return _load_splits(data_key(cfg))


@functools.lru_cache(maxsize=4)
def _load_splits(key: str) -> Splits:
    cfg = RunConfig.from_dict(json.loads(key))
    full = load_task_data(cfg, cfg.data)
    if cfg.eval_data is not None:
        train = full
        test = load_task_data(cfg, cfg.eval_data)
        if test.label_names != train.label_names:
            raise UserError("the evaluation file's labels differ from the training file's")
    else:
        if len(full) < 2:
            raise UserError("need at least 2 examples to hold one out for evaluation")
        tr, te = stratified_split(full.labels, cfg.test_fraction, cfg.seed)
        train, test = full.subset(tr), full.subset(te)
    if cfg.task == "classify" and len(train.label_names) < 2:
        raise UserError("need at least 2 distinct labels for classification")
    parts = partition_indices(train.labels, cfg.clients, cfg.partition, cfg.alpha, cfg.seed)
    return Splits(train, test, parts)


def load_task_data(cfg: RunConfig, path: str | None) -> TextDataset | InstructionDataset:
    """Labelled text to classify, or prompt/response pairs for a causal LM."""
    if cfg.task == "causal-lm":
        if path is None:
            raise UserError("--task causal-lm needs --data: a JSONL/CSV/Parquet file of prompt/response pairs")
        return load_instruction_file(path, cfg.prompt_column, cfg.response_column)
    return load_bbc_news() if path is None else load_text_file(path, cfg.text_column, cfg.label_column)


def lora_spec(cfg: RunConfig, with_r: bool = False) -> LoRASpec:
    return LoRASpec(
        rank=cfg.rank,
        alpha=cfg.lora_alpha,
        target_modules=tuple(cfg.target_modules),
        with_r=with_r,
        head_modules=tuple(cfg.head_modules),
    )


def adapted_model(
    model: str | None,
    num_labels: int,
    spec: LoRASpec,
    task: str = "classify",
    pooling: str = "auto",
    quantize: str = "none",
    device: torch.device | str = "cpu",
) -> nn.Module:
    """The base model with adapters of ``spec``'s shape; callers load adapter state before use.

    One model per process and base: a change of rank only swaps the small adapter pieces.
    With ``quantize`` (4bit, 8bit) the frozen base is quantized as it moves to ``device``
    (``fedlora.ml.quantize``); the adapters and head stay fp32.
    """
    where = str(torch.device(device)) if quantize != "none" else "cpu"  # an fp32 model is moved by the caller
    net = _injected_model(model, num_labels, spec.target_modules, spec.head_modules, task, pooling, quantize, where)
    reshape_adapters(net, spec)
    return net


@functools.lru_cache(maxsize=2)
def _injected_model(
    model: str | None,
    num_labels: int,
    targets: tuple[str, ...],
    heads: tuple[str, ...],
    task: str = "classify",
    pooling: str = "auto",
    quantize: str = "none",
    device: str = "cpu",
) -> nn.Module:
    net = load_base_model(model, task, num_labels, pooling)
    if quantize != "none":
        quantize_linears(net, quantize, keep=heads, device=device)
        net.to(device)
    try:
        inject_lora(net, LoRASpec(rank=1, alpha=1.0, target_modules=targets, head_modules=heads))
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return net


@functools.lru_cache(maxsize=4)
def target_shapes(model: str | None, task: str, pooling: str, targets: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """(d_out, d_in) of every layer ``targets`` adapt, from the model's skeleton (no weights loaded)."""
    net = model_skeleton(model, task, 2, pooling)
    names = [name for name, m in net.named_modules() if isinstance(m, nn.Linear) and matches_target(name, targets)]
    return tuple((net.get_submodule(n).out_features, net.get_submodule(n).in_features) for n in names)


def check_target_modules(cfg: RunConfig, num_labels: int) -> None:
    """Fail fast when ``--target-modules`` names a layer the model (as pooled) lacks."""
    net = model_skeleton(cfg.model, cfg.task, num_labels, cfg.pooling)
    try:
        inject_lora(net, LoRASpec(rank=1, alpha=1.0, target_modules=tuple(cfg.target_modules)))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def initial_adapter_state(
    model: str | None, num_labels: int, spec: LoRASpec, seed: int, task: str = "classify", pooling: str = "auto"
):
    """The round-0 global state: seeded A and head, zero B.

    Built on a freshly loaded model, not the per-process cache: a cached model carries the
    head (BERT's pooler) of whatever run it last served, and a second run in the same
    process would otherwise start from the first one's trained pooler.
    """
    net = _injected_model.__wrapped__(model, num_labels, spec.target_modules, spec.head_modules, task, pooling)
    reshape_adapters(net, spec)
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if hasattr(m, "reset_adapter"):
            m.reset_adapter(gen)
    # new layers (the classifier) start small; pretrained ones (BERT's pooler) keep their weights
    head = [p for n, p in net.named_parameters() if head_module(n, ("classifier", "score")) is not None]
    with torch.no_grad():
        for p in head:
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.zero_()
    return adapter_state(net)


@functools.lru_cache(maxsize=2)
def tokenizer_for(model: str | None, task: str = "classify"):
    return load_tokenizer(model, task)


def write_partitions(cfg: RunConfig, out: str | Path) -> list[Path]:
    """One JSONL file per client from the training split (the same split and partition a
    simulation with these settings uses); the held-out rows stay out of every file."""
    splits = load_splits(cfg)
    train = splits.train
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, indices in enumerate(splits.partitions, start=1):
        path = out / f"client-{i}.jsonl"
        if isinstance(train, InstructionDataset):
            rows = (json.dumps({"prompt": train.prompts[j], "response": train.responses[j]}) for j in indices)
        else:
            rows = (json.dumps({"text": train.texts[j], "label": train.label_names[train.labels[j]]}) for j in indices)
        path.write_text("".join(row + "\n" for row in rows))
        paths.append(path)
    return paths
