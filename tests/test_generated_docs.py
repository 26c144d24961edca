"""The README's tables that come from the code (round record, options) are current."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def generated():
    spec = importlib.util.spec_from_file_location("generated", ROOT / "docs" / "generated.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_tables_are_current():
    text = (ROOT / "README.md").read_text()
    assert generated().with_tables(text) == text, "stale README tables: run python docs/generated.py"


def test_the_options_table_names_every_flag_with_its_default():
    from fedlora.config.flags import options_table

    table = options_table()
    assert (
        "`--lr` (3e-3; ffa 0.01, flora 6e-3, fedsb 0.01; causal-lm 5e-4; under DP 1e-3)" in table
        and "`--rounds` (5)" in table
    )
    assert (
        generated().with_tables(
            "a\n<!-- options:start -->\nold\n<!-- options:end -->\n<!-- round-record:start --><!-- round-record:end -->"
        )
        != "a"
    )


def test_the_readme_stays_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300
