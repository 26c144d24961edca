"""Instruction/response pairs for causal-LM tuning: reading, prompting, batches, loss.

The loss covers the response tokens only (and the end-of-turn token that closes
them): the model learns to answer, not to repeat questions. Prompts go through the
tokenizer's chat template when it has one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fedlora.errors import UserError
from fedlora.ml.data import read_table

PROMPT_FIELDS = ("instruction", "prompt", "question")
RESPONSE_FIELDS = ("response", "output", "answer", "completion")
IGNORE = -100  # label of a token that is not trained on


@dataclass
class InstructionDataset:
    prompts: list[str]
    responses: list[str]
    label_names: list[str] = field(default_factory=list)  # none: nothing to classify

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def labels(self) -> list[int]:
        """One pseudo-label: splits and Dirichlet partitions then act on sizes only."""
        return [0] * len(self.prompts)

    def rows(self) -> list[tuple[str, str]]:
        """Each example as parsed: its prompt and its response."""
        return list(zip(self.prompts, self.responses))

    def subset(self, indices) -> InstructionDataset:
        return InstructionDataset([self.prompts[i] for i in indices], [self.responses[i] for i in indices])

    def batch(
        self, tokenizer, indices, max_length: int, device="cpu", pad_to_max: bool = False
    ) -> tuple[dict, torch.Tensor]:
        rows = [encode_pair(tokenizer, self.prompts[i], self.responses[i], max_length) for i in indices]
        width = max_length if pad_to_max else max((len(ids) for ids, _ in rows), default=1)
        pad = tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for r, (row_ids, row_labels) in enumerate(rows):
            ids[r, : len(row_ids)] = torch.tensor(row_ids)
            mask[r, : len(row_ids)] = 1
            labels[r, : len(row_labels)] = torch.tensor(row_labels)
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}, labels.to(device)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean over each sample's own response tokens, then over the batch."""
        per_token, counted = token_losses(logits, labels)
        return (per_token.sum(1) / counted.sum(1).clamp(min=1)).mean()


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy at every position (0 where not trained) and the mask of trained positions."""
    logits, targets = logits[:, :-1].float(), labels[:, 1:]
    counted = targets != IGNORE
    per_token = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(targets.shape)
    return per_token * counted, counted


def prompt_text(tokenizer, prompt: str) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
    return f"Question: {prompt}\nAnswer: "


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    templated = bool(getattr(tokenizer, "chat_template", None))  # the template writes its own special tokens
    return tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=not templated)["input_ids"]


def encode_pair(tokenizer, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + response + end token, and labels that train the response only.

    Too long: the prompt loses its beginning first (down to half the budget), then the
    response its end.
    """
    p = prompt_ids(tokenizer, prompt)
    r = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(p) + len(r) > max_length:
        p = p[-max(max_length - len(r), max_length // 2) :]
    ids = (p + r)[:max_length]
    labels = ([IGNORE] * len(p) + r)[:max_length]
    return ids, labels


def load_instruction_file(path: str | Path, prompt_column: str = "", response_column: str = "") -> InstructionDataset:
    """JSONL, CSV, TSV, Parquet or a datasets folder of prompt/response pairs.

    Empty column names pick the first present of the usual names, so instruction/response,
    prompt/completion and GSM8K's question/answer files work as they are. An ``input``
    column (Alpaca) is appended to the instruction.
    """
    table = read_table(path)
    columns = table.column_names
    prompt_col = prompt_column or next((c for c in PROMPT_FIELDS if c in columns), "")
    response_col = response_column or next((c for c in RESPONSE_FIELDS if c in columns), "")
    for given, col, usual in (
        (prompt_column, prompt_col, PROMPT_FIELDS),
        (response_column, response_col, RESPONSE_FIELDS),
    ):
        if not col or col not in columns:
            wanted = repr(given) if given else "one of " + "/".join(usual)
            raise UserError(f"{path}: no column {wanted} (columns: {', '.join(columns)})")
    prompts, responses = list(table[prompt_col]), list(table[response_col])
    if any(v is None or str(v).strip() == "" for v in prompts + responses):
        raise UserError(f"{path}: empty values in column {prompt_col!r} or {response_col!r}")
    if "input" in columns and prompt_col == "instruction":
        prompts = [f"{p}\n\n{x}" if x else p for p, x in zip(prompts, table["input"])]
    if not prompts:
        raise UserError(f"{path} holds no examples")
    return InstructionDataset([str(p) for p in prompts], [str(r) for r in responses])


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """The answer's final number: after GSM8K's ``####`` when present, else the last one."""
    if "####" in text:
        text = text.split("####")[-1]
    found = _NUMBER.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None
