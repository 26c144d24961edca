"""Regenerate the README's tables that come from the code: ``python docs/generated.py``.

tests/test_generated_docs.py fails while one is stale.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedlora.config.flags import options_table
from fedlora.io.record import markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"
# marker name -> the table between <!-- name:start --> and <!-- name:end -->
TABLES = {"round-record": markdown_table, "options": options_table}


def with_tables(text: str) -> str:
    for name, table in TABLES.items():
        start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        text = f"{head}{start}\n{table()}\n{end}{tail}"
    return text


if __name__ == "__main__":
    before = README.read_text()
    after = with_tables(before)
    README.write_text(after)
    print("README.md updated" if after != before else "README.md already current")
    sys.exit(0)
