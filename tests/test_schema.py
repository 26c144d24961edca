"""The checked-in Python code for proto/fedlora/v1 must match what protoc generates now."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_is_fresh(tmp_path):
    spec = importlib.util.spec_from_file_location("generate", ROOT / "proto" / "generate.py")
    generate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generate)
    for fresh in generate.generate(tmp_path):
        checked_in = ROOT / "fedlora" / "io" / "schema" / fresh.name
        assert checked_in.read_bytes() == fresh.read_bytes(), f"{checked_in} is stale: run python proto/generate.py"
