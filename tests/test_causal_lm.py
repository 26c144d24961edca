"""Causal-LM instruction tuning on a tiny random Llama: data, response-only loss,
evaluation, every strategy and DP through real simulations, PEFT export."""

import json
import math
from collections import Counter

import pytest
import torch
from causal_helpers import arithmetic_rows, make_tiny_llama, write_jsonl

from fedlora.cli import main
from fedlora.errors import UserError
from fedlora.ml.generation import exact_match
from fedlora.ml.instructions import IGNORE, InstructionDataset, encode_pair, final_number, load_instruction_file
from fedlora.strategies import STRATEGY_NAMES


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def tokenizer(llama):
    from fedlora.ml.models import load_tokenizer

    return load_tokenizer(str(llama), "causal-lm")


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qa")
    return write_jsonl(folder / "train.jsonl", arithmetic_rows(120, 2)), write_jsonl(
        folder / "test.jsonl", arithmetic_rows(24, 3)
    )


def test_gsm8k_and_instruction_files_are_read_with_their_own_field_names(tmp_path):
    gsm = load_instruction_file(write_jsonl(tmp_path / "g.jsonl", arithmetic_rows(3)))
    assert gsm.prompts[0].startswith("What is") and gsm.responses[0].endswith(gsm.responses[0].split("#### ")[1])
    alpaca = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Translate", "input": "chat", "output": "cat"},
            {"instruction": "Say hi", "input": "", "output": "hi"},
        ],
    )
    data = load_instruction_file(alpaca)
    assert data.prompts == ["Translate\n\nchat", "Say hi"] and data.responses == ["cat", "hi"]
    custom = write_jsonl(tmp_path / "c.jsonl", [{"q": "a?", "r": "b"}])
    assert load_instruction_file(custom, "q", "r").responses == ["b"]
    with pytest.raises(UserError, match="no column one of instruction/prompt/question"):
        load_instruction_file(custom)
    with pytest.raises(UserError, match="no column 'answer_text'"):
        load_instruction_file(custom, "q", "answer_text")
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "x", "response": ""}])
    with pytest.raises(UserError, match="empty values"):
        load_instruction_file(empty)


def test_only_response_tokens_and_the_end_token_are_trained(tokenizer):
    ids, labels = encode_pair(tokenizer, "What is 2 plus 3?", "2 + 3 = 5", max_length=128)
    trained = [t for t in labels if t != IGNORE]
    assert trained == tokenizer("2 + 3 = 5", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_len = len(ids) - len(trained)
    assert labels[:prompt_len] == [IGNORE] * prompt_len and ids[prompt_len:] == trained
    # the chat template wraps the prompt
    assert tokenizer.decode(ids[:prompt_len]).startswith("<s>user: What is 2 plus 3?")
    # too long: the prompt gives way first, the sequence fits
    ids, labels = encode_pair(tokenizer, "word " * 200, "2 + 3 = 5", max_length=32)
    assert len(ids) == 32 and [t for t in labels if t != IGNORE][-1] == tokenizer.eos_token_id


def test_loss_is_a_mean_per_sample_then_over_the_batch(llama, tokenizer):
    from fedlora.ml.models import load_causal_lm

    model = load_causal_lm(str(llama))
    data = InstructionDataset(
        ["What is 1 plus 1?", "What is 10 plus 20?"], ["1 + 1 = 2", "10 + 20 = 30 and that is a longer answer"]
    )
    inputs, labels = data.batch(tokenizer, [0, 1], 64)
    with torch.no_grad():
        logits = model(**inputs).logits
        batch_loss = data.loss(logits, labels).item()
        singles = []
        for i in range(2):
            single_inputs, single_labels = data.batch(tokenizer, [i], 64)
            singles.append(data.loss(model(**single_inputs).logits, single_labels).item())
    assert batch_loss == pytest.approx(sum(singles) / 2, rel=1e-5)
    # a token-weighted mean would differ: the two responses have different lengths
    counts = [(labels[i, 1:] != IGNORE).sum().item() for i in range(2)]
    assert counts[0] != counts[1]


def test_final_number_and_exact_match():
    assert final_number("so 16 - 3 - 4 = 9 eggs\n#### 1,234") == 1234
    assert final_number("The answer is 18.") == 18
    assert final_number("no digits") is None
    assert exact_match(["... 7", "#### 8", "none"], ["3 + 4 = 7\n#### 7", "#### 9", "#### 1"]) == pytest.approx(1 / 3)


def simulate(tmp_path, llama, data_files, *extra):
    train, test = data_files
    out = tmp_path / "run"
    args = [
        "simulate",
        "--task",
        "causal-lm",
        "--model",
        str(llama),
        "--data",
        str(train),
        "--eval-data",
        str(test),
        "--clients",
        "2",
        "--rounds",
        "2",
        "--local-steps",
        "2",
        "--batch-size",
        "8",
        "--max-length",
        "48",
        "--max-new-tokens",
        "8",
        "--generation-eval-examples",
        "6",
        "--init-batches",
        "1",
        "--lr",
        "1e-2",
        "--out",
        str(out),
        *extra,
    ]
    assert main(args) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return out, metrics, json.loads((out / "summary.json").read_text())


@pytest.mark.parametrize("strategy", STRATEGY_NAMES)
def test_every_strategy_tunes_a_decoder(tmp_path, llama, data_files, strategy):
    extra = ["--ranks", "4,8"] if strategy == "flora" else []
    out, metrics, summary = simulate(tmp_path, llama, data_files, "--strategy", strategy, *extra)
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["accuracy"] is None and m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-6)
        assert m["bytes_up"] > 0 and m["clients"] == 2
        if strategy != "fedavg":
            assert m["aggregation_error"] < 1e-5
    assert summary["task"] == "causal-lm" and 0.0 <= summary["final_accuracy"] <= 1.0
    assert summary["generation_examples"] == 6 and summary["final_perplexity"] > 1
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and sorted(config["target_modules"]) == ["q_proj", "v_proj"]


