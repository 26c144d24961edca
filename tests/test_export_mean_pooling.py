"""A --pooling mean run is exportable: its adapter/, `fedlora export` and `fedlora export
--merge` load in a fresh Python process that cannot import fedlora, through transformers'
remote code (trust_remote_code) and PEFT, as the README says, and classify every held-out
example as `fedlora eval` does. `fedlora eval` reads the exported folders too."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fedlora.cli import main
from fedlora.io.run_eval import load_for_eval
from fedlora.io.runs import load_run
from fedlora.ml.models import resolve_model_path, use_mean_pooling
from fedlora.ml.task import load_splits
from fedlora.ml.training import encode

# The README's loading code, run as a third party would: fedlora blocked before anything else.
THIRD_PARTY = r"""
import json, sys


class NoFedlora:
    def find_spec(self, name, path=None, target=None):
        if name == "fedlora" or name.startswith("fedlora."):
            raise ImportError(f"{name} is not installed here")


sys.meta_path.insert(0, NoFedlora())
try:
    import fedlora  # noqa: F401
    fedlora_importable = True
except ImportError:
    fedlora_importable = False

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

job = json.loads(sys.argv[1])


def logits(model, tokenizer):
    batch = tokenizer(job["texts"], truncation=True, max_length=job["max_length"], padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**batch).logits.tolist()


out = {"fedlora_importable": fedlora_importable}
for name, adapter in job["adapters"].items():
    config = AutoConfig.from_pretrained(adapter, trust_remote_code=True)
    base = AutoModelForSequenceClassification.from_pretrained(job["base"], config=config, trust_remote_code=True)
    model = PeftModel.from_pretrained(base, adapter)
    out[name] = logits(model, AutoTokenizer.from_pretrained(job["base"]))
    out[name + "_labels"] = [config.id2label[i] for i in range(config.num_labels)]

merged = AutoModelForSequenceClassification.from_pretrained(job["merged"], trust_remote_code=True)
out["merged"] = logits(merged, AutoTokenizer.from_pretrained(job["merged"], trust_remote_code=True))
out["merged_labels"] = [merged.config.id2label[i] for i in range(merged.config.num_labels)]

# the adapter put on transformers' own BERT classifier, which reads the pooler
plain = AutoModelForSequenceClassification.from_pretrained(job["base"], num_labels=len(out["merged_labels"]))
plain = PeftModel.from_pretrained(plain, job["adapters"]["export"])
out["plain"] = logits(plain, AutoTokenizer.from_pretrained(job["base"]))
print(json.dumps(out))
"""

FORMS = ["run_adapter", "export", "merged"]


@pytest.fixture(scope="module")
def exports(mean_pooled_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("exports")
    assert main(["export", str(mean_pooled_run), "--out", str(out / "adapter")]) == 0
    assert main(["export", str(mean_pooled_run), "--out", str(out / "merged"), "--merge"]) == 0
    return {"run_adapter": mean_pooled_run / "adapter", "export": out / "adapter", "merged": out / "merged"}


@pytest.fixture(scope="module")
def held_out(mean_pooled_run):
    run = load_run(mean_pooled_run)
    test = load_splits(run.cfg).test
    return test.texts[:24], run.cfg.max_length


@pytest.fixture(scope="module")
def fedlora_logits(mean_pooled_run, held_out):
    """The run's own evaluation path: the model and tokenizer `fedlora eval RUN` scores with."""
    texts, max_length = held_out
    model, tokenizer, _, _ = load_for_eval(mean_pooled_run)
    with torch.no_grad():
        return model.eval()(**encode(tokenizer, texts, max_length)).logits


@pytest.fixture(scope="module")
def third_party(exports, held_out, tmp_path_factory):
    texts, max_length = held_out
    job = {
        "texts": texts,
        "max_length": max_length,
        "base": resolve_model_path(None),
        "adapters": {"run_adapter": str(exports["run_adapter"]), "export": str(exports["export"])},
        "merged": str(exports["merged"]),
    }
    where = tmp_path_factory.mktemp("third_party")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(where / "hf_modules"), HF_HUB_OFFLINE="1")
    # -I: no PYTHONPATH, no user site, no current folder on sys.path
    proc = subprocess.run(
        [sys.executable, "-I", "-c", THIRD_PARTY, json.dumps(job)],
        capture_output=True,
        text=True,
        env=env,
        cwd=where,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_loading_process_cannot_import_fedlora(third_party):
    assert third_party["fedlora_importable"] is False


@pytest.mark.parametrize("form", FORMS)
def test_each_export_classifies_every_held_out_example_as_fedlora_eval(form, third_party, fedlora_logits, held_out):
    theirs = torch.tensor(third_party[form])
    assert theirs.shape == fedlora_logits.shape and len(theirs) == len(held_out[0])
    assert torch.equal(theirs.argmax(-1), fedlora_logits.argmax(-1))
    torch.testing.assert_close(theirs, fedlora_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", FORMS)
def test_each_export_names_the_runs_labels(form, third_party, mean_pooled_run):
    assert third_party[form + "_labels"] == load_run(mean_pooled_run).labels


def test_transformers_plain_bert_classifier_would_classify_differently(third_party, fedlora_logits):
    """Why the export carries its own model class: BERT's classifier reads the pooler."""
    plain = torch.tensor(third_party["plain"])
    assert (plain - fedlora_logits).abs().max().item() > 1e-2


@pytest.mark.parametrize("form", ["export", "merged"])
def test_fedlora_eval_reads_the_exported_folders(form, exports, held_out, fedlora_logits, mean_pooled_run):
    texts, max_length = held_out
    model, tokenizer, labels, _ = load_for_eval(exports[form])
    with torch.no_grad():
        ours = model.eval()(**encode(tokenizer, texts, max_length)).logits
    torch.testing.assert_close(ours, fedlora_logits, rtol=1e-4, atol=1e-4)
    assert labels == load_run(mean_pooled_run).labels


def test_the_written_model_class_computes_fedloras_logits_and_loss(tiny_bert):
    """The file written into exports, against fedlora's own mean pooling, on a padded batch."""
    from fedlora.io.hf_code.modeling_bert_mean_pooling import (
        BertMeanPoolingConfig,
        BertMeanPoolingForSequenceClassification,
    )

    written = BertMeanPoolingForSequenceClassification(BertMeanPoolingConfig.from_dict(tiny_bert.config.to_dict()))
    missing, unexpected = written.load_state_dict(tiny_bert.state_dict(), strict=False)
    assert not missing and all(k.startswith("bert.pooler.") for k in unexpected)
    use_mean_pooling(tiny_bert)
    ids = torch.randint(1, 100, (3, 10), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    mask[1, 7:] = 0
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        theirs = written.eval()(input_ids=ids, attention_mask=mask, labels=labels)
        ours = tiny_bert.eval()(input_ids=ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(theirs.logits, ours.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(theirs.loss, ours.loss, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # padding is left out of the mean: the first text alone, unpadded, gives its logits
        alone = written(input_ids=ids[:1, :4], attention_mask=mask[:1, :4]).logits
    torch.testing.assert_close(theirs.logits[:1], alone, rtol=1e-5, atol=1e-5)
