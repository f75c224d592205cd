"""pdserve: LLM serving with prefill and decode disaggregated onto separate worker pools.

Installed, every part of the server is a subpackage of this one import root:
``pdserve.engine`` (the execution core), ``pdserve.kvtransfer`` (KV block transfer),
``pdserve.worker`` (what both worker roles share), ``pdserve.prefill_worker``,
``pdserve.decode_worker``, ``pdserve.router`` (the public entry point), ``pdserve.protos``
(wire types), ``pdserve.bench`` (benchmarks) and ``pdserve.cli`` (the ``pdserve`` command).
The client SDK is the separate ``pdserve_client`` distribution.

In a source checkout those subpackages are the folders at the top of the repository
(``engine/``, ``router/``, ...), mapped under ``pdserve`` by the build. So that a checkout
that is only on ``sys.path`` (``python -m`` from its root, or a Ray job's ``working_dir``)
imports the same names as an installed wheel, the checkout's root joins this package's
search path when this folder sits in one (a ``pyproject.toml`` beside it).
"""

from __future__ import annotations

from pathlib import Path

from pdserve._version import __version__

__all__ = ["__version__"]

_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "engine" / "__init__.py").is_file():
    if str(_checkout) not in __path__:
        __path__.append(str(_checkout))
