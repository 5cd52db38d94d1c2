"""The LLM deployment: one engine (transformers+peft or vLLM, by `model.engine`) per replica, many
per-user LoRA adapters on it, every request streamed back token by token as it is generated.

Routing: the gateway sends each request with `multiplexed_model_id=<adapter version name>`
(`acme/alice/v0007`, or "" for the base model), so Serve prefers replicas that already hold that
adapter; a replica keeps `serve.adapters_per_replica` of them (Serve's multiplexing LRU) and loads
a missing one from the adapter registry by name.

Batching: on vLLM (`VLLMEngine.stream`, AsyncLLM) each request is submitted on arrival with its own
LoRARequest and joins the running batch at the next step (continuous batching, adapters mixed per
step). The hf engine has no such scheduler: `MixedBatcher` collects whatever requests are waiting
(any adapters, the base model included) into one `engine.generate(..., adapters=[...])` call and
streams each row's tokens per generation step. Serve's `@serve.batch` would split batches by
multiplexed model id and run each adapter alone.

Hot-swap: versions are immutable and named, so a newly published version is simply a new name;
`AdapterPool` pins the version a request started with until it finishes, so an LRU eviction (or a
newer version) never pulls weights out from under a request in flight.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from tsubasa.config import Settings
from tsubasa.llm.base import (
    ChatMessage,
    Engine,
    Generation,
    GenerationStep,
    Messages,
    SamplingParams,
    StreamingEngine,
)

log = logging.getLogger(__name__)


class GenerateRequest(BaseModel):
    """One chat generation, as the gateway sends it to the LLM deployment."""

    messages: list[ChatMessage]
    params: SamplingParams
    adapter: str | None = None
    """Adapter version name (`<tenant>/<user>/vNNNN`) or None for the base model."""


class AdapterPool:
    """Reference-counted adapters on one engine.

    `load` makes an adapter resident and returns a token; `evict(name, token)` unloads it once no
    request holds it (a stale token, from before a reload, is ignored); `hold(name)` pins it for one
    request. Thread-safe: Serve runs multiplex evictions in an executor thread.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._lock = threading.RLock()
        self._paths: dict[str, str] = {}
        self._tokens: dict[str, int] = {}
        self._refs: Counter[str] = Counter()
        self._evicting: set[str] = set()
        self._seq = itertools.count(1)

    def load(self, name: str, path: str) -> int:
        with self._lock:
            if name not in self._paths:
                self.engine.load_adapter(name, path)
                self._paths[name] = path
            self._evicting.discard(name)
            token = next(self._seq)
            self._tokens[name] = token
            return token

    def evict(self, name: str, token: int) -> None:
        with self._lock:
            if self._tokens.get(name) != token:
                return  # reloaded since: this eviction is about an older residency
            self._evicting.add(name)
            self._maybe_unload(name)

    def _maybe_unload(self, name: str) -> None:
        if name in self._evicting and self._refs[name] == 0:
            self._evicting.discard(name)
            self._paths.pop(name, None)
            self._tokens.pop(name, None)
            self.engine.unload_adapter(name)
            log.info("unloaded adapter %s", name)

    def drop(self, name: str) -> None:
        """Evict `name` now (or when its last request finishes)."""
        with self._lock:
            if name in self._tokens:
                self.evict(name, self._tokens[name])

    def acquire(self, name: str, path: str | None = None) -> None:
        with self._lock:
            if name not in self._paths:
                if path is None:
                    raise KeyError(name)
                self.load(name, path)
            self._refs[name] += 1

    def release(self, name: str) -> None:
        with self._lock:
            self._refs[name] -= 1
            if self._refs[name] <= 0:
                del self._refs[name]
                self._maybe_unload(name)

    def path_of(self, name: str) -> str | None:
        with self._lock:
            return self._paths.get(name)

    def resident(self) -> list[str]:
        with self._lock:
            return sorted(self._paths)

    def in_use(self) -> dict[str, int]:
        with self._lock:
            return dict(self._refs)


class LoadedAdapter:
    """What Serve's multiplexing caches per adapter; Serve calls `__del__` when its LRU evicts it."""

    def __init__(self, pool: AdapterPool, name: str, path: str, token: int) -> None:
        self.pool, self.name, self.path, self.token = pool, name, path, token
        self._released = False

    def __del__(self) -> None:
        if not self._released:  # Serve calls this on eviction; the GC may call it again later
            self._released = True
            self.pool.evict(self.name, self.token)


@dataclass
class _Pending:
    req: GenerateRequest
    steps: asyncio.Queue = field(default_factory=asyncio.Queue)
    gone: bool = False  # the caller stopped listening before its batch ran


