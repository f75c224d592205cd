"""pdserve's execution core: paged KV cache, continuous batching, prefix caching, models.

``from engine import LLM, SamplingParams`` for offline generation; workers drive ``Engine``.
Names are imported lazily so that the pure-Python parts (block pool, hashing, scheduler)
load without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "LLM": "pdserve.engine.llm",
    "Engine": "pdserve.engine.engine",
    "EngineStats": "pdserve.engine.engine",
    "Reservation": "pdserve.engine.handoff",
    "RequestOutput": "pdserve.engine.outputs",
    "SamplingParams": "pdserve.engine.sampling",
    "EngineConfig": "pdserve.engine.config",
    "CacheConfig": "pdserve.engine.config",
    "SchedulerConfig": "pdserve.engine.config",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
