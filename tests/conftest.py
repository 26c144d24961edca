import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification


def make_tiny_bert(dropout: float = 0.1) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=3,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    model = BertForSequenceClassification(config)
    model.eval()
    return model


@pytest.fixture
def tiny_bert() -> BertForSequenceClassification:
    """A randomly initialised, very small BERT classifier: same module names as the default model."""
    return make_tiny_bert()


@pytest.fixture
def tiny_inputs() -> dict:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (4, 12), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture(scope="session")
def mean_pooled_run(tmp_path_factory):
    """A short FFA-LoRA run of the default model under DP with --pooling mean (the pooling DP needs)."""
    from fedlora.cli import main

    out = tmp_path_factory.mktemp("mean") / "run"
    args = [
        "simulate",
        "--strategy",
        "ffa",
        "--pooling",
        "mean",
        "--clients",
        "2",
        "--rounds",
        "2",
        "--local-steps",
        "2",
        "--batch-size",
        "8",
        "--max-length",
        "32",
        "--eval-max-examples",
        "16",
        "--dp-epsilon",
        "8",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    return out


@pytest.fixture(scope="session")
def tracked_run(tmp_path_factory):
    """A real 2-client, 2-round simulation with ``--track tensorboard``: its folder (about a minute)."""
    from fedlora.cli import main  # lazy: only the tests that need a run import the package's CLI

    out = tmp_path_factory.mktemp("tracked") / "run"
    assert main([*TINY_RUN_ARGS, "--track", "tensorboard", "--out", str(out)]) == 0
    return out


@pytest.fixture
def inside_a_flower_run(monkeypatch):
    """Flower builds Messages only inside a run: give the process a run, node and task id."""
    from flwr.supercore.task_identity import TaskIdentity

    for field in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, field, 1)


@pytest.fixture
def data_file(tmp_path):
    """An agent's own labelled JSONL file: 24 articles of the embedded training split."""
    import json

    from fedlora.config import RunConfig
    from fedlora.ml.task import load_splits

    splits = load_splits(RunConfig())
    path = tmp_path / "mine.jsonl"
    rows = [
        {"text": t, "label": splits.label_names[y]} for t, y in zip(splits.train.texts[:24], splits.train.labels[:24])
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


# a 2-client, 2-round simulation of a few steps: the small run the tracking tests log
TINY_RUN_ARGS = ["simulate", "--clients", "2", "--rounds", "2", "--local-steps", "1", "--batch-size", "8"]
TINY_RUN_ARGS += ["--round-eval-examples", "16", "--eval-max-examples", "40", "--max-length", "32"]
