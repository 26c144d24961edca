"""--pooling mean: the classifier reads the masked mean of the token states, in training,
evaluation and DP alike, and only on a BERT classifier, whose export can express it."""

import json

import pytest
import torch

from fedlora.ml.adapters import LoRASpec, load_adapter_state
from fedlora.ml.models import (
    MaskedMeanPooler,
    declared_pooling,
    default_model_path,
    load_tokenizer,
    resolve_pooling,
)
from fedlora.ml.task import adapted_model, initial_adapter_state

SPEC = LoRASpec(rank=4, alpha=8.0, target_modules=("query", "value"), head_modules=("classifier",))
TEXTS = ["Rates rose again.", "The striker scored twice in the final and the crowd sang for an hour afterwards."]


def mean_pooled_model():
    net = adapted_model(None, 3, SPEC, pooling="mean")
    load_adapter_state(net, initial_adapter_state(None, 3, SPEC, seed=1, pooling="mean"))
    return net.eval()


def test_mean_pooling_classifies_the_masked_mean_of_the_token_states():
    net = mean_pooled_model()
    assert isinstance(net.base_model.pooler, MaskedMeanPooler)
    batch = load_tokenizer(None)(TEXTS, return_tensors="pt", padding=True)
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # the short one is padded
    with torch.no_grad():
        states = net.base_model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).float()
        expected = net.classifier((states * mask).sum(1) / mask.sum(1))
        logits = net(**batch).logits
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_a_mean_pooled_prediction():
    net = mean_pooled_model()
    tok = load_tokenizer(None)
    with torch.no_grad():
        alone = net(**tok(TEXTS[:1], return_tensors="pt")).logits
        padded = net(**tok(TEXTS, return_tensors="pt", padding=True)).logits[:1]
    torch.testing.assert_close(padded, alone, rtol=1e-4, atol=1e-5)


def test_auto_pooling_follows_the_models_sentence_transformers_metadata(tmp_path):
    assert isinstance(adapted_model(None, 3, SPEC).base_model.pooler, MaskedMeanPooler)  # declares mean
    assert declared_pooling(default_model_path()) == "mean"
    net = adapted_model(None, 3, SPEC, pooling="pooler")
    assert not isinstance(net.base_model.pooler, MaskedMeanPooler) and hasattr(net.base_model.pooler, "dense")
    assert declared_pooling(str(tmp_path)) is None  # no metadata: the model's pooled output
    assert resolve_pooling(str(make_bare_folder(tmp_path)), "auto") == "pooler"
    (tmp_path / "modules.json").write_text(json.dumps([{"path": "1_Pooling", "type": "x.models.Pooling"}]))
    (tmp_path / "1_Pooling").mkdir()
    (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True}))
    assert declared_pooling(str(tmp_path)) == "pooler"
    (tmp_path / "modules.json").write_text("not json")
    assert declared_pooling(str(tmp_path)) is None


def make_bare_folder(tmp_path):
    folder = tmp_path / "bare"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


def test_a_dp_run_with_mean_pooling_completes_and_records_it(mean_pooled_run):
    assert json.loads((mean_pooled_run / "config.json").read_text())["pooling"] == "mean"
    summary = json.loads((mean_pooled_run / "summary.json").read_text())
    assert 0 < summary["epsilon"] <= 8
    assert 0.0 <= summary["final_accuracy"] <= 1.0
    # the adapter carries the mean-pooled model's config and code (tests/test_export_mean_pooling.py loads it)
    config = json.loads((mean_pooled_run / "adapter" / "config.json").read_text())
    assert config["model_type"] == "bert_mean_pooling" and config["id2label"]["0"] == summary["labels"][0]
    assert (mean_pooled_run / "adapter" / "modeling_bert_mean_pooling.py").is_file()


def test_a_model_without_a_pooler_to_replace_is_a_clear_error(tmp_path):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from fedlora.errors import UserError
    from fedlora.ml.models import load_classifier

    config = RobertaConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    RobertaForSequenceClassification(config).save_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="pooling mean needs a BERT-style model"):
        load_classifier(str(tmp_path), 2, pooling="mean")


def test_a_pooler_that_the_classifier_does_not_read_is_refused(tmp_path):
    """MPNet has a pooler, but its classification head reads the first token's state:
    replacing the pooler would change nothing, silently."""
    from transformers import MPNetConfig, MPNetForSequenceClassification

    from fedlora.errors import UserError
    from fedlora.ml.models import load_classifier

    config = MPNetConfig(
        vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    MPNetForSequenceClassification(config).save_pretrained(str(tmp_path))
    with pytest.raises(UserError, match="pooling mean needs a BERT-style model"):
        load_classifier(str(tmp_path), 2, pooling="mean")