class MixedBatcher:
    """The hf engine's scheduler: collects concurrent requests for up to `wait_s` (or `max_batch` of
    them) and runs them as one engine call with a per-row adapter list, one engine call at a time;
    each request's tokens are streamed per generation step. A request that arrives while a batch
    runs waits for the next one (the hf engine cannot add rows to a running `generate`)."""

    def __init__(self, engine: Engine, max_batch: int, wait_s: float) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.wait_s = wait_s
        self._queue: list[_Pending] = []
        self._wakeup: asyncio.Event | None = None
        self._bound_loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task | None = None
        self.batches = 0
        self.rows = 0

    @property
    def healthy(self) -> bool:
        t = self._task
        return t is None or not t.done() or t.cancelled() or t.exception() is None

    async def stream(self, messages: Messages, params: SamplingParams,
                     adapter: str | None = None) -> AsyncIterator[GenerationStep]:
        loop = asyncio.get_running_loop()
        if self._wakeup is None or self._bound_loop is not loop:  # first use, or a new event loop (tests, benchmarks)
            self._bound_loop, self._wakeup, self._task, self._queue = loop, asyncio.Event(), None, []
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._loop())
        pending = _Pending(GenerateRequest(messages=list(messages), params=params, adapter=adapter))
        self._queue.append(pending)
        self._wakeup.set()
        try:
            while True:
                step = await pending.steps.get()
                if isinstance(step, Exception):
                    raise step
                yield step
                if step.final is not None:
                    return
        finally:
            pending.gone = True

    async def _loop(self) -> None:
        assert self._wakeup is not None and self._bound_loop is not None
        loop = self._bound_loop
        while True:
            await self._wakeup.wait()
            deadline = time.monotonic() + self.wait_s
            while len(self._queue) < self.max_batch and time.monotonic() < deadline:
                await asyncio.sleep(min(0.002, self.wait_s))
            batch = [p for p in self._queue[: self.max_batch] if not p.gone]
            del self._queue[: self.max_batch]
            if not self._queue:
                self._wakeup.clear()
            if not batch:
                continue

            def on_tokens(i: int, ids: list[int], batch: list[_Pending] = batch) -> None:  # generate()'s thread
                loop.call_soon_threadsafe(batch[i].steps.put_nowait, GenerationStep(token_ids=ids))

            try:
                gens = await asyncio.to_thread(run_mixed, self.engine, [p.req for p in batch], on_tokens)
            except Exception as exc:  # every waiter gets the error, the loop keeps serving
                for p in batch:
                    p.steps.put_nowait(exc)
                continue
            self.batches += 1
            self.rows += len(batch)
            await asyncio.sleep(0)  # let the last on_tokens callbacks land before the final steps
            for p, g in zip(batch, gens, strict=True):
                p.steps.put_nowait(GenerationStep(final=g))


def run_mixed(engine: Engine, reqs: Sequence[GenerateRequest],
              on_tokens: Callable[[int, list[int]], None] | None = None) -> list[Generation]:
    """One engine call per distinct SamplingParams (usually one), adapters mixed within it;
    `on_tokens(i, ids)` streams request i's tokens per step."""
    out: list[Generation | None] = [None] * len(reqs)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(reqs):
        groups.setdefault(r.params.model_dump_json(), []).append(i)
    for idx in groups.values():
        def rows(j: int, ids: list[int], idx: list[int] = idx) -> None:
            if on_tokens is not None:
                on_tokens(idx[j], ids)

        gens = engine.generate([reqs[i].messages for i in idx], reqs[idx[0]].params,  # type: ignore[call-arg]
                               adapters=[reqs[i].adapter for i in idx], on_tokens=rows)
        for i, g in zip(idx, gens, strict=True):
            out[i] = g
    return [g for g in out if g is not None]


