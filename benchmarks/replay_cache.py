"""An engine wrapper for benchmarks: every reply memoised on disk by (messages, sampling params), so
re-running a benchmark after a parser, guard or retrieval change costs no LLM call, and a killed
run resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from tsubasa.llm.base import Generation, SamplingParams


class CachedEngine:
    """An engine whose replies are memoised on disk by (messages, sampling params)."""

    def __init__(self, inner_factory, path: Path) -> None:
        self._factory, self._inner = inner_factory, None
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.cache: dict[str, dict] = {}
        if path.is_file():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                self.cache[row["key"]] = row["gen"]
        self.calls = self.hits = 0
        self.seconds = 0.0

    @property
    def model_name(self) -> str:
        return self.inner.model_name

    @property
    def inner(self):
        if self._inner is None:
            self._inner = self._factory()
        return self._inner

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def generate(self, prompts, params: SamplingParams | None = None, adapters=None) -> list[Generation]:
        params = params or SamplingParams()
        keys = [hashlib.sha256(json.dumps([[m.model_dump() for m in p], params.model_dump()],
                                          sort_keys=True).encode()).hexdigest() for p in prompts]
        missing = [i for i, k in enumerate(keys) if k not in self.cache]
        self.hits += len(keys) - len(missing)
        if missing:
            t0 = time.perf_counter()
            gens = self.inner.generate([prompts[i] for i in missing], params)
            self.seconds += time.perf_counter() - t0
            self.calls += len(missing)
            with self.path.open("a") as fh:
                for i, g in zip(missing, gens, strict=True):
                    self.cache[keys[i]] = g.model_dump()
                    fh.write(json.dumps({"key": keys[i], "gen": g.model_dump()}) + "\n")
        return [Generation.model_validate(self.cache[k]) for k in keys]
