"""A deployed agent's resident trainer: the per-message ClientApp is a relay that imports no
torch, the trainer's answer is the direct handler's, a trainer that dies costs one
declined round and is started again, and one that cannot start says why in one line."""

import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from test_agent_privacy import Grid, agent, coordinator, reply_of

from fedlora.client.handler import train
from fedlora.client.relay import OP_TRAIN, REQUEST_FRAMES, relay
from fedlora.deploy.processes import child_env
from fedlora.deploy.trainer import ResidentTrainer, load_handler
from fedlora.deploy.trusted_app import _relay_loader, write_launcher
from fedlora.errors import UserError
from fedlora.flower.messages import RECORD
from fedlora.io import channel

pytestmark = pytest.mark.usefixtures("inside_a_flower_run")  # data_file: conftest


def in_process_trainer(state_dir):
    """The trainer's server and handler, on a thread of this process."""
    folder = channel.prepare_dir(channel.channel_dir(state_dir))
    server = channel.Server(
        channel.listen(folder), channel.new_secret(folder), load_handler(), {OP_TRAIN: REQUEST_FRAMES}, 1 << 30
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def state_records(context) -> dict:
    return {k: dict(v) for k, v in context.state.config_records.items()}


def test_the_relay_imports_no_torch(tmp_path):
    """The whole per-message process: Flower's ClientApp call into the relay, which finds
    no trainer here and declines."""
    script = f"""
import sys
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedlora.deploy.trusted_app import _relay_loader
import fedlora.client.relay as relay
TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
relay.CONNECT_WAIT_S = 0.2
app = _relay_loader([True])("fab", "1.0.0", "hash")
msg = Message(RecordDict({{"fedlora": ConfigRecord({{"run_config": "{{}}"}})}}), dst_node_id=7, message_type="train")
context = Context(run_id=1, node_id=7, node_config={{"state-dir": {str(tmp_path)!r}}}, state=RecordDict(), run_config={{}})
reply = app(msg, context)
assert dict(reply.content["fedlora"]) == {{"declined": "agent-error"}}, reply.content
assert "torch" not in sys.modules and "transformers" not in sys.modules, "torch imported"
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_the_launcher_runs_the_relay_only_after_the_bundle_check(tmp_path):
    with pytest.raises(Exception, match="no app bundle was checked"):
        _relay_loader([])("fab", "1.0.0", "hash")
    from fedlora.client.relay import app

    assert _relay_loader([True])("fab", "1.0.0", "hash") is app
    assert "main(relay=True)" in (write_launcher(tmp_path / "bin", relay=True) / "flwr-clientapp").read_text()
    assert "main(relay=False)" in (write_launcher(tmp_path / "plain") / "flwr-clientapp").read_text()


def test_through_the_trainer_the_same_seed_gives_the_same_adapter(data_file, tmp_path):
    """FFA-LoRA keeps its frozen A in the node state: that goes through the trainer and
    back too. Another job served in between must not leak into the next (a warm model)."""
    msg = coordinator("ffa").configure_train(1, None, None, Grid([7]))[0]
    direct_context = agent(data_file, tmp_path / "direct")
    direct = reply_of(train(msg, direct_context))
    state_dir = tmp_path / "relayed"
    in_process_trainer(state_dir)
    other = coordinator("fedavg", rank=4).configure_train(1, None, None, Grid([7]))[0]
    assert "payload" in reply_of(relay(other, agent(data_file, state_dir)))[0]
    relayed_context = agent(data_file, state_dir)
    relayed = reply_of(relay(msg, relayed_context))
    assert set(relayed[2].tensors) == set(direct[2].tensors) and relayed[2].tensors
    assert all(torch.equal(relayed[2].tensors[n], direct[2].tensors[n]) for n in direct[2].tensors)
    assert relayed[1].keys() == direct[1].keys() and relayed[1]["loss"] == direct[1]["loss"]
    assert state_records(relayed_context) == state_records(direct_context) != {}


def test_the_relay_declines_when_the_trainer_dies_or_is_busy(tmp_path):
    folder = channel.prepare_dir(channel.channel_dir(tmp_path))
    secret, sock = channel.new_secret(folder), channel.listen(folder)
    msg = Message(RecordDict({RECORD: ConfigRecord({"run_config": "{}"})}), dst_node_id=7, message_type="train")
    context = agent(tmp_path / "none.jsonl", tmp_path)
    kept = RecordDict({"kept": ConfigRecord({"x": 1})})
    context.state = kept

    def trainer(answer):  # reads the request; then busy, or gone without a reply
        conn, _ = sock.accept()
        assert channel.recv_frame(conn, 64, "secret") == secret
        channel.recv_json(conn)
        if answer:
            channel.send_json(conn, {"status": answer})
        if answer == "ready":
            channel.recv_frame(conn, 1 << 30, "message")
            channel.recv_frame(conn, 1 << 30, "context")
        conn.close()

    for answer, code in (("ready", "agent-error"), (None, "agent-error"), ("busy", "agent-busy")):
        thread = threading.Thread(target=trainer, args=(answer,), daemon=True)
        thread.start()
        reply = relay(msg, context)
        thread.join(10)
        assert dict(reply.content[RECORD]) == {"declined": code}
        assert context.state is kept  # nothing the trainer did not finish
    sock.close()


def trainer_pid(supervisor: ResidentTrainer) -> int:
    """The trainer itself: the guard's child."""
    children = psutil.Process(supervisor.proc.pid).children()
    assert len(children) == 1
    return children[0].pid


def test_a_trainer_that_dies_is_started_again(data_file, tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    supervisor = ResidentTrainer(state_dir, child_env(state_dir / "flower"))
    supervisor.start()
    try:
        first = trainer_pid(supervisor)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while supervisor.restarts < 1 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert supervisor.restarts == 1 and trainer_pid(supervisor) != first
        msg = coordinator().configure_train(1, None, None, Grid([7]))[0]
        record, metrics, payload = reply_of(relay(msg, agent(data_file, state_dir)))
        assert "declined" not in record and payload.tensors and metrics["train-seconds"] > 0
    finally:
        supervisor.stop()
    assert supervisor.proc.poll() is not None
    assert not (channel.channel_dir(state_dir) / channel.SOCKET_NAME).exists()


def test_a_trainer_that_cannot_start_says_why_in_one_line(tmp_path):
    for args in (["--state-dir", str(tmp_path / "missing")], ["--state-dir", str(tmp_path), "--max-request-mb", "0"]):
        proc = subprocess.run(
            [sys.executable, "-m", "fedlora.deploy.trainer", *args], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2 and proc.stdout == ""
        assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("fedlora trainer: ")
    (tmp_path / "blocked").mkdir()
    (tmp_path / "blocked" / "trainer").write_text("a file where the socket folder goes")
    with pytest.raises(UserError, match="socket folder"):
        ResidentTrainer(tmp_path / "blocked", child_env(tmp_path)).start()

    class Broken(ResidentTrainer):
        def command(self):
            return [*super().command(), "--max-request-mb", "0"]

    supervisor = Broken(tmp_path / "state", child_env(tmp_path))
    (tmp_path / "state").mkdir()
    with pytest.raises(UserError, match="the trainer could not start: --max-request-mb must be >= 1"):
        supervisor.start()
    assert supervisor.proc.poll() is not None  # nothing left running


def test_an_agent_whose_trainer_cannot_start_exits_2_with_one_line(data_file, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "trainer").write_text("a file where the socket folder goes")
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.cli", "client", "--coordinator", "127.0.0.1:9", "--insecure"]
        + ["--data", str(data_file), "--state-dir", str(state), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "socket folder" in proc.stderr
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(state) in " ".join(p.info["cmdline"] or [])]


def test_the_supernode_entry_point_shortens_flowers_own_sleeps(monkeypatch):
    """It replaces the module's ``time``: that module must still sleep through it."""
    import ast
    import importlib

    from fedlora.deploy.supernode import MODULE, ShortSleeps

    internal = importlib.import_module(MODULE)
    assert internal.time is time
    calls = [
        node.args[0].value
        for node in ast.walk(ast.parse(open(internal.__file__).read()))
        if isinstance(node, ast.Call)
        and ast.unparse(node.func) == "time.sleep"
        and isinstance(node.args[0], ast.Constant)
    ]
    assert 3 in calls  # the idle poll that fedlora shortens
    clock, slept, now = ShortSleeps(0.2), [], [100.0]
    monkeypatch.setattr(time, "sleep", slept.append)
    monkeypatch.setattr(time, "monotonic", lambda: now[0])
    clock.worked = now[0]
    for step, seconds in ((1, 3), (1, 0.5), (9, 3), (2, 3), (0, 0.5), (1, 3)):
        now[0] += step
        clock.sleep(seconds)
    # short while working and for 10 s after; Flower's own 3 s for a long-idle agent
    assert slept == [0.2, 0.2, 0.2, 3, 0.2, 0.2] and clock.time() > 0
    proc = subprocess.run(
        [sys.executable, "-m", "fedlora.deploy.supernode"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 1 and "usage" in proc.stderr
