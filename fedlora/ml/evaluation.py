"""Central evaluation of the global model on held-out examples, per task.

Classification: accuracy and cross-entropy. Causal LM: mean response-token NLL and
perplexity each round; the final evaluation also generates answers and scores the
exact match of their final number (generation is the expensive part, so rounds skip it).
"""

from __future__ import annotations

import random

import torch
from torch import nn

from fedlora.config import RunConfig
from fedlora.ml.generation import generation_accuracy, response_perplexity
from fedlora.ml.training import evaluate


def evaluation_device() -> str:
    """Where the global model is evaluated: the coordinator's GPU when it has one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def seeded_slice(examples, size: int, seed: int):
    """A seeded random slice (not the first rows, which may all share a label); size 0: all."""
    if 0 < size < len(examples):
        return examples.subset(sorted(random.Random(seed).sample(range(len(examples)), size)))
    return examples


def evaluate_global_model(model: nn.Module, tokenizer, cfg: RunConfig, examples, *, final: bool, device="cpu") -> dict:
    """``accuracy`` (None for a causal LM between rounds), ``loss``, and ``perplexity`` for a causal LM."""
    if cfg.task != "causal-lm":
        accuracy, loss = evaluate(
            model, tokenizer, examples, batch_size=cfg.eval_batch_size, max_length=cfg.max_length, device=device
        )
        return {"accuracy": accuracy, "loss": loss}

    nll, perplexity = response_perplexity(
        model, tokenizer, examples, batch_size=cfg.eval_batch_size, max_length=cfg.max_length, device=device
    )
    result = {"accuracy": None, "loss": nll, "perplexity": perplexity}
    if final:
        answered = seeded_slice(examples, cfg.generation_eval_examples, cfg.seed)
        result["accuracy"] = generation_accuracy(
            model, tokenizer, answered, batch_size=cfg.eval_batch_size, max_new_tokens=cfg.max_new_tokens, device=device
        )
        result["generation_examples"] = len(answered)
    return result
