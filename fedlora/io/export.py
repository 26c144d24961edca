"""Export an adapter state in PEFT's adapter format (loadable by PeftModel.from_pretrained), or a run as a merged model."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file
from transformers import AutoConfig, PreTrainedConfig

from fedlora.config import RunConfig
from fedlora.io.remote_code import write_mean_pooling_model_files
from fedlora.io.runs import load_run
from fedlora.ml.adapters import ROLE_A, ROLE_HEAD, head_module, merge_lora, role_of
from fedlora.ml.models import load_tokenizer, resolve_model_path, resolve_pooling

PEFT_PREFIX = "base_model.model."


def export_peft_adapter(
    state: dict[str, torch.Tensor], scaling: float, cfg: RunConfig, labels: list[str], out_dir: Path
) -> Path:
    """Write adapter_config.json and adapter_model.safetensors; the head goes under modules_to_save.

    ``state`` is a standard LoRA (A, B and head tensors) whose adapters scale by ``scaling``.
    A mean-pooled classifier's folder also gets the base model's config as the mean-pooled
    model, with the label names, and that model's code (``fedlora/io/remote_code.py``).
    """
    ranks = {state[n].shape[0] for n in state if role_of(n) == ROLE_A}
    if len(ranks) != 1:
        raise ValueError(f"expected one LoRA rank across modules, found {sorted(ranks)}")
    rank = ranks.pop()
    head_modules = sorted({head_module(n, cfg.head_modules) for n in state if role_of(n) == ROLE_HEAD})
    config = LoraConfig(
        r=rank,
        lora_alpha=scaling * rank,  # PEFT scales by lora_alpha / r
        target_modules=sorted(cfg.target_modules),
        modules_to_save=head_modules,
        task_type="CAUSAL_LM" if cfg.task == "causal-lm" else "SEQ_CLS",
        base_model_name_or_path=resolve_model_path(cfg.model, cfg.task),
        lora_dropout=0.0,
        bias="none",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    tensors = {PEFT_PREFIX + n: t.detach().to("cpu", torch.float32).contiguous() for n, t in state.items()}
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    if mean_pooled(cfg):
        write_mean_pooling_model_files(base_classifier_config(cfg, labels), out_dir)
    return out_dir


def mean_pooled(cfg: RunConfig) -> bool:
    return cfg.task == "classify" and resolve_pooling(cfg.model, cfg.pooling) == "mean"


def base_classifier_config(cfg: RunConfig, labels: list[str]) -> PreTrainedConfig:
    """The base model's config for a classifier of ``labels``, as the run's model has it."""
    path = resolve_model_path(cfg.model, cfg.task)
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    return AutoConfig.from_pretrained(path, num_labels=len(labels), id2label=id2label, label2id=label2id)


def export_run(run_dir: str | Path, out_dir: str | Path, merge: bool = False) -> Path:
    """A run's latest global state as a PEFT adapter folder, or with ``merge`` as a full
    model folder that ``transformers`` loads on its own (a mean-pooled classifier with
    ``trust_remote_code=True``)."""

    run = load_run(run_dir)
    out_dir = Path(out_dir)
    if not merge:
        return export_peft_adapter(*run.strategy.export_adapter(run.state), run.cfg, run.labels, out_dir)
    net = run.model()
    merge_lora(net)
    out_dir.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(str(out_dir))
    if mean_pooled(run.cfg):
        write_mean_pooling_model_files(net.config, out_dir)  # replaces config.json
    load_tokenizer(run.cfg.model, run.cfg.task).save_pretrained(str(out_dir))
    return out_dir
