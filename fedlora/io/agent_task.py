"""A deployed agent's task: what its file holds, which columns it reads, the label set it declares.

These are the agent's own settings (``fedlora client --task --text-column --label-column
--prompt-column --response-column --labels``), like its privacy settings: the coordinator's
run config never chooses which column of the agent's file is read, and whether the agent
takes part in a run is decided from the coordinator's declared label list against the
agent's declared one, before any data is read (``fedlora.client.handler.check_task``).
Without ``--labels`` the agent declares the label set of its own file, as it reads it at
start: that set is then what a coordinator can learn by trying label lists.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from fedlora.errors import UserError

if TYPE_CHECKING:
    from fedlora.ml.data import TextDataset
    from fedlora.ml.instructions import InstructionDataset

TASKS = ("classify", "causal-lm")
NODE_KEY = "agent-task"  # the node-config key: the task as JSON


@dataclass(frozen=True)
class AgentTask:
    task: str = "classify"
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = ""  # causal-lm; empty: the first of the usual names present
    response_column: str = ""
    labels: tuple[str, ...] = ()  # classify: the label set this agent declares

    def check(self) -> None:
        """One-line errors for settings the agent could not train with."""
        if self.task not in TASKS:
            raise UserError(f"unknown task {self.task!r}: choose classify or causal-lm")
        if self.task == "classify" and not (self.text_column and self.label_column):
            raise UserError("--text-column and --label-column must not be empty")
        if self.labels and self.task != "classify":
            raise UserError("--labels is for --task classify")
        if len(set(self.labels)) != len(self.labels):
            raise UserError(f"--labels names a label twice: {', '.join(self.labels)}")
        if any(not label for label in self.labels):
            raise UserError("--labels has an empty label")

    def declared(self, labels_in_file: Iterable[str]) -> AgentTask:
        """This task with its label set fixed: ``--labels`` when given (the file's labels
        must be among them), else the labels of the agent's own file."""
        found = tuple(labels_in_file)
        if self.task != "classify":
            return replace(self, labels=())
        if not self.labels:
            return replace(self, labels=found)
        extra = sorted(set(found) - set(self.labels))
        if extra:
            raise UserError(f"--labels lacks {len(extra)} label(s) of the data file: {', '.join(extra[:5])}")
        return self

    def node_config(self) -> str:
        """The task as one Flower node-config pair: JSON in a TOML literal string, whose
        only forbidden character, the quote, is written as a JSON escape."""
        text = json.dumps(asdict(self), sort_keys=True).replace("'", "\\u0027")
        return f"{NODE_KEY}='{text}'"

    def load(self, path: str | Path) -> TextDataset | InstructionDataset:
        """The agent's file, read with the agent's own columns."""
        from fedlora.ml.data import load_text_file  # lazy: the CLI imports this module
        from fedlora.ml.instructions import load_instruction_file

        if self.task == "causal-lm":
            return load_instruction_file(path, self.prompt_column, self.response_column)
        return load_text_file(path, self.text_column, self.label_column)

    @classmethod
    def from_node(cls, node: Mapping) -> AgentTask:
        """The task ``node_config`` wrote; a node without one has the defaults and no label set."""
        raw = node.get(NODE_KEY)
        if raw is None:
            return cls()
        values = json.loads(str(raw))
        return cls(**{**values, "labels": tuple(str(v) for v in values.get("labels", ()))})


def parse_labels(text: str | None) -> tuple[str, ...]:
    """``--labels a,b,c``: names separated by commas, spaces around them ignored."""
    return () if text is None else tuple(name.strip() for name in text.split(","))
