"""Quantized frozen base models (QLoRA-style) through bitsandbytes: 4-bit NF4 or 8-bit LLM.int8.

Every ``nn.Linear`` of the base model outside the trained head (and the output embedding,
which a decoder ties to its input embedding) becomes a bitsandbytes ``Linear4bit`` or
``Linear8bitLt``: both are ``nn.Linear`` subclasses, so LoRA injection wraps them like any
linear layer, and the adapters and the head stay fp32 parameters. Their weights are
frozen and stay quantized; only Fed-SB's initialisation gradient needs a full weight,
and gets a temporary fp32 copy (``plain_linear``).

bitsandbytes is an optional dependency (``pip install 'fedlora[quantize]'``); its CPU
backend serves both kinds on torch's CPU build, slowly, which the tests use.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fedlora.errors import UserError

KINDS = ("4bit", "8bit")
QUANTIZED = "fedlora_quantized"  # attribute on a quantized layer: its kind
LLM_INT8_THRESHOLD = 6.0  # activations above it take the fp16 path (LLM.int8's outlier decomposition)
INSTALL = "pip install 'fedlora[quantize]'"


def _bitsandbytes():
    import bitsandbytes  # lazy: an optional dependency, needed only with --quantize

    return bitsandbytes


@functools.cache
def quantization_problem(kind: str, device: str = "cpu") -> str | None:
    """Why ``kind`` cannot be used on ``device`` here, or None: a tiny layer is quantized
    and trained through, so a backend without the kernels says so before a run starts."""
    if kind not in KINDS:
        return f"unknown quantization {kind!r}: choose none, {' or '.join(KINDS)}"
    try:
        bnb = _bitsandbytes()
    except Exception as exc:  # ImportError, or a broken native library
        return f"--quantize {kind} needs bitsandbytes ({INSTALL}): {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    try:
        probe = nn.Sequential(nn.Linear(64, 64))
        quantize_linears(probe, kind, device=device)
        probe.train()
        x = torch.randn(2, 64, device=device, requires_grad=True)
        probe(x).sum().backward()
        if x.grad is None or not torch.isfinite(x.grad).all():
            raise RuntimeError("no finite gradient through the quantized layer")
        dequantized_weight(probe[0])
    except Exception as exc:
        line = str(exc).strip().splitlines()
        return f"bitsandbytes {bnb.__version__} cannot train through a {kind} layer on {device}: {line[0] if line else type(exc).__name__}"
    return None


def _quantized_layer(layer: nn.Linear, kind: str) -> nn.Linear:
    """A bitsandbytes layer holding ``layer``'s weight, not yet quantized (that happens on ``.to``)."""
    bnb = _bitsandbytes()
    bias = layer.bias is not None
    weight = layer.weight.detach().to("cpu", torch.float32)
    if kind == "4bit":
        with torch.device("meta"):  # no throw-away fp32 weight of its own
            q = bnb.nn.Linear4bit(
                layer.in_features, layer.out_features, bias=bias, compute_dtype=torch.float32, quant_type="nf4"
            )
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=q)
        # one weight layout: bitsandbytes would repack weights for its CPU inference kernel
        # at the first no-grad forward in eval mode, and that layout has no training path
        q.support_avx512bf16_for_cpu = False
    else:
        with torch.device("meta"):
            q = bnb.nn.Linear8bitLt(
                layer.in_features, layer.out_features, bias=bias, has_fp16_weights=False, threshold=LLM_INT8_THRESHOLD
            )
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias:
        q.bias = nn.Parameter(layer.bias.detach().to("cpu", torch.float32).clone(), requires_grad=False)
    setattr(q, QUANTIZED, kind)
    return q


def _kept(name: str, keep: tuple[str, ...]) -> bool:
    """In a kept (head) module, or a piece of an adapter (called after injection)."""
    return any(part in keep or part.startswith("lora_") for part in name.split("."))


def quantize_linears(
    model: nn.Module, kind: str, keep: tuple[str, ...] = (), device: torch.device | str = "cpu"
) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` outside the modules named in ``keep`` (the
    trained head) and its output embedding with a quantized, frozen one on ``device``
    (bitsandbytes quantizes as the weight moves there). Returns the replaced paths."""
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    names = [
        name
        for name, m in model.named_modules()
        if type(m) is nn.Linear and m is not output and name and not _kept(name, keep)
    ]
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, leaf, _quantized_layer(getattr(parent, leaf), kind).to(device))
    return names


def is_quantized(layer: nn.Module) -> bool:
    return getattr(layer, QUANTIZED, None) is not None


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The fp32 weight a quantized layer computes with (d_out x d_in), on its device."""
    bnb = _bitsandbytes()
    weight = layer.weight
    if getattr(layer, QUANTIZED) == "4bit":
        return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    # Linear8bitLt moves its row scales from the weight to its matmul state at its first forward
    scales = weight.SCB if getattr(weight, "SCB", None) is not None else layer.state.SCB
    return bnb.functional.int8_vectorwise_dequant(weight.data, scales).to(torch.float32)


def plain_linear(layer: nn.Module) -> nn.Linear:
    """An fp32 ``nn.Linear`` with a quantized layer's dequantized weight and its bias."""
    weight = dequantized_weight(layer)
    plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device)
    with torch.no_grad():
        plain.weight.copy_(weight)
        if layer.bias is not None:
            plain.bias.copy_(layer.bias.to(torch.float32))
    return plain


def require_quantization(kind: str, device: str) -> None:
    """Raise UserError unless ``kind`` (none, 4bit, 8bit) trains on ``device`` (cpu, cuda, or
    auto: CUDA when present) here: a run or an agent refuses before anything starts."""
    if kind == "none":
        return
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    problem = quantization_problem(kind, device)
    if problem is not None:
        raise UserError(problem)
