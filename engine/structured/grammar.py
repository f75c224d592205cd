"""Turning a ``StructuredSpec`` into an xgrammar grammar: parsing (tokenizer-free, cheap,
what the router checks before admitting a request) and compiling against one tokenizer
(what an engine's matchers need).

``check(spec)`` raises ``ValueError`` naming what is wrong with a schema, regex, grammar or
choice list the backend cannot build. ``GrammarCompiler`` compiles specs on a small thread
pool, never on the caller's thread, and caches the results per ``spec.key`` (xgrammar's own
compiler cache holds the compiled masks; this one holds the futures, so concurrent requests
with one schema wait for one compilation).
"""

from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pdserve.engine.structured.spec import StructuredSpec

logger = logging.getLogger(__name__)

_CACHE_ENTRIES = 256  # compiled grammars kept per engine (least recently used dropped)


def _xgr() -> Any:
    import xgrammar

    return xgrammar


def choice_ebnf(choices: Sequence[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices``."""
    alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
    return f"root ::= {alts}"


_STRING_CHAR = '[^\\x00-\\x1f"\\\\]'  # a JSON string character needing no escape


def _bounded_strings(node: Any) -> Any:
    """``node`` (a JSON schema) with every string bounded by ``minLength``/``maxLength``
    (and no pattern or format of its own) given the equivalent ``pattern``: xgrammar's
    length-bounded string rule lets raw control characters through, which is not JSON."""
    if isinstance(node, list):
        return [_bounded_strings(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _bounded_strings(v) for k, v in node.items()}
    if (out.get("type") == "string" and ("minLength" in out or "maxLength" in out)
            and not {"pattern", "format", "enum", "const"} & out.keys()):
        lo = int(out.pop("minLength", 0))
        hi = out.pop("maxLength", None)
        out["pattern"] = f"^{_STRING_CHAR}{{{lo},{'' if hi is None else int(hi)}}}$"
    return out


def _grammar(spec: StructuredSpec) -> Any:
    """The xgrammar ``Grammar`` of ``spec`` (tokenizer-independent)."""
    xgr = _xgr()
    if spec.kind == "json":
        schema = json.dumps(_bounded_strings(json.loads(spec.value)))
        return xgr.Grammar.from_json_schema(schema, any_whitespace=False, strict_mode=True)
    if spec.kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
    if spec.kind == "regex":
        return xgr.Grammar.from_regex(spec.value)
    if spec.kind == "choice":
        return xgr.Grammar.from_ebnf(choice_ebnf(spec.choices()))
    return xgr.Grammar.from_ebnf(spec.value)


_WHAT = {"json": "JSON schema", "json_object": "JSON object grammar", "regex": "regex",
         "choice": "choice list", "grammar": "grammar"}


def check(spec: StructuredSpec) -> None:
    """``ValueError`` (with the backend's reason, clipped) if ``spec`` cannot be built."""
    if spec.kind == "json":
        try:
            json.loads(spec.value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
    try:
        _grammar(spec)
    except Exception as exc:  # xgrammar raises RuntimeError / ValueError variants
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"the {_WHAT[spec.kind]} cannot be compiled: {reason[:300]}") from None


class GrammarCompiler:
    """Compiles specs for one tokenizer, off the caller's thread; thread-safe.

    ``tokenizer_info`` is called once, on a pool thread, to build xgrammar's
    ``TokenizerInfo`` (loading a tokenizer takes a while; engines that never see a
    structured request never pay for it)."""

    def __init__(self, tokenizer_info: Callable[[], Any], max_workers: int = 2) -> None:
        self._make_info = tokenizer_info
        self._pool = ThreadPoolExecutor(max_workers=max_workers,
                                        thread_name_prefix="grammar-compile")
        self._lock = threading.Lock()
        self._compiler: Any = None
        self._cache: OrderedDict[tuple[str, str], Future[Any]] = OrderedDict()
        self.compiled = 0  # compilations run (cache misses)

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                xgr = _xgr()
                self._compiler = xgr.GrammarCompiler(self._make_info(), max_threads=1,
                                                     cache_enabled=True)
            return self._compiler

    def _compile(self, spec: StructuredSpec) -> Any:
        compiler = self._get_compiler()
        try:
            grammar = _grammar(spec)
        except Exception as exc:
            raise ValueError(f"the {_WHAT[spec.kind]} cannot be compiled: "
                             f"{str(exc)[:300]}") from None
        self.compiled += 1
        return compiler.compile_grammar(grammar)

    def submit(self, spec: StructuredSpec) -> Future[Any]:
        """The compiled grammar of ``spec``, as a future (shared by equal specs)."""
        with self._lock:
            fut = self._cache.get(spec.key)
            if fut is not None and not (fut.done() and fut.exception() is not None):
                self._cache.move_to_end(spec.key)
                return fut
            fut = self._pool.submit(self._compile, spec)
            self._cache[spec.key] = fut
            while len(self._cache) > _CACHE_ENTRIES:
                self._cache.popitem(last=False)
            return fut

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
