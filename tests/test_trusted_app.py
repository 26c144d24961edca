"""An agent runs only fedlora's own ClientApp: the bundle a coordinator sends may name it
and nothing else, carry no code and ask for nothing this machine has not installed."""

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from fedlora.deploy.coordinator import APP_PYPROJECT
from fedlora.deploy.trusted_app import UntrustedBundle, check_bundle, write_launcher


def bundle(files: dict[str, str]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, text in {**files, ".info/CONTENT": "hashes"}.items():
            archive.writestr(name, text)
    return out.getvalue()


def test_the_coordinators_own_bundle_is_accepted():
    check_bundle(bundle({"pyproject.toml": APP_PYPROJECT}))


@pytest.mark.parametrize(
    "files,reason",
    [
        ({"pyproject.toml": APP_PYPROJECT, "evil.py": "import os"}, "code or files of its own"),
        ({"pyproject.toml": APP_PYPROJECT, "fedlora/client/app.py": "app = None"}, "code or files of its own"),
        (
            {"pyproject.toml": APP_PYPROJECT.replace("fedlora.client.app:app", "evil:app")},
            "not 'fedlora.client.app:app'",
        ),
        ({"pyproject.toml": APP_PYPROJECT.replace("dependencies = []", 'dependencies = ["stealer"]')}, "dependencies"),
        ({"pyproject.toml": "not [toml"}, "not a readable"),
        ({}, "no pyproject.toml"),
    ],
)
def test_any_other_bundle_is_refused(files, reason):
    with pytest.raises(UntrustedBundle, match=reason):
        check_bundle(bundle(files))
    with pytest.raises(UntrustedBundle, match="not a readable"):
        check_bundle(b"PK\x03\x04 garbage")


ESCAPING_VERSION = APP_PYPROJECT.replace('version = "1.0.0"', 'version = "1.0.0/../../../escaped"')


def test_a_bundle_whose_names_leave_flowers_home_is_refused(tmp_path):
    """Flower installs a bundle in $FLWR_HOME/apps/<publisher>.<name>.<version>.<hash>, and
    writes its pyproject.toml there: a version (or name, or publisher) with a path in it
    takes that elsewhere. The check refuses it in one line, before anything is unpacked."""
    from flwr.cli.install import validate_and_install

    project = tmp_path / "project"
    project.mkdir()
    (project / "pyproject.toml").write_text(ESCAPING_VERSION)
    home = tmp_path / "home" / "flwr"
    installed = validate_and_install(project, "ab" * 32, None, home, skip_prompt=True)
    assert (installed / "pyproject.toml").is_file() and not installed.resolve().is_relative_to(home)  # the hole
    names = {
        "version": ESCAPING_VERSION,
        "name": APP_PYPROJECT.replace('name = "fedlora-run"', 'name = "../run"'),
        "publisher": APP_PYPROJECT.replace('publisher = "fedlora"', 'publisher = "a/b"'),
    }
    for field, pyproject in names.items():
        with pytest.raises(UntrustedBundle, match=f"its {field} .* is not a plain name") as refused:
            check_bundle(bundle({"pyproject.toml": pyproject}))
        assert "\n" not in str(refused.value)
    with pytest.raises(UntrustedBundle, match="its version 1 is not a plain name"):
        check_bundle(bundle({"pyproject.toml": APP_PYPROJECT.replace('version = "1.0.0"', "version = 1")}))
    for version in ("0.1.0", "1.0.0+local.7", "1!2.0rc1.post3.dev4"):  # what versions look like pass
        check_bundle(bundle({"pyproject.toml": APP_PYPROJECT.replace("1.0.0", version)}))


def with_dependencies(*requirements: str) -> bytes:
    listed = ", ".join(f'"{r}"' for r in requirements)
    return bundle({"pyproject.toml": APP_PYPROJECT.replace("dependencies = []", f"dependencies = [{listed}]")})


def test_dependencies_this_machine_already_meets_are_accepted():
    """A checkout's pyproject lists fedlora's own dependencies; the agent's environment meets
    them, and nothing gets installed either way."""
    from importlib import metadata

    flwr = metadata.version("flwr")
    check_bundle(with_dependencies(f"flwr=={flwr}", "torch>=2", "safetensors", "nonexistent-pkg; python_version < '3'"))


@pytest.mark.parametrize(
    "requirement",
    ["flwr<1", "torch>=99", "not a requirement !!", "peft @ https://example.org/peft.whl", "never-installed-pkg"],
)
def test_a_dependency_this_machine_lacks_is_refused(requirement):
    with pytest.raises(UntrustedBundle, match="dependencies this machine lacks"):
        check_bundle(with_dependencies("safetensors", requirement))


def test_the_launcher_never_installs_dependencies(monkeypatch):
    """Whatever the SuperNode asks, Flower's runtime dependency installation stays off."""
    from fedlora.deploy import trusted_app

    seen = {}
    monkeypatch.setattr(
        sys, "argv", ["flwr-clientapp", "--insecure", "--token", "t", "--allow-runtime-dependency-installation"]
    )
    trusted_app._flwr_clientapp(lambda **kwargs: seen.update(kwargs))
    assert seen["runtime_dependency_install"] is False and seen["token"] == "t"


def test_the_launcher_wraps_flowers_clientapp_entry_point(tmp_path):
    """The function it patches must exist in this flwr, or the check would silently not run."""
    from flwr.supernode.runtime import run_clientapp

    assert callable(run_clientapp.install_from_fab)
    folder = write_launcher(tmp_path / "bin")
    launcher = folder / "flwr-clientapp"
    assert launcher.stat().st_mode & 0o777 == 0o700 and folder.stat().st_mode & 0o777 == 0o700
    proc = subprocess.run(
        [str(launcher), "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}"},
    )
    assert proc.returncode == 0 and "--runtime-api-address" in proc.stdout
    assert launcher.read_text().startswith(f"#!{sys.executable}")


def test_with_the_api_socket_both_launchers_reach_the_supernode_through_it(tmp_path):
    sock = tmp_path / "api" / "supernode.sock"
    folder = write_launcher(tmp_path / "bin", relay=True, api_socket=sock)
    assert sorted(p.name for p in folder.iterdir()) == ["flower-superexec", "flwr-clientapp"]
    assert all(p.stat().st_mode & 0o777 == 0o700 for p in folder.iterdir())
    assert f"main(relay=True, api_socket={str(sock)!r})" in (folder / "flwr-clientapp").read_text()
    assert f"superexec({str(sock)!r})" in (folder / "flower-superexec").read_text()


def test_the_launchers_command_line_is_flowers_own(tmp_path):
    """The launcher parses flwr-clientapp's options itself (Flower's command imports the
    whole SuperNode): the same options as Flower's, or the SuperNode could not start it."""
    import re

    def options(cmd: list[str]) -> set[str]:
        text = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
        return set(re.findall(r"(--[a-z][a-z-]+)", text))

    launcher = write_launcher(tmp_path / "bin", relay=True) / "flwr-clientapp"
    flowers = str(Path(sys.executable).parent / "flwr-clientapp")
    ours = options([str(launcher), "--help"])
    assert "--runtime-api-address" in ours and ours == options([flowers, "--help"])
