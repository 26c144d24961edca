"""The coordinator's machine: no one but the operator submits runs or reaches the SuperLink's
local API, the coordinator runs only fedlora's own ServerApp, the run config's paths stay in
the served folder, and no coordinator path reaches an agent. (The checks against a running
coordinator are in test_flower_app.py and test_deployment.py.)"""

import io
import json
import os
import socket
import sys
import tomllib
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedlora.config import RunConfig
from fedlora.config.server_settings import SERVER_SETTINGS, read_server_settings
from fedlora.deploy import local_api
from fedlora.deploy.coordinator import APP_PYPROJECT, write_app
from fedlora.deploy.local_api import ApiSocketError, bind_private_socket, connectable, write_launchers
from fedlora.deploy.superlink import parse
from fedlora.deploy.trusted_app import UntrustedBundle
from fedlora.deploy.trusted_server import check_server_bundle
from fedlora.errors import UserError
from fedlora.server import federation as federation_module
from fedlora.server.app import inside_served, log_name, run_folder

ROOT = Path(__file__).resolve().parents[1]


def bundle(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def one_line_error(call, match: str) -> str:
    with pytest.raises(UserError, match=match) as refused:
        call()
    assert "\n" not in str(refused.value)
    return str(refused.value)


def test_run_config_paths_stay_in_the_served_folder(tmp_path):
    served = tmp_path / "served"
    (served / "runs").mkdir(parents=True)
    assert inside_served(served, "out-dir", "runs/a") == served / "runs" / "a"
    assert inside_served(served, "out-dir", ".") == served
    assert (
        inside_served(served, "hold-until", ".flower/inputs-checked", hidden=True)
        == served / ".flower" / "inputs-checked"
    )
    one_line_error(lambda: inside_served(served, "out-dir", str(tmp_path / "elsewhere")), "relative to the served")
    one_line_error(lambda: inside_served(served, "out-dir", "runs/../../elsewhere"), "'..' is not allowed")
    one_line_error(lambda: inside_served(served, "hold-until", "../x", hidden=True), "'..' is not allowed")
    one_line_error(lambda: inside_served(served, "out-dir", ".flower"), "hidden folder")
    one_line_error(lambda: inside_served(served, "out-dir", "runs/.flower/bin"), "hidden folder")
    (served / "runs" / "away").symlink_to(tmp_path)
    one_line_error(lambda: inside_served(served, "out-dir", "runs/away/x"), "outside the served folder")


def test_the_log_name_is_a_plain_file_name():
    assert log_name({"log-name": "coordinator.log"}) == "coordinator.log" and log_name({}) == ""
    for bad in ("../x.log", "a/b.log", "/etc/passwd", ".hidden", ".."):
        one_line_error(lambda bad=bad: log_name({"log-name": bad}), "plain file name")


def test_the_run_folder_from_out_dir_or_the_out_setting_is_checked_too(tmp_path):
    cfg = RunConfig()
    one_line_error(lambda: run_folder({"out-dir": "/tmp/x"}, cfg, tmp_path), "out-dir")
    cfg.update({"out": str(tmp_path / "x")})  # `flwr run . --run-config "out='/...'"`
    one_line_error(lambda: run_folder({"out-dir": ""}, cfg, tmp_path), "run config out =")


def fedlora_bundle(clientapp: str = "fedlora.client.app:app", serverapp: str = "fedlora.server.app:app") -> bytes:
    pyproject = APP_PYPROJECT.replace('"fedlora.client.app:app"', json.dumps(clientapp))
    return bundle({"pyproject.toml": pyproject.replace('"fedlora.server.app:app"', json.dumps(serverapp))})


def test_the_coordinator_runs_only_fedloras_own_serverapp():
    from flwr.cli.build import build_fab_from_disk

    check_server_bundle(fedlora_bundle())  # what fedlora coordinator submits
    check_server_bundle(build_fab_from_disk(ROOT))  # what `flwr run .` builds from a checkout
    check_server_bundle(fedlora_bundle("fedlora.flower.attacks:app"), simulation=True)
    refusals = {
        "code": bundle({"pyproject.toml": APP_PYPROJECT, "foreign.py": "print('hi')"}),
        "'foreign:app'": fedlora_bundle(serverapp="foreign:app"),
        "'fedlora.flower.attacks:app'": fedlora_bundle("fedlora.flower.attacks:app"),  # a deployment's agents are real
        "not a readable": b"not a zip",
        "lacks": bundle(
            {"pyproject.toml": APP_PYPROJECT.replace("dependencies = []", 'dependencies = ["nonesuch>=1"]')}
        ),
    }
    for reason, fab in refusals.items():
        with pytest.raises(UntrustedBundle, match=reason) as refused:
            check_server_bundle(fab)
        assert "\n" not in str(refused.value)


def test_agents_receive_no_coordinator_path(tmp_path):
    """Flower hands the run config to every SuperNode: it carries no path of the coordinator
    (its run folder, data files, or a hold file); they go to its ServerApp in a private file."""
    out = tmp_path / "the-coordinators-run-folder"
    cfg = RunConfig(out=str(out), data=str(tmp_path / "eval-source.jsonl"), eval_data=str(tmp_path / "held-out.csv"))
    run_config = write_app(out / ".flower" / "app", cfg, out, resume=False, log_name="coordinator.log")
    text = run_config.read_text()
    assert str(tmp_path) not in text
    sent = tomllib.loads(text)
    assert sent["out-dir"] == "." and sent["hold-until"] == ""
    shared = json.loads(sent["fedlora-config"])
    assert not {"out", "data", "eval_data"} & set(shared) and shared["rounds"] == cfg.rounds
    private = read_server_settings(out, out)
    assert (private["out"], private["data"], private["eval_data"]) == (cfg.out, cfg.data, cfg.eval_data)
    assert (out / SERVER_SETTINGS).stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize("simulated", [False, True])
def test_the_messages_carry_no_coordinator_path_to_agents(tmp_path, monkeypatch, simulated):
    """What each train message carries as the run's settings: a deployed agent gets no path of
    the coordinator's; a simulated client (this machine) reads its partition of --data."""
    sent = []
    monkeypatch.setattr(
        federation_module, "FlowerStrategy", lambda strategy, state, settings, **_: sent.append(settings)
    )
    cfg = RunConfig(out=str(tmp_path / "out"), data=str(tmp_path / "d.jsonl"), eval_data=str(tmp_path / "e.jsonl"))
    fed = federation_module.Federation(
        None, cfg, tmp_path, client_state_dir=tmp_path / "clients" if simulated else None
    )
    fed.splits, fed.strategy = SimpleNamespace(label_names=["a", "b"]), None
    fed._bridge({}, None)
    settings = json.loads(sent[0])
    if simulated:
        assert settings["data"] == cfg.data
    else:
        assert str(tmp_path) not in sent[0] and not {"out", "data", "eval_data"} & set(settings)


def test_the_api_socket_is_the_owners_alone_and_never_taken_over(tmp_path):
    folder = tmp_path / ("x" * 120)  # past the kernel's limit on a socket's path
    path = folder / "superlink.sock"
    sock = bind_private_socket(path)
    try:
        assert path.stat().st_mode & 0o777 == 0o600 and folder.stat().st_mode & 0o777 == 0o700
        with pytest.raises(ApiSocketError, match="another SuperLink serves"):
            bind_private_socket(path)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(connectable(path))
    finally:
        sock.close()
    bind_private_socket(path).close()  # nothing listens on it now: replaced
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(ApiSocketError, match="not a socket"):
        bind_private_socket(path)


def test_the_launchers_are_the_owners_alone(tmp_path):
    folder = write_launchers(tmp_path / "bin", tmp_path / "s.sock", tmp_path / "cli")
    assert sorted(p.name for p in folder.iterdir()) == sorted(local_api.LAUNCHED)
    assert folder.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in folder.iterdir())
    assert (folder / "flwr").read_text().startswith(f"#!{sys.executable}\n")


