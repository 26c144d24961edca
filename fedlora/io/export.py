"""Export an adapter state in PEFT's adapter format (loadable by PeftModel.from_pretrained)."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import save_file

from fedlora.config import RunConfig
from fedlora.errors import UserError
from fedlora.io.runs import load_run
from fedlora.ml.adapters import ROLE_A, ROLE_HEAD, head_module, merge_lora, role_of
from fedlora.ml.models import load_tokenizer, resolve_model_path

PEFT_PREFIX = "base_model.model."


def unexportable_reason(cfg: RunConfig) -> str | None:
    """Why neither a PEFT adapter nor a transformers model folder can hold this run's model, or None.

    Both rebuild BERT's classifier on its pooler: a mean-pooled run would load without an
    error and classify differently from the run.
    """
    if cfg.pooling != "pooler":
        return f"its classifier reads the mean of the token states (--pooling {cfg.pooling}), which PEFT's and transformers' BERT classifier cannot express"
    return None


def export_peft_adapter(state: dict[str, torch.Tensor], scaling: float, cfg: RunConfig, out_dir: Path) -> Path:
    """Write adapter_config.json and adapter_model.safetensors; the head goes under modules_to_save.

    ``state`` is a standard LoRA (A, B and head tensors) whose adapters scale by ``scaling``.
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
    return out_dir


def export_run(run_dir: str | Path, out_dir: str | Path, merge: bool = False) -> Path:
    """A run's latest global state as a PEFT adapter folder, or with ``merge`` as a full
    model folder that ``transformers`` loads on its own."""

    run = load_run(run_dir)
    reason = unexportable_reason(run.cfg)
    if reason is not None:
        raise UserError(f"cannot export {run_dir}: {reason}; evaluate it with fedlora eval instead")
    out_dir = Path(out_dir)
    if not merge:
        return export_peft_adapter(*run.strategy.export_adapter(run.state), run.cfg, out_dir)
    net = run.model()
    merge_lora(net)
    out_dir.mkdir(parents=True, exist_ok=True)
    net.save_pretrained(str(out_dir))
    load_tokenizer(run.cfg.model, run.cfg.task).save_pretrained(str(out_dir))
    return out_dir
