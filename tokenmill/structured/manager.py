"""StructuredOutputManager: validates specs, compiles them off the event loop (cached), masks logits."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from tokenmill.errors import InvalidRequestError
from tokenmill.structured import bitmask, constraints
from tokenmill.structured.backends import BACKEND_NAMES, BACKENDS
from tokenmill.structured.interface import (
    BackendMatcher,
    CompiledGrammar,
    GrammarBackend,
    GrammarMatcher,
)
from tokenmill.structured.spec import StructuredSpec
from tokenmill.structured.vocab import TokenVocab, build_token_vocab
from tokenmill.tokenizer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

_CacheKey = tuple[str, str, str, str | None]  # (backend, kind, value, whitespace_pattern)


class StructuredOutputManager:
    """Everything the engine and server need for structured outputs, for one tokenizer.

    Compiled grammars are cached in an LRU keyed by (backend, kind, value, whitespace_pattern)
    (the tokenizer is fixed per manager); concurrent requests for one spec share one
    compilation. Compilation runs in worker threads (the backends release the GIL).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int,
        default_backend: str = "xgrammar",
        max_workers: int = 1,
        max_cache_entries: int = 256,
        max_spec_chars: int = 1_000_000,
        compile_timeout_s: float = 60.0,
    ) -> None:
        if default_backend not in BACKENDS:
            raise ValueError(
                f"unknown guided decoding backend {default_backend!r}; "
                f"choose one of {', '.join(BACKEND_NAMES)}"
            )
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # logits width; may exceed the tokenizer's vocab
        self.default_backend = default_backend
        self.max_cache_entries = max_cache_entries
        self.max_spec_chars = max_spec_chars
        # a request waits this long for its grammar, then gets a 400 (the compile goes on in
        # its worker, which cannot be stopped, and its result is cached for the next asker)
        self.compile_timeout_s = compile_timeout_s
        self.num_compilations = 0  # backend compile calls (cache misses), for tests and metrics
        self._executor = ThreadPoolExecutor(max_workers, thread_name_prefix="tokenmill-grammar")
        self._lock = threading.Lock()  # guards the cache, the pending map and the counters
        self._setup_lock = threading.Lock()  # guards the lazy vocab and backends
        self._cache: OrderedDict[_CacheKey, CompiledGrammar] = OrderedDict()
        self._pending: dict[_CacheKey, Future[CompiledGrammar]] = {}
        self._vocab: TokenVocab | None = None
        self._backends: dict[str, GrammarBackend] = {}

    # -- API boundary ------------------------------------------------------------------------

    def backend_name(self, spec: StructuredSpec) -> str:
        """The backend that compiles `spec`: its own, else the server default."""
        return spec.backend or self.default_backend

    def validate(self, spec: StructuredSpec) -> None:
        """Cheap checks before admitting a request (backend known and able, size); 400 if not."""
        name = self.backend_name(spec)
        info = BACKENDS.get(name)
        if info is None:
            raise InvalidRequestError(
                f"unknown guided_decoding_backend {name!r}; choose one of "
                f"{', '.join(BACKEND_NAMES)}",
                param="guided_decoding_backend",
            )
        if spec.kind not in info.kinds:
            raise constraints.invalid(
                spec, f"the {name} backend cannot express a {spec.kind} constraint; use xgrammar"
            )
        if spec.whitespace_pattern is not None and not info.supports_whitespace_pattern:
            raise InvalidRequestError(
                f"the {name} backend does not support a JSON whitespace pattern",
                param="guided_whitespace_pattern",
            )
        if len(spec.value) > self.max_spec_chars:
            raise constraints.invalid(
                spec,
                f"the constraint is {len(spec.value)} characters; the limit is "
                f"{self.max_spec_chars}",
            )

    # -- compilation -------------------------------------------------------------------------

    async def compile_async(self, spec: StructuredSpec) -> CompiledGrammar:
        """Compile (or fetch from cache) without blocking the event loop; 400 if invalid."""
        self.validate(spec)
        if (hit := self._cached(self._key(spec))) is not None:
            return hit
        # shield: one cancelled waiter must not cancel a compilation others share
        compiling = asyncio.shield(asyncio.wrap_future(self._compile_future(spec)))
        try:
            return await asyncio.wait_for(compiling, self.compile_timeout_s)
        except TimeoutError:
            raise constraints.invalid(
                spec,
                f"the constraint did not compile within {self.compile_timeout_s:g} s; "
                "it is too complex (try the xgrammar backend or a simpler constraint)",
            ) from None

    def compile(self, spec: StructuredSpec) -> CompiledGrammar:
        """Compile (or fetch from cache), blocking the caller; for the offline API."""
        self.validate(spec)
        if (hit := self._cached(self._key(spec))) is not None:
            return hit
        return self._compile_future(spec).result()

    def _key(self, spec: StructuredSpec) -> _CacheKey:
        return (self.backend_name(spec), spec.kind, spec.value, spec.whitespace_pattern)

    def _cached(self, key: _CacheKey) -> CompiledGrammar | None:
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
            return hit

    def _compile_future(self, spec: StructuredSpec) -> Future[CompiledGrammar]:
        """The compilation of `spec`: a finished one from cache, a pending one, or a new one."""
        key = self._key(spec)
        with self._lock:
            if (hit := self._cache.get(key)) is not None:
                done: Future[CompiledGrammar] = Future()
                done.set_result(hit)
                return done
            if (pending := self._pending.get(key)) is not None:
                return pending
            future = self._executor.submit(self._compile_now, key[0], spec)
            self._pending[key] = future
        future.add_done_callback(lambda finished: self._finish(key, finished))
        return future

    def _compile_now(self, backend_name: str, spec: StructuredSpec) -> CompiledGrammar:
        """Runs in a worker thread."""
        backend = self._backend(backend_name)
        with self._lock:
            self.num_compilations += 1
        start = time.perf_counter()
        compiled = backend.compile(spec)
        logger.debug(
            "compiled %s %s (%d chars) in %.3f s",
            backend_name,
            spec.kind,
            len(spec.value),
            time.perf_counter() - start,
        )
        return compiled

    def _finish(self, key: _CacheKey, future: Future[CompiledGrammar]) -> None:
        """Move a finished compilation from pending into the cache (errors are not cached)."""
        with self._lock:
            self._pending.pop(key, None)
            if future.cancelled() or future.exception() is not None:
                return
            self._cache[key] = future.result()
            while len(self._cache) > self.max_cache_entries:
                self._cache.popitem(last=False)

    def _backend(self, name: str) -> GrammarBackend:
        """The backend `name`, created on first use (with the vocab, built once)."""
        backend = self._backends.get(name)
        if backend is not None:  # no lock: the engine step must not wait for another setup
            return backend
        with self._setup_lock:
            if name not in self._backends:
                if self._vocab is None:
                    self._vocab = build_token_vocab(self.tokenizer, self.vocab_size)
                start = time.perf_counter()
                self._backends[name] = BACKENDS[name].create(self._vocab)
                logger.info("%s backend ready in %.2f s", name, time.perf_counter() - start)
            return self._backends[name]

    def close(self) -> None:
        """Stop the worker threads; pending compilations are cancelled."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- bitmasks ----------------------------------------------------------------------------

    def allocate_bitmask(self, num_rows: int) -> torch.Tensor:
        """A CPU int32 bitmask [num_rows, ceil(vocab_size/32)], every token allowed."""
        return bitmask.allocate_bitmask(num_rows, self.vocab_size)

    def fill_bitmasks(
        self, matchers: Sequence[GrammarMatcher], bitmask: torch.Tensor, rows: Sequence[int]
    ) -> None:
        """bitmask[rows[i]] = allowed next tokens of matchers[i]: what fill_bitmask does per
        row, with xgrammar's rows filled together on its C++ thread pool.
        """
        handles, handle_rows = [], []
        for matcher, row in zip(matchers, rows, strict=True):
            handle = matcher.batch_handle() if isinstance(matcher, BackendMatcher) else None
            if handle is None:
                matcher.fill_bitmask(bitmask, row)
            else:
                handles.append(handle)
                handle_rows.append(row)
        if handles:  # only xgrammar's matchers have handles
            xgrammar_backend: Any = self._backend("xgrammar")
            xgrammar_backend.fill_batch(handles, bitmask, handle_rows)

    @staticmethod
    def apply_bitmask(logits: torch.Tensor, mask: torch.Tensor, rows: torch.Tensor) -> None:
        """In place: -inf for tokens whose bit is 0 in mask[r], for each logits row r in rows."""
        bitmask.apply_bitmask(logits, mask, rows)