def test_superexec_hands_tokens_over_in_files_not_on_command_lines(tmp_path, monkeypatch):
    import subprocess

    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, *a, **k: started.append(args))
    local_api.pass_tokens_in_files(tmp_path / "tokens")
    executor = __import__("flwr.supercore.superexec.executor.subprocess_executor", fromlist=["x"])
    try:
        executor.subprocess.Popen(["flwr-serverapp", "--runtime-api-address", "127.0.0.1:1", "--token", "s3cret"])
    finally:
        executor.subprocess = subprocess
    (args,) = started
    assert "s3cret" not in args and args[-2] == "--token-file"
    token_file = Path(args[-1])
    assert token_file.read_text() == "s3cret" and token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.parent.stat().st_mode & 0o777 == 0o700


def test_the_superlink_entry_takes_an_api_socket():
    limits = ["--max-message-bytes", "9", "--max-reply-bytes", "9", "--max-reply-objects", "9"]
    assert parse([*limits, "--api-socket", "/x/s.sock", "--insecure"]) == (
        {"--max-message-bytes": 9, "--max-reply-bytes": 9, "--max-reply-objects": 9},
        Path("/x/s.sock"),
        ["--insecure"],
    )
    assert parse(limits)[1] is None
    with pytest.raises(SystemExit):
        parse([*limits, "--api-socket", "a", "--api-socket", "b"])


def test_the_served_folder_is_what_the_superlink_names(tmp_path, monkeypatch):
    from fedlora.config.server_settings import SERVED_FOLDER_ENV
    from fedlora.server.app import served_folder

    monkeypatch.setenv(SERVED_FOLDER_ENV, str(tmp_path))
    assert served_folder() == tmp_path.resolve()
    monkeypatch.delenv(SERVED_FOLDER_ENV)
    assert served_folder() == Path(os.getcwd()).resolve()
