"""Progress bars: drawn on a terminal only (or as FEDLORA_PROGRESS says), for local training
steps and generated answers; a deployed agent echoes its trainer's bars as they are drawn."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from collections import deque

import pytest
from causal_helpers import make_tiny_llama
from test_training_loop import Tokenizer, _data, _net

from fedlora.deploy.trainer import READY, _echo
from fedlora.ml.generation import generate_answers
from fedlora.ml.progress import PROGRESS_ENV
from fedlora.ml.training import train_local

BAR_SCRIPT = (
    "from fedlora.ml.progress import with_progress\nfor _ in with_progress(range(3), 3, 'local training'): pass\n"
)


def _train(steps: int = 3) -> None:
    train_local(_net(), Tokenizer(), _data(24), steps=steps, batch_size=8, lr=1e-2, max_length=8, seed=0)


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch, capsys):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    _train()
    assert capsys.readouterr().err == ""


def test_a_bar_when_stderr_is_a_terminal():
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))  # a fresh pty is 0 wide
    env = {k: v for k, v in os.environ.items() if k != PROGRESS_ENV}
    proc = subprocess.Popen([sys.executable, "-c", BAR_SCRIPT], stderr=follower, env=env)
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 4096)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        seen += chunk
    os.close(leader)
    assert proc.wait(timeout=60) == 0
    assert b"local training" in seen and b"/3" in seen


def test_local_training_steps_get_a_bar_where_asked(monkeypatch, capsys):
    monkeypatch.setenv(PROGRESS_ENV, "1")
    _train()
    err = capsys.readouterr().err
    assert "local training" in err and "/3" in err and "\r" in err
    monkeypatch.setenv(PROGRESS_ENV, "0")
    _train()
    assert capsys.readouterr().err == ""


def test_generation_gets_a_bar_per_batch(monkeypatch, capsys, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_llama(tmp_path / "llama")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    monkeypatch.setenv(PROGRESS_ENV, "1")
    answers = generate_answers(model, tokenizer, ["What is 1 plus 2?"] * 3, batch_size=2, max_new_tokens=2)
    assert len(answers) == 3
    err = capsys.readouterr().err
    assert "generating answers" in err and "/2" in err


def test_the_agent_echoes_its_trainers_bars_and_still_reads_its_lines(capsys):
    script = f"print({READY + ' on x'!r}, flush=True)\n{BAR_SCRIPT}print('served', flush=True)\n"
    env = {**os.environ, PROGRESS_ENV: "1"}
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    ready, lines = threading.Event(), deque(maxlen=20)
    _echo(proc.stdout, ready, lines)
    assert proc.wait(timeout=60) == 0
    assert ready.is_set() and list(lines) == [READY + " on x", "served"]
    shown = capsys.readouterr().out
    assert "local training" in shown and "\r" in shown and shown.endswith("served\n")


@pytest.mark.parametrize("flag,shown", [("1", True), ("0", False)])
def test_the_variable_wins_over_the_terminal_check(monkeypatch, flag, shown):
    from fedlora.ml.progress import progress_shown

    monkeypatch.setenv(PROGRESS_ENV, flag)
    assert progress_shown() is shown
