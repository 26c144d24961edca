"""What third-party libraries print: nothing by default, all of it with ``--verbose``.

transformers reports every model load (a ``LOAD REPORT`` table: the classifier head that
fedlora adds is "MISSING" from a base checkpoint, as it should be), and torch, PEFT and
Opacus warn about things fedlora already handles. fedlora's own lines and errors are what a
user reads; ``fedlora <command> --verbose`` (``FEDLORA_VERBOSE=1``) shows the rest again. The
settings travel in the environment, so Flower's processes and Ray's workers inherit them.
"""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_ENV = "FEDLORA_VERBOSE"
# set only where the user set nothing; ``be_verbose`` takes back only what we set
QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
_SET_BY_US: set[str] = set()


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def quiet_third_parties() -> None:
    """Silence third-party reports and warnings in this process and its children, unless verbose."""
    if verbose():
        return
    for key, value in QUIET_ENV.items():
        if key not in os.environ:
            os.environ[key] = value
            _SET_BY_US.add(key)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def be_verbose() -> None:
    """``--verbose``: third-party reports and warnings are shown, here and in child processes."""
    os.environ[VERBOSE_ENV] = "1"
    for key in _SET_BY_US:
        os.environ.pop(key, None)
    _SET_BY_US.clear()
    logging.getLogger("transformers").setLevel(logging.WARNING)
    warnings.resetwarnings()