def test_exported_decoder_adapter_loads_in_peft_with_the_same_logits(tmp_path, llama, data_files, tokenizer, capsys):
    from peft import PeftModel

    from fedlora.io.runs import load_run
    from fedlora.ml.models import load_causal_lm

    out, _, summary = simulate(tmp_path, llama, data_files, "--strategy", "fedsb")
    capsys.readouterr()
    assert main(["eval", str(out), "--data", str(data_files[1])]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[:2] == ["exact", "match"] and "perplexity" in printed and printed[-1] == "24"
    # the whole held-out file again: the run's own final perplexity
    assert float(printed[printed.index("perplexity") + 1]) == pytest.approx(summary["final_perplexity"], rel=1e-3)
    ours = load_run(out).model()
    theirs = PeftModel.from_pretrained(load_causal_lm(str(llama)), str(out / "adapter")).eval()
    batch = tokenizer(["What is 3 plus 4?"], return_tensors="pt")
    with torch.no_grad():
        assert (ours(**batch).logits - theirs(**batch).logits).abs().max().item() < 1e-4
        base = load_causal_lm(str(llama))(**batch).logits
        assert (ours(**batch).logits - base).abs().max().item() > 1e-6  # the adapter does something


def test_dp_on_a_decoder_stays_within_budget_and_changes_the_adapter(tmp_path, llama, data_files):
    out, metrics, summary = simulate(tmp_path, llama, data_files, "--strategy", "fedsb", "--dp-epsilon", "3")
    assert 0 < summary["epsilon"] <= 3.0
    assert all(m["epsilon"] <= 3.0 for m in metrics)
    from safetensors.torch import load_file

    state = load_file(str(out / "checkpoint.safetensors"))
    rs = [t for n, t in state.items() if n.endswith("lora_R.weight")]
    assert rs and all(torch.isfinite(r).all() for r in rs)


def test_causal_lm_needs_data_and_known_columns(tmp_path, llama, capsys):
    assert main(["simulate", "--task", "causal-lm", "--model", str(llama), "--out", str(tmp_path / "r")]) == 2
    assert "needs --data" in capsys.readouterr().err
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "x", "label": "y"}] * 4)
    assert (
        main(
            ["simulate", "--task", "causal-lm", "--model", str(llama), "--data", str(bad), "--out", str(tmp_path / "r")]
        )
        == 2
    )
    assert "no column one of instruction/prompt/question" in capsys.readouterr().err
    assert main(["simulate", "--task", "translate", "--out", str(tmp_path / "r")]) == 2
    assert "unknown task" in capsys.readouterr().err


def test_partition_writes_prompt_response_files_that_load_back(tmp_path, data_files, capsys):
    train, _ = data_files
    assert (
        main(
            [
                "partition",
                "--task",
                "causal-lm",
                "--data",
                str(train),
                "--clients",
                "3",
                "--out",
                str(tmp_path / "parts"),
            ]
        )
        == 0
    )
    parts = [load_instruction_file(tmp_path / "parts" / f"client-{i}.jsonl") for i in (1, 2, 3)]
    original = load_instruction_file(train)
    held_out = round(len(original) * 0.2)  # the default test fraction stays out of every client file
    assert sum(len(p) for p in parts) == len(original) - held_out
    pairs = Counter((q, a) for p in parts for q, a in zip(p.prompts, p.responses))
    assert not pairs - Counter(zip(original.prompts, original.responses))  # each pair from the file, none twice
