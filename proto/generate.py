"""Regenerate the checked-in Python code for the wire schema:

    python proto/generate.py

needs grpcio-tools (in the `test` extra); tests/test_schema.py fails when the
checked-in code is stale.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SCHEMAS = {"fedlora/v1/update.proto": "update_pb2.py"}
TARGET = ROOT.parent / "fedlora" / "io" / "schema"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every schema; return the generated files, placed in ``out_dir``."""
    from grpc_tools import protoc

    written = []
    with tempfile.TemporaryDirectory() as tmp:
        for proto, module in SCHEMAS.items():
            code = protoc.main(["protoc", f"-I{ROOT}", f"--python_out={tmp}", str(ROOT / proto)])
            if code != 0:
                raise RuntimeError(f"protoc failed on {proto}")
            generated = Path(tmp) / proto.replace(".proto", "_pb2.py")
            target = out_dir / module
            target.write_bytes(generated.read_bytes())
            written.append(target)
    return written


if __name__ == "__main__":
    for path in generate(TARGET):
        print(f"wrote {path}")
    sys.exit(0)
