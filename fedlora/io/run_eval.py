"""``fedlora eval``: a run folder, a PEFT adapter folder or a merged model folder, on a labelled file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

from fedlora.errors import UserError
from fedlora.io.remote_code import folder_labels, is_mean_pooling_folder, load_mean_pooling_model
from fedlora.io.runs import is_run_dir, load_run
from fedlora.ml.data import TextDataset, load_text_file
from fedlora.ml.evaluation import evaluate_global_model
from fedlora.ml.instructions import load_instruction_file
from fedlora.ml.models import load_classifier, load_tokenizer
from fedlora.ml.training import evaluate


def load_for_eval(path: str | Path) -> tuple[nn.Module, object, list[str] | None, int]:
    """(model, tokenizer, label names or None, max_length) for any of the three folder kinds."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"not a folder: {path}")
    if is_run_dir(path):
        run = load_run(path)
        return run.model(), load_tokenizer(run.cfg.model), run.labels, run.cfg.max_length
    if (path / "adapter_config.json").is_file():
        return _load_adapter(path)
    if is_mean_pooling_folder(path):  # a merged mean-pooled export, read without running its code
        return load_mean_pooling_model(path), load_tokenizer(str(path)), folder_labels(path), 128
    if (path / "config.json").is_file():
        model = load_classifier(str(path), None)
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        return model, load_tokenizer(str(path)), labels, 128
    raise UserError(f"{path} is neither a fedlora run, a PEFT adapter nor a model folder")


def _load_adapter(path: Path) -> tuple[nn.Module, object, list[str] | None, int]:
    """A PEFT classifier adapter on its base model; a mean-pooled one's folder names the labels."""
    try:
        config = json.loads((path / "adapter_config.json").read_text())
        weights = load_file(str(path / "adapter_model.safetensors"))
    except Exception as exc:
        raise UserError(f"unreadable adapter in {path}: {exc}") from None
    heads = [t for n, t in weights.items() if n.endswith("classifier.weight") or n.endswith("score.weight")]
    if not heads:
        raise UserError(f"adapter in {path} has no classification head")
    base = config.get("base_model_name_or_path")
    mean = is_mean_pooling_folder(path)
    net = load_classifier(base, heads[0].shape[0], "mean" if mean else "pooler")
    model = PeftModel.from_pretrained(net, str(path))
    return model.eval(), load_tokenizer(base), folder_labels(path) if mean else None, 128


def align_labels(data: TextDataset, model_labels: list[str] | None) -> TextDataset:
    """Map the file's labels onto the model's label indices by name."""
    if model_labels is None:
        return data
    index = {name: i for i, name in enumerate(model_labels)}
    missing = sorted(set(data.label_names) - set(index))
    if missing:
        raise UserError(f"labels {missing} in the data are unknown to the model (it knows {model_labels})")
    return TextDataset(data.texts, [index[data.label_names[y]] for y in data.labels], model_labels)


def evaluate_path(path: str, data: str, text_column: str, label_column: str, batch_size: int = 64) -> tuple[dict, int]:
    """Scores of a model on a file: accuracy and loss; for a causal-LM run, exact match of
    generated answers, response loss and perplexity on prompt/response pairs."""
    if Path(path).is_dir() and is_run_dir(Path(path)):
        causal = _evaluate_causal_run(Path(path), data, batch_size)
        if causal is not None:
            return causal

    dataset = load_text_file(data, text_column, label_column)
    model, tokenizer, labels, max_length = load_for_eval(path)
    dataset = align_labels(dataset, labels)
    accuracy, loss = evaluate(model, tokenizer, dataset, batch_size=batch_size, max_length=max_length)
    return {"accuracy": accuracy, "loss": loss}, len(dataset)


def _evaluate_causal_run(path: Path, data: str, batch_size: int) -> tuple[dict, int] | None:
    run = load_run(path)
    if run.cfg.task != "causal-lm":
        return None
    pairs = load_instruction_file(data, run.cfg.prompt_column, run.cfg.response_column)
    cfg = dataclasses.replace(run.cfg, eval_batch_size=batch_size, generation_eval_examples=0)  # every pair in the file
    scores = evaluate_global_model(run.model(), load_tokenizer(cfg.model, cfg.task), cfg, pairs, final=True)
    return {"exact_match": scores["accuracy"], "loss": scores["loss"], "perplexity": scores["perplexity"]}, len(pairs)
