"""The exported form of a mean-pooled BERT classifier (``--pooling mean``): a config.json whose
``auto_map`` names the model class in ``modeling_bert_mean_pooling.py``, written beside it,
so transformers loads it with ``trust_remote_code=True`` and without fedlora.

The same config goes into a merged model folder and into an adapter folder; in the latter it
puts the plain BERT checkpoint named by ``base_model_name_or_path`` into the mean-pooled class
before PEFT adds the adapter (the file registers its model class when its config is loaded).
"""

from __future__ import annotations

import importlib.resources
import json
import shutil
from pathlib import Path

from torch import nn
from transformers import BertConfig, PreTrainedConfig

from fedlora.errors import UserError
from fedlora.ml.models import load_classifier

MODEL_TYPE = "bert_mean_pooling"
MODELING_FILE = "modeling_bert_mean_pooling.py"
MODEL_CLASS = "BertMeanPoolingForSequenceClassification"
AUTO_MAP = {
    "AutoConfig": "modeling_bert_mean_pooling.BertMeanPoolingConfig",
    "AutoModelForSequenceClassification": f"modeling_bert_mean_pooling.{MODEL_CLASS}",
}


def write_mean_pooling_model_files(config: PreTrainedConfig, out_dir: Path) -> None:
    """config.json (``config``, a BERT classifier's, as the mean-pooled model type) and the
    model's code, into ``out_dir``."""
    if config.model_type != "bert":
        raise UserError(f"a mean-pooled export needs a BERT model; this run's is {config.model_type}")
    fields = config.to_dict()
    fields.update(model_type=MODEL_TYPE, architectures=[MODEL_CLASS], auto_map=AUTO_MAP)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    with importlib.resources.as_file(importlib.resources.files("fedlora.io.hf_code") / MODELING_FILE) as code:
        shutil.copyfile(code, out_dir / MODELING_FILE)


def is_mean_pooling_folder(path: Path) -> bool:
    """Whether ``path`` holds a config.json of the mean-pooled model type (a merged model or an adapter folder)."""
    try:
        return json.loads((path / "config.json").read_text()).get("model_type") == MODEL_TYPE
    except (OSError, ValueError):
        return False


def folder_labels(path: Path) -> list[str]:
    """The label names in order, from a mean-pooled folder's config.json."""
    config = bert_config(path)
    return [config.id2label[i] for i in range(config.num_labels)]


def bert_config(path: Path) -> BertConfig:
    """A mean-pooled folder's config.json as the plain BERT config it extends."""
    fields = json.loads((path / "config.json").read_text())
    for key in ("model_type", "architectures", "auto_map"):
        fields.pop(key, None)
    return BertConfig.from_dict(fields)


def load_mean_pooling_model(path: Path) -> nn.Module:
    """A merged mean-pooled model folder, loaded with fedlora's own mean pooling: no code
    from the folder runs."""
    return load_classifier(str(path), None, pooling="mean", config=bert_config(path))