class LLMServerCore:
    """The replica's logic without Ray (engine + registry + pool + scheduler); `LLMServer` wraps it
    for Serve, benchmarks and tests call it directly."""

    def __init__(self, settings: Settings, engine: Engine | None = None, registry: Any = None) -> None:
        from tsubasa.distill.adapters import registry_from_settings
        from tsubasa.llm import load_engine

        self.settings = settings
        sc = settings.serve
        if engine is None:
            # The engine's own LRU must never evict an adapter a request holds: room for every
            # multiplexed adapter plus one pinned adapter per request the replica may hold.
            mcfg = settings.model.model_copy(update={
                "max_loaded_adapters": sc.adapters_per_replica + sc.llm_max_ongoing_requests,
                "batch_size": max(settings.model.batch_size, sc.max_batch_size)})
            engine = load_engine(mcfg, shared=False)
        self.engine = engine
        self.registry = registry if registry is not None else registry_from_settings(settings)
        self.pool = AdapterPool(engine)
        self.batcher = None if isinstance(engine, StreamingEngine) else MixedBatcher(
            engine, sc.max_batch_size, sc.batch_wait_timeout_s)
        self.streamer: Any = engine if self.batcher is None else self.batcher
        self.started = self.finished = self.aborted = 0

    @property
    def healthy(self) -> bool:
        if self.batcher is not None:
            return self.batcher.healthy
        return bool(getattr(self.engine, "healthy", True))

    def resolve_path(self, name: str) -> str:
        """Local directory of adapter version `name` (downloaded once from a remote registry)."""
        return self.registry.local_path(self.registry.get_by_name(name))

    def load(self, name: str) -> LoadedAdapter:
        """Load adapter version `name` for Serve's multiplexing cache (blocking); the returned
        object's `__del__` (Serve's LRU eviction) unloads it."""
        path = self.resolve_path(name)
        return LoadedAdapter(self.pool, name, path, self.pool.load(name, path))

    async def stream(self, req: GenerateRequest, loaded: LoadedAdapter | None = None) -> AsyncIterator[GenerationStep]:
        """The request's tokens per step, the last step with the Generation; the adapter stays pinned
        until the stream ends, and closing it early aborts the generation (vLLM). Without Serve
        (`loaded` None) adapters stay resident."""
        name = req.adapter
        if name is not None:
            if loaded is not None:
                path = loaded.path
            elif (path := self.pool.path_of(name)) is None:
                path = await asyncio.to_thread(self.resolve_path, name)
                await asyncio.to_thread(self.pool.load, name, path)
            self.pool.acquire(name, path)  # pinned until this request is done
        self.started += 1
        done = False
        try:
            async for step in self.streamer.stream(req.messages, req.params, name):
                done = step.final is not None
                yield step
        finally:
            if done:
                self.finished += 1
            else:
                self.aborted += 1
            if name is not None:
                self.pool.release(name)

    async def generate(self, req: GenerateRequest, loaded: LoadedAdapter | None = None) -> Generation:
        """The whole Generation (the same path as `stream`)."""
        async for step in self.stream(req, loaded):
            if step.final is not None:
                return step.final
        raise RuntimeError("the engine's stream ended without a final step")

    def stats(self) -> dict[str, Any]:
        return {"model": self.settings.model.name, "engine": self.settings.model.engine,
                "resident_adapters": self.pool.resident(), "in_use": self.pool.in_use(),
                "started": self.started, "finished": self.finished, "aborted": self.aborted,
                "batches": self.batcher.batches if self.batcher else None,
                "rows": self.batcher.rows if self.batcher else None}


class LLMServer:
    """Serve deployment class (options are set by `services.serve.app.build_app`)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        from ray import serve

        from services.serve.settings import settings_from_payload

        s = settings_from_payload(settings)
        if s.model.engine == "hf":  # Ray sets OMP_NUM_THREADS=1 in workers; use the CPUs reserved for us
            import torch

            torch.set_num_threads(max(1, int(s.serve.llm_num_cpus)))
        self.core = LLMServerCore(s)
        n = s.serve.adapters_per_replica

        async def load_adapter(model_id: str) -> LoadedAdapter:
            return await asyncio.to_thread(self.core.load, model_id)

        # Wired at init because the LRU size is configuration (Serve detects this form too).
        self.get_adapter = serve.multiplexed(max_num_models_per_replica=n)(load_adapter)

    async def generate(self, req: GenerateRequest) -> AsyncIterator[GenerationStep]:
        """Streamed (call with `handle.options(stream=True)`): one item per engine step; Serve
        cancels this generator when the caller goes away, which aborts the generation."""
        from ray import serve

        model_id = serve.get_multiplexed_model_id()
        loaded = None
        if req.adapter is not None:
            if model_id != req.adapter:
                raise ValueError(f"request for adapter {req.adapter!r} routed as {model_id!r}")
            loaded = await self.get_adapter(model_id)
        async for step in self.core.stream(req, loaded):
            yield step

    async def generate_many(self, messages: list[list[ChatMessage]], params: SamplingParams) -> list[Generation]:
        """Base-model generations for the memory writer (extraction, evolution decisions): each one
        submitted on its own, interleaved with chat traffic."""
        reqs = [GenerateRequest(messages=m, params=params) for m in messages]
        return list(await asyncio.gather(*(self.core.generate(r) for r in reqs)))

    async def stats(self) -> dict[str, Any]:
        return self.core.stats()

    async def forget(self, prefix: str) -> list[str]:
        """Evict resident adapters whose name starts with `prefix` (`tenant/user/`)."""
        gone = [n for n in self.core.pool.resident() if n.startswith(prefix)]
        for name in gone:
            self.core.pool.drop(name)
        return gone

    def check_health(self) -> None:
        if not self.core.healthy:
            raise RuntimeError("the engine died (vLLM engine core, or the hf batching loop)")
