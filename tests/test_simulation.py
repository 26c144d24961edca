"""A real 2-client, 1-round simulation on Flower's simulation runtime, outputs checked."""
# The round evaluates a 16-example slice; the final accuracy is on all 40 held-out examples.

import json
import subprocess
import sys

import pytest
import torch

from fedlora.cli import build_parser, run_config_from_args

METRIC_KEYS = {
    "round",
    "strategy",
    "accuracy",
    "loss",
    "clients",
    "rejected",
    "bytes_up",
    "bytes_down",
    "aggregation_error",
    "epsilon",
    "seconds",
    "train_seconds",
    "client_seconds",
    "aggregate_seconds",
    "eval_seconds",
    "eval_examples",
    "train_tokens",
}
SUMMARY_KEYS = {
    "strategy",
    "rounds",
    "num_clients",
    "model",
    "dataset",
    "final_accuracy",
    "bytes_up_total",
    "bytes_down_total",
    "epsilon",
    "seconds",
    "final_loss",
    "final_eval_examples",
    "final_eval_seconds",
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("sim") / "run"
    cfg = tmp_path_factory.mktemp("cfg") / "small.toml"
    cfg.write_text(
        "[fedlora]\nlocal_steps = 2\nbatch_size = 8\neval_max_examples = 40\nround_eval_examples = 16\nmax_length = 32\n"
    )
    # the command line a user runs, in a process of its own: what it prints is checked too
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", *run_args(out, cfg)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (out / "terminal.txt").write_text(proc.stdout + proc.stderr)
    return out


# what must never reach a user's terminal in a run that goes well
NOISE = ("DEPRECATED", "Traceback", "LOAD REPORT", "Warning", "WARNING")


def test_the_terminal_shows_fedloras_lines_only(run_dir):
    """No Flower deprecation block, no transformers load report, no library warnings: one
    header line, one line per round, the final evaluation and where the outputs are."""
    text = (run_dir / "terminal.txt").read_text()
    assert not [word for word in NOISE if word in text], text
    lines = text.strip().splitlines()
    assert lines[0].startswith("fedlora simulate: fedavg, 2 clients, 1 rounds")
    assert any(line.startswith("round 1/1 ") for line in lines)
    assert lines[-1] == f"done: outputs in {run_dir}"


def run_args(out, cfg) -> list[str]:
    return ["simulate", "--clients", "2", "--rounds", "1", "--out", str(out), "--config", str(cfg)]


def test_the_saved_config_is_the_users_settings_alone(run_dir, tmp_path):
    """The run learns its labels and resolves paths, but writes none of it into the settings."""
    cfg = tmp_path / "small.toml"
    cfg.write_text(
        "[fedlora]\nlocal_steps = 2\nbatch_size = 8\neval_max_examples = 40\nround_eval_examples = 16\nmax_length = 32\n"
    )
    given = run_config_from_args(build_parser().parse_args(run_args(run_dir, cfg)), "simulate")
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved == given.to_dict() and "labels" not in saved


def test_output_files(run_dir):
    for name in (
        "metrics.jsonl",
        "summary.json",
        "report.png",
        "run.log",  # the progress lines the terminal showed
        ".flower/superlink.log",  # Flower's own log
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
    ):
        assert (run_dir / name).is_file(), name


def test_metrics_and_summary(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    m = json.loads(lines[0])
    assert METRIC_KEYS <= set(m)
    assert m["round"] == 1 and m["strategy"] == "fedavg" and m["clients"] == 2 and m["rejected"] == 0
    assert 0.0 <= m["accuracy"] <= 1.0 and m["loss"] > 0
    assert m["bytes_up"] > 0 and m["bytes_down"] > 0
    assert m["train_tokens"] > 2 * 2 * 8  # 2 clients x 2 steps x 8 examples, several tokens each
    assert m["aggregation_error"] > 0  # FedAvg is not exact
    assert m["epsilon"] is None
    # the round's time splits into parts that each happened and fit inside it
    assert 0 < m["train_seconds"] < m["client_seconds"] < m["seconds"]
    assert 0 < m["aggregate_seconds"] and 0 < m["eval_seconds"]
    assert m["client_seconds"] + m["aggregate_seconds"] + m["eval_seconds"] < m["seconds"]
    s = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(s)
    assert s["num_clients"] == 2 and s["rounds"] == 1
    assert s["bytes_up_total"] == m["bytes_up"]
    assert m["eval_examples"] == 16 and s["final_eval_examples"] == 40 and s["final_eval_seconds"] > 0


def test_final_accuracy_is_the_exported_adapter_on_the_whole_held_out_split(run_dir):
    from peft import PeftModel

    from fedlora.config import RunConfig
    from fedlora.ml.evaluation import seeded_slice
    from fedlora.ml.models import load_classifier, load_tokenizer
    from fedlora.ml.task import load_splits
    from fedlora.ml.training import evaluate

    cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    held_out = seeded_slice(load_splits(cfg).test, 40, cfg.seed)
    model = PeftModel.from_pretrained(load_classifier(None, 5), str(run_dir / "adapter"))
    accuracy, loss = evaluate(model, load_tokenizer(None), held_out, batch_size=16, max_length=cfg.max_length)
    s = json.loads((run_dir / "summary.json").read_text())
    assert len(held_out) == 40
    assert accuracy == s["final_accuracy"] and loss == pytest.approx(s["final_loss"], rel=1e-4)


def test_exported_adapter_loads_in_peft_with_the_same_logits(run_dir):
    from peft import PeftModel
    from safetensors.torch import load_file

    from fedlora.config import RunConfig
    from fedlora.io.export import PEFT_PREFIX
    from fedlora.ml.adapters import load_adapter_state
    from fedlora.ml.models import load_classifier, load_tokenizer
    from fedlora.ml.task import adapted_model, lora_spec

    cfg = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    state = {k[len(PEFT_PREFIX) :]: v for k, v in tensors.items()}
    ours = adapted_model(None, 5, lora_spec(cfg))
    load_adapter_state(ours, state)

    peft_model = PeftModel.from_pretrained(load_classifier(None, 5), str(run_dir / "adapter"))
    peft_model.eval()
    tok = load_tokenizer(None)
    batch = tok(
        ["The central bank raised interest rates.", "The striker scored twice."], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        diff = (peft_model(**batch).logits - ours(**batch).logits).abs().max().item()
    assert diff < 1e-4
