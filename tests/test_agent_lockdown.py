"""An agent's machine: only the agent answers for the agent. Its SuperNode's runtime API (task
tokens, the coordinator's messages, the node's context, replies) is a Unix socket only the
agent's user can open, no loopback TCP port; task tokens and the agent's settings stay off
command lines; its state folder is its user's alone. (The same, checked during real rounds,
is in test_agent_restart.py.)"""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from deployment_helpers import connect_as_another_user, listening_ports
from flwr.common.config import parse_config_args

from fedlora.deploy.agent import node_config, own_state_dir, private_node_config
from fedlora.deploy.local_api import NOMINAL_ADDRESS, TOKEN_DIR
from fedlora.deploy.processes import child_env, stop
from fedlora.deploy.trusted_app import write_launcher
from fedlora.errors import UserError
from fedlora.io.agent_state import AgentPrivacy
from fedlora.io.agent_task import AgentTask

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="becoming another OS user needs root")


def one_line_error(call, match: str) -> str:
    with pytest.raises(UserError, match=match) as refused:
        call()
    assert "\n" not in str(refused.value)
    return str(refused.value)


def test_the_state_folder_is_its_users_alone(tmp_path, capsys):
    fresh = own_state_dir(tmp_path / "new" / "state")
    assert fresh.stat().st_mode & 0o777 == 0o700 and capsys.readouterr().out == ""
    opened = tmp_path / "opened"
    opened.mkdir(mode=0o755)
    opened.chmod(0o755)
    own_state_dir(opened)
    assert opened.stat().st_mode & 0o777 == 0o700
    said = capsys.readouterr().out.strip()
    assert said.splitlines() == [said] and "was 0755: now 0700" in said
    own_state_dir(opened)
    assert capsys.readouterr().out == ""  # already the user's alone: nothing to say
    (tmp_path / "a-file").write_text("")
    one_line_error(lambda: own_state_dir(tmp_path / "a-file"), "cannot use the state folder")


@AS_ROOT
def test_a_state_folder_of_another_user_is_refused(tmp_path):
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, 54321, 54321)
    one_line_error(lambda: own_state_dir(theirs), "belongs to another user")


def test_the_node_config_stays_off_the_command_line_and_reads_the_same(tmp_path):
    """Every user sees a process's command line: the agent's data path, privacy settings and
    declared labels go to its SuperNode in a file, 0600, that Flower reads as it reads the line."""
    data = tmp_path / "a folder" / 'x"y=z.jsonl'
    own = AgentPrivacy(epsilon=8.0, delta=1e-6, clip=0.5, max_steps=400)
    task = AgentTask(text_column="it's", labels=("it's", 'say "hi"', "a b=c", "ünï", "x\ny"))
    config = node_config(data, 4, "auto", own, tmp_path / "state", 120, "ab" * 32, task=task)
    path = private_node_config(config, tmp_path / "node-config.toml")
    assert path.stat().st_mode & 0o777 == 0o600
    assert parse_config_args([str(path)]) == parse_config_args([config])
    assert private_node_config(config, path) == path  # a restart writes it afresh


LAUNCHED_SUPEREXEC = """
import importlib, sys
from flwr.supercore.constant import TaskType
from flwr.supercore.superexec.plugin import AutoExecPlugin

def instead():
    executor = __import__("flwr.supercore.superexec.executor.subprocess_executor", fromlist=["x"])
    from flwr.supercore.protobuf.client import ProtobufClient
    client = ProtobufClient("http://" + sys.argv[2])
    print(sorted(AutoExecPlugin.supported_task_types) == [TaskType.CLIENT_APP])
    print(type(executor.subprocess).__name__ == "_Namespace")
    print(client._client._transport._pool._uds)

importlib.import_module("flwr.supercore.cli.flower_superexec").flower_superexec = instead
from fedlora.deploy.trusted_app import superexec
superexec(sys.argv[1])
"""


def test_the_agents_superexec_takes_clientapp_tasks_only_through_the_socket(tmp_path):
    """Flower's SuperExec would start any task the coordinator's run asks for, an AgentApp
    (Flower's flwr-agentapp, running the bundle's own code) among them."""
    sock = tmp_path / "api" / "supernode.sock"
    proc = subprocess.run(
        [sys.executable, "-c", LAUNCHED_SUPEREXEC, str(sock), NOMINAL_ADDRESS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "True", str(sock)]
    assert (sock.parent / TOKEN_DIR).stat().st_mode & 0o777 == 0o700


def test_the_clientapp_launcher_removes_its_token_file(tmp_path, monkeypatch):
    from fedlora.deploy import trusted_app

    token_file = tmp_path / "t"
    token_file.write_text("s3cret\n")
    seen = {}
    monkeypatch.setattr(sys, "argv", ["flwr-clientapp", "--insecure", "--token-file", str(token_file)])
    trusted_app._flwr_clientapp(lambda **kwargs: seen.update(kwargs))
    assert seen["token"] == "s3cret" and not token_file.exists()


def test_the_supernode_serves_its_runtime_api_on_a_socket_only_its_user_opens(tmp_path):
    """A real SuperNode (no SuperLink to reach: it keeps retrying) with the agent's launchers:
    no TCP port is listened on anywhere in its tree, its SuperExec talks to it through the
    socket, and another OS user cannot connect, through the folder or to the socket itself."""
    state = tmp_path / "state"
    sock = state / "api" / "supernode.sock"
    own_state_dir(state)
    env = child_env(state / "flower")
    env["PATH"] = f"{write_launcher(state / 'bin', relay=True, api_socket=sock)}{os.pathsep}{env['PATH']}"
    cmd = [sys.executable, "-m", "fedlora.deploy.supernode", "--poll-s", "0.2", "--api-socket", str(sock)]
    cmd += ["--insecure", "--superlink", "127.0.0.1:9", "--max-wait-time", "120"]
    node = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        superexec = _wait_for_superexec(node, sock)
        assert superexec[2:6] == ["--insecure", "--runtime-api-address", NOMINAL_ADDRESS, "--parent-pid"]
        assert listening_ports(node.pid) == set()
        assert sock.stat().st_mode & 0o777 == 0o600 and sock.parent.stat().st_mode & 0o777 == 0o700
        import httpx

        with httpx.Client(transport=httpx.HTTPTransport(uds=str(sock))) as owner:
            assert owner.get("http://agent/health").status_code == 200
        if os.geteuid() == 0:
            assert connect_as_another_user(state, "api/supernode.sock") == "Permission denied"
            sock.parent.chmod(0o711)  # the folder open to all: the socket's own mode still holds
            try:
                assert connect_as_another_user(sock.parent, sock.name) == "Permission denied"
            finally:
                sock.parent.chmod(0o700)
    finally:
        stop(node, grace_s=10)
        node.stdout.close()


def _wait_for_superexec(node: subprocess.Popen, sock: Path) -> list[str]:
    """The command line of the SuperNode's SuperExec, once it and the socket are up."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert node.poll() is None, node.stdout.read().decode(errors="replace")
        for child in psutil.Process(node.pid).children(recursive=True):
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if len(cmdline) > 1 and cmdline[1].endswith("bin/flower-superexec") and _answers(sock):
                return cmdline
        time.sleep(0.2)
    raise AssertionError("the SuperNode's SuperExec did not start")


def _answers(sock: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(sock))
            return True
        except OSError:
            return False
