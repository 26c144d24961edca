"""Progress bars for the long loops of a terminal session: local training steps and the
final generation evaluation.

A bar is drawn only when stderr is a terminal, so logs, pipes and tests stay clean.
``FEDLORA_PROGRESS`` overrides that: ``1`` draws them, ``0`` never does. A deployed
agent sets it to 1 for its resident trainer when the agent itself runs on a terminal,
since the trainer writes into a pipe that the agent echoes there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

PROGRESS_ENV = "FEDLORA_PROGRESS"
T = TypeVar("T")


def progress_shown() -> bool:
    """Whether this process draws progress bars."""
    flag = os.environ.get(PROGRESS_ENV, "")
    if flag in ("0", "1"):
        return flag == "1"
    return sys.stderr.isatty()


def with_progress(items: Iterable[T], total: int, desc: str, unit: str = "step") -> Iterator[T]:
    """``items``, with a bar on stderr while they are consumed (where bars are shown); the
    bar is cleared when they end."""
    if not progress_shown():
        yield from items
        return
    with tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr, dynamic_ncols=True) as bar:
        for item in items:
            yield item
            bar.update(1)
