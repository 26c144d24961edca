"""fedlora export (PEFT adapter, merged model) and fedlora eval on real small runs whose
classifier reads BERT's pooler; mean-pooled exports: tests/test_export_mean_pooling.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

from fedlora.cli import main
from fedlora.io.runs import load_run
from fedlora.quiet import QUIET_ENV, VERBOSE_ENV

TEXTS = [
    "The central bank raised interest rates again.",
    "The striker scored twice in the final.",
    "A new phone chip was unveiled.",
]


@pytest.fixture(scope="module", params=["fedsb", "flora"])
def run_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param) / "run"
    cfg = tmp_path_factory.mktemp("cfg") / "small.toml"
    cfg.write_text(
        'local_steps = 2\nbatch_size = 8\neval_max_examples = 16\nmax_length = 32\nlr = 0.01\npooling = "pooler"\ninit_batches = 1\n'
    )
    extra = ["--ranks", "4,2"] if request.param == "flora" else []
    args = [
        "simulate",
        "--strategy",
        request.param,
        "--clients",
        "2",
        "--rounds",
        "2",
        "--out",
        str(out),
        "--config",
        str(cfg),
        *extra,
    ]
    assert main(args) == 0
    return out


def logits(model, run):
    from fedlora.ml.models import load_tokenizer

    batch = load_tokenizer(run.cfg.model)(TEXTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


def test_peft_export_gives_fedloras_logits(run_dir, tmp_path):
    from peft import PeftModel

    from fedlora.ml.models import load_classifier

    assert main(["export", str(run_dir), "--out", str(tmp_path / "adapter")]) == 0
    run = load_run(run_dir)
    peft_model = PeftModel.from_pretrained(
        load_classifier(None, len(run.labels), pooling="pooler"), str(tmp_path / "adapter")
    ).eval()
    ours = run.model().eval()
    assert (logits(peft_model, run) - logits(ours, run)).abs().max().item() < 1e-4
    # the adapter actually moved the model away from the base
    base = load_classifier(None, len(run.labels), pooling="pooler").eval()
    assert (logits(base, run) - logits(ours, run)).abs().max().item() > 1e-3


def test_merged_export_loads_with_transformers_alone(run_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "export", str(run_dir), "--out", str(tmp_path / "merged"), "--merge"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "" and proc.stdout == f"wrote {tmp_path / 'merged'}\n"  # no library noise
    run = load_run(run_dir)
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    assert merged.config.id2label[0] == run.labels[0]
    assert (logits(merged, run) - logits(run.model().eval(), run)).abs().max().item() < 1e-4


def test_eval_prints_accuracy_and_rejects_bad_files(run_dir, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text(
        "\n".join(json.dumps({"text": t, "label": lab}) for t, lab in zip(TEXTS, ["business", "sports", "tech"]))
    )
    # a user's shell: not the quiet settings this test process inherited from in-process runs
    env = {k: v for k, v in os.environ.items() if k not in (*QUIET_ENV, VERBOSE_ENV)}
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "eval", str(run_dir), "--data", str(data)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("accuracy ") and "examples 3" in proc.stdout
    # the base checkpoint has no classifier: transformers reports it MISSING, only with --verbose
    assert proc.stderr == "" and len(proc.stdout.splitlines()) == 1, proc.stdout + proc.stderr
    verbose = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "eval", str(run_dir), "--data", str(data), "--verbose"],
        capture_output=True,
        text=True,
        env=env,
    )
    assert verbose.returncode == 0 and "LOAD REPORT" in verbose.stdout + verbose.stderr
    assert verbose.stdout.splitlines()[-1] == proc.stdout.strip()
    for bad in (tmp_path / "missing.jsonl", tmp_path / "bad.jsonl"):
        if bad.name == "bad.jsonl":
            bad.write_text("{not json\n")
        proc = subprocess.run(
            [sys.executable, "-m", "fedlora.cli", "eval", str(run_dir), "--data", str(bad)],
            capture_output=True,
            text=True,
        )
        assert proc.returncode != 0
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
