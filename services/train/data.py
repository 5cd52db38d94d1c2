"""Ray Data stage: QA synthesis and teacher targets for many users, as batch inference.

`ray.data.from_items(user corpora).map_batches(UserDatasetBuilder, concurrency=N)` runs an actor
pool; each actor loads the engine and the embedder once and turns user corpora into `UserDataset`s
(the training input). Results are cached on disk (`distill.work_dir`), so a re-run only pays for
users whose history changed. A user that fails (no usable QA) is reported, not fatal for the batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from services.train.config import TrainJobConfig
from tsubasa.config import Settings
from tsubasa.distill.synth import UserCorpus

log = logging.getLogger(__name__)


class UserDatasetBuilder:
    """Actor for `map_batches`: holds the engine (teacher and QA writer) and the embedder."""

    def __init__(self, settings: Settings, d: int) -> None:
        from tsubasa.distill.synth import JsonCache
        from tsubasa.embed import load_embedder
        from tsubasa.llm import load_engine

        if not logging.getLogger().handlers:  # lines land in the Ray worker log of this actor (logs/worker-*.err)
            logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        log.setLevel(logging.INFO)
        self.settings = settings
        self.d = d
        from tsubasa.distill.pipeline import synth_engine_for

        self.engine = load_engine(settings.model)
        self.synth_engine = synth_engine_for(settings, self.engine)
        self.embedder = load_embedder(settings.embedder)
        self.cache = JsonCache(f"{settings.distill_dir}/cache")

    def __call__(self, batch: dict[str, Any]) -> dict[str, list[str]]:
        from tsubasa.distill.pipeline import prepare_dataset

        out: dict[str, list[str]] = {"key": [], "dataset": [], "error": []}
        for corpus_json in batch["corpus"]:
            corpus = UserCorpus.model_validate_json(str(corpus_json))
            out["key"].append(f"{corpus.tenant_id}/{corpus.user_id}")
            try:
                t0 = time.monotonic()
                ds = prepare_dataset(self.engine, self.embedder, corpus, self.settings.distill, self.d, self.cache,
                                     batch_size=self.settings.model.batch_size,
                                     progress=_progress_logger(out["key"][-1]), synth_engine=self.synth_engine)
                log.info("%s: dataset ready, %d QA with teacher targets in %.0f s", out["key"][-1], len(ds.items),
                         time.monotonic() - t0)
                out["dataset"].append(ds.model_dump_json())
                out["error"].append("")
            except ValueError as exc:  # no usable QA for this user: report it, keep the batch going
                log.warning("%s: %s", out["key"][-1], exc)
                out["dataset"].append("")
                out["error"].append(str(exc))
        return out


def _progress_logger(key: str, every_s: float = 15.0) -> Callable[[str, int, int], None]:
    """Per-user progress of the data stage as log lines (at most one per `every_s` per stage)."""
    last: dict[str, float] = {}

    def report(stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if done >= total or now - last.get(stage, 0.0) >= every_s:
            last[stage] = now
            log.info("%s: %s %d/%d", key, stage, done, total)

    return report


def build_datasets(corpora: Sequence[UserCorpus], settings: Settings, job: TrainJobConfig, d: int,
                   on_user: Callable[[str, str], None] | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """Run the Ray Data stage; returns ({key: UserDataset JSON}, {key: error})."""
    import ray.data

    from tsubasa.distill.pipeline import cached_dataset
    from tsubasa.distill.synth import JsonCache

    datasets: dict[str, str] = {}
    errors: dict[str, str] = {}
    cache = JsonCache(f"{settings.distill_dir}/cache")
    todo = []
    for c in corpora:  # cache hits skip the actor pool (and loading a model) altogether
        hit = cached_dataset(c, settings.distill, settings.model.name, d, cache)
        if hit is None:
            todo.append(c)
            continue
        key = f"{c.tenant_id}/{c.user_id}"
        datasets[key] = hit.model_dump_json()
        if on_user:
            on_user(key, "ok (cached)")
    if not todo:
        return datasets, errors
    ds = ray.data.from_items([{"corpus": c.model_dump_json()} for c in todo])
    ds = ds.map_batches(UserDatasetBuilder, fn_constructor_kwargs={"settings": settings, "d": d},
                        batch_size=job.data.batch_size, concurrency=job.data.concurrency,
                        num_cpus=job.data.num_cpus, num_gpus=job.data.num_gpus or None, batch_format="numpy")
    for row in ds.iter_rows():
        key = str(row["key"])
        if row["error"]:
            errors[key] = str(row["error"])
        else:
            datasets[key] = str(row["dataset"])
        if on_user:
            on_user(key, str(row["error"]) or "ok")
    return datasets, errors
