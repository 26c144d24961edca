"""Held-out evaluation of a causal LM: perplexity of the responses, and exact match of
the final number in greedily generated answers (GSM8K-style)."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedlora.ml.instructions import InstructionDataset, final_number, prompt_ids, token_losses
from fedlora.ml.progress import with_progress


@torch.no_grad()
def response_perplexity(
    model: nn.Module, tokenizer, data: InstructionDataset, *, batch_size: int, max_length: int, device="cpu"
) -> tuple[float, float]:
    """(mean negative log-likelihood per response token, its exponential)."""
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        idx = range(start, min(start + batch_size, len(data)))
        inputs, labels = data.batch(tokenizer, idx, max_length, device)
        per_token, counted = token_losses(model(**inputs).logits, labels)
        total += per_token.sum().item()
        count += int(counted.sum().item())
    nll = total / max(count, 1)
    return nll, math.exp(min(nll, 50.0))


@torch.no_grad()
def generate_answers(
    model: nn.Module, tokenizer, prompts: list[str], *, batch_size: int, max_new_tokens: int, device="cpu"
) -> list[str]:
    """Greedy completions, prompts left-padded so that every row continues from its end."""
    model.eval()
    answers = []
    pad = tokenizer.pad_token_id
    starts = range(0, len(prompts), batch_size)
    for start in with_progress(starts, len(starts), "generating answers", unit="batch"):
        rows = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers.extend(tokenizer.decode(row[width:], skip_special_tokens=True) for row in out)
    return answers


def exact_match(answers: list[str], references: list[str]) -> float:
    """Share of answers whose final number equals the reference's."""
    hits = 0
    for answer, reference in zip(answers, references):
        want, got = final_number(reference), final_number(answer)
        hits += want is not None and got is not None and math.isclose(want, got, rel_tol=0, abs_tol=1e-6)
    return hits / max(len(references), 1)


def generation_accuracy(
    model: nn.Module, tokenizer, data: InstructionDataset, *, batch_size: int, max_new_tokens: int, device="cpu"
) -> float:
    answers = generate_answers(
        model, tokenizer, data.prompts, batch_size=batch_size, max_new_tokens=max_new_tokens, device=device
    )
    return exact_match(answers, data.responses)
