"""Export a global adapter state in PEFT's adapter format (loadable by PeftModel.from_pretrained)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from fedlora.adapters import ROLE_A, ROLE_B, ROLE_HEAD, ROLE_R, head_module, module_of, role_of
from fedlora.config import RunConfig
from fedlora.models import resolve_model_path

PEFT_PREFIX = "base_model.model."


def fold_r(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fed-SB's B @ R @ A as a standard LoRA pair: B' = B @ R, A unchanged."""
    out = {n: t for n, t in state.items() if role_of(n) != ROLE_R}
    for name, r in state.items():
        if role_of(name) == ROLE_R:
            b_name = f"{module_of(name)}.{ROLE_B}.weight"
            out[b_name] = state[b_name] @ r
    return out


def export_peft_adapter(state: dict[str, torch.Tensor], cfg: RunConfig, num_labels: int, out_dir: Path) -> Path:
    """Write adapter_config.json and adapter_model.safetensors; the head goes under modules_to_save."""
    from peft import LoraConfig

    state = fold_r(state)
    ranks = {state[n].shape[0] for n in state if role_of(n) == ROLE_A}
    if len(ranks) != 1:
        raise ValueError(f"expected one LoRA rank across modules, found {sorted(ranks)}")
    rank = ranks.pop()
    head_modules = sorted({head_module(n, cfg.head_modules) for n in state if role_of(n) == ROLE_HEAD})
    config = LoraConfig(
        r=rank,
        # keep the scaling alpha/r of training even when the exported rank differs
        lora_alpha=cfg.lora_alpha * rank / cfg.rank,
        target_modules=sorted(cfg.target_modules),
        modules_to_save=head_modules,
        task_type="SEQ_CLS",
        base_model_name_or_path=resolve_model_path(cfg.model),
        lora_dropout=0.0,
        bias="none",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    tensors = {PEFT_PREFIX + n: t.detach().to("cpu", torch.float32).contiguous() for n, t in state.items()}
    save_file(tensors, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir
