"""Only fedlora's own ServerApp runs on the coordinator, as the operator.

A Flower SuperLink runs whatever ServerApp a submitted app bundle (FAB) names, with the
bundle's own code, as the user who started the SuperLink: it could read ``server.key``,
every client's update and the run folders, and message every agent. fedlora's SuperLink
(``fedlora.deploy.superlink``) refuses such a bundle when it is submitted, before it is
stored, and the launchers of Flower's ServerApp runtimes (``fedlora.deploy.local_api``)
check it again before it is unpacked, as an agent does (``fedlora.deploy.trusted_app``):
the bundle carries nothing but a ``pyproject.toml`` (and Flower's ``.info/`` hashes), its
ServerApp is ``fedlora.server.app:app``, its ClientApp ``fedlora.client.app:app`` (in a
simulation also fedlora's simulated attacker), and this machine already meets every
dependency it lists. What ``fedlora coordinator`` and ``fedlora simulate`` submit and what
``flwr run .`` builds from a checkout pass.
"""

from __future__ import annotations

import sys

from fedlora.deploy.trusted_app import TRUSTED_CLIENTAPP, UntrustedBundle, bundle_project, unmet_dependencies

TRUSTED_SERVERAPP = "fedlora.server.app:app"
SIMULATED_CLIENTAPPS = (TRUSTED_CLIENTAPP, "fedlora.flower.attacks:app")
REFUSED = "the coordinator runs only fedlora's own ServerApp: refused this app bundle"


def check_server_bundle(fab: bytes, simulation: bool = False) -> None:
    """Raise UntrustedBundle (one line) unless ``fab`` is a bundle of fedlora's own apps."""
    project = bundle_project(fab)
    components = project.get("tool", {}).get("flwr", {}).get("app", {}).get("components", {})
    if not isinstance(components, dict):
        raise UntrustedBundle("it names no ServerApp")
    if components.get("serverapp") != TRUSTED_SERVERAPP:
        raise UntrustedBundle(f"its ServerApp is {str(components.get('serverapp'))[:80]!r}, not {TRUSTED_SERVERAPP!r}")
    clientapps = SIMULATED_CLIENTAPPS if simulation else (TRUSTED_CLIENTAPP,)
    if components.get("clientapp") not in clientapps:
        raise UntrustedBundle(f"its ClientApp is {str(components.get('clientapp'))[:80]!r}, not {TRUSTED_CLIENTAPP!r}")
    missing = unmet_dependencies(project.get("project", {}).get("dependencies") or [])
    if missing:
        raise UntrustedBundle(
            f"it asks for dependencies this machine lacks ({', '.join(missing[:3])}); the coordinator installs nothing"
        )


def refuse_untrusted_bundles(runtime, simulation: bool) -> None:
    """Check the bundle in ``runtime`` (Flower's ServerApp or simulation runtime module)
    before Flower unpacks it: its ``install_from_fab`` runs only for a trusted bundle."""
    install = runtime.install_from_fab

    def install_checked(fab, *args, **kwargs):
        try:
            check_server_bundle(fab if isinstance(fab, bytes) else open(fab, "rb").read(), simulation)
        except UntrustedBundle as exc:
            print(f"fedlora: {REFUSED}: {exc}", file=sys.stderr, flush=True)
            raise
        return install(fab, *args, **kwargs)

    runtime.install_from_fab = install_checked


def refuse_at_submission(control_handlers, simulation: bool) -> None:
    """The SuperLink's Control API refuses an untrusted bundle when it is submitted, before
    it is stored: ``flwr run`` fails with one line. Flower reads every bundle a run starts
    from (sent, stored or fetched) through ``get_fab_config`` in ``control_handlers``."""
    from flwr.supercore.error import ApiErrorCode, FlowerError  # lazy: inside the SuperLink process only

    read_config = control_handlers.get_fab_config

    def get_fab_config(fab_file: bytes):
        try:
            check_server_bundle(fab_file, simulation)
        except UntrustedBundle as exc:
            reason = f"{REFUSED}: {exc}"
            raise FlowerError(ApiErrorCode.INVALID_RUN_CONFIG, reason, public_details=reason) from None
        return read_config(fab_file)

    control_handlers.get_fab_config = get_fab_config
