"""One user's distillation, end to end, as plain library calls (no Ray): snapshot -> QA synthesis ->
teacher targets -> LoRA training -> publish. `services/train` runs the same steps, spread over a
Ray Data actor pool (the first two) and Ray Train workers (the last two).
"""

from __future__ import annotations

import gc
import logging
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime

from pydantic import BaseModel, Field

from tsubasa.config import DistillConfig, Settings
from tsubasa.distill.adapters import AdapterManifest, AdapterRegistry, AdapterVersion
from tsubasa.distill.batched import BatchedStudent, train_user
from tsubasa.distill.synth import JsonCache, QASynthesizer, UserCorpus, synth_cache_key
from tsubasa.distill.teacher import QATargets, UserDataset, build_user_dataset, dataset_cache_key
from tsubasa.distill.train import TrainSpec
from tsubasa.embed import Embedder
from tsubasa.llm.base import Engine
from tsubasa.schema import QAPair

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""(stage, done, total): `synth`, `teacher`, `train` (steps of the current epoch), `epoch`."""


def teacher_d(cfg: DistillConfig, spec: TrainSpec | None = None) -> int:
    """The d to store teacher targets at: the largest of the configured, the requested and
    `teacher_top_d` (training cuts them to its own d)."""
    return max(cfg.top_d, cfg.teacher_top_d, spec.d if spec else 1)


def prepare_dataset(engine: Engine, embedder: Embedder, corpus: UserCorpus, cfg: DistillConfig, d: int,
                    cache: JsonCache | None = None, batch_size: int = 8,
                    progress: Progress | None = None, synth_engine: Engine | None = None) -> UserDataset:
    """QA synthesis + teacher targets for one user, each step served from `cache` when it has it.
    `engine` is the teacher; `synth_engine` (default: the teacher) writes the QA."""
    synth_engine = synth_engine or engine
    qkey = synth_cache_key(corpus, synth_engine.model_name, cfg, cfg.qa_per_user)
    doc = cache.get("qa", corpus.tenant_id, corpus.user_id, qkey) if cache else None
    if doc is not None:
        qas = [QAPair.model_validate(q) for q in doc["qa"]]
        synth_stats = doc.get("stats", {})
    else:
        synth = QASynthesizer(synth_engine, cfg, embedder, batch_size=batch_size)
        qas, st = synth.synthesize(corpus, on_progress=(lambda a, b: progress("synth", a, b)) if progress else None)
        synth_stats = st.model_dump()
        if cache:
            cache.put("qa", corpus.tenant_id, corpus.user_id, qkey,
                      {"qa": [q.model_dump() for q in qas], "stats": synth_stats})
    if not qas:
        raise ValueError(f"{corpus.tenant_id}/{corpus.user_id}: no QA pair survived synthesis "
                         f"(facts: {len(corpus.memories)} memories, {len(corpus.turns)} turns; {synth_stats})")
    dkey = dataset_cache_key(corpus, qas, engine.model_name, cfg, d)
    doc = cache.get("targets", corpus.tenant_id, corpus.user_id, dkey) if cache else None
    if doc is not None:
        return UserDataset.model_validate(doc)
    # The teacher pass is the long step (an hour for a 1.5B model on a laptop CPU): its finished
    # batches are kept under `targets-partial` and a rerun after a kill goes on from them.
    where = ("targets-partial", corpus.tenant_id, corpus.user_id, dkey)
    part = cache.get(*where) if cache else None
    done = [QATargets.model_validate(x) for x in part["items"]] if part else []

    def save(items: list[QATargets]) -> None:
        cache.put(*where, {"items": [x.model_dump(mode="json") for x in items]})

    ds = build_user_dataset(engine, embedder, corpus, qas, cfg, d, batch_size=batch_size,
                            on_progress=(lambda a, b: progress("teacher", a, b)) if progress else None,
                            done=done, on_batch=save if cache else None)
    ds.stats.update({f"synth_{k}": float(v) for k, v in synth_stats.items() if isinstance(v, int | float)})
    if cache:
        cache.put("targets", corpus.tenant_id, corpus.user_id, dkey, ds.model_dump(mode="json"))
        cache.delete(*where)
    return ds


def cached_dataset(corpus: UserCorpus, cfg: DistillConfig, model_name: str, d: int,
                   cache: JsonCache) -> UserDataset | None:
    """The user's dataset if both steps are cached (checked without loading any model)."""
    doc = cache.get("qa", corpus.tenant_id, corpus.user_id, synth_cache_key(corpus, model_name, cfg, cfg.qa_per_user))
    if doc is None:
        return None
    qas = [QAPair.model_validate(q) for q in doc["qa"]]
    ds = cache.get("targets", corpus.tenant_id, corpus.user_id, dataset_cache_key(corpus, qas, model_name, cfg, d))
    return UserDataset.model_validate(ds) if ds is not None else None


def make_manifest(dataset: UserDataset, spec: TrainSpec, cfg: DistillConfig, target_modules: Sequence[str],
                  metrics: dict[str, float], n_examples: int, **extra: str) -> AdapterManifest:
    return AdapterManifest(
        base_model=dataset.base_model, rank=cfg.lora_rank, alpha=cfg.lora_alpha,
        d=spec.d if spec.loss == "topd_kl" else 1, loss=spec.loss, data_hash=dataset.data_hash,
        metrics=metrics, n_examples=n_examples, grounding_k=spec.grounding_k, variant=spec.variant,
        target_modules=list(target_modules), memory_watermark=dataset.memory_watermark,
        extra={"tag": spec.tag, "epochs": str(cfg.epochs), "lr": str(cfg.learning_rate), "split": dataset.split_hash,
               **extra})


def published_for(registry: AdapterRegistry, dataset: UserDataset, spec: TrainSpec, cfg: DistillConfig,
                  ) -> AdapterVersion | None:
    """The user's current published adapter if it was trained as `spec` with `cfg`'s LoRA settings
    on exactly the dataset's training questions (same `split_hash`), else None."""
    v = registry.current(dataset.tenant_id, dataset.user_id)
    if v is None:
        return None
    m = v.manifest  # as make_manifest wrote it; the tag names variant, loss, d and k
    trained_as = (m.extra.get("split"), m.extra.get("tag"), m.base_model, m.rank, m.alpha, m.extra.get("epochs"),
                  m.extra.get("lr"))
    wanted = (dataset.split_hash, spec.tag, dataset.base_model, cfg.lora_rank, cfg.lora_alpha, str(cfg.epochs),
              str(cfg.learning_rate))
    return v if trained_as == wanted else None


class UserResult(BaseModel):
    tenant_id: str
    user_id: str
    version: int | None = None
    adapter: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    stats: dict[str, float] = Field(default_factory=dict)
    skipped: str | None = None


def train_and_publish(student: BatchedStudent, dataset: UserDataset, spec: TrainSpec, cfg: DistillConfig,
                      registry: AdapterRegistry, progress: Progress | None = None, resume_dir: str | None = None,
                      **extra: str) -> AdapterVersion:
    """Train a fresh adapter for the dataset's user and publish it as the next version (with
    `resume_dir`, a killed run goes on from its last finished epoch)."""

    def on_epoch(m: dict[str, float]) -> None:
        if progress:
            progress("epoch", int(m["epoch"]), cfg.epochs)

    with tempfile.TemporaryDirectory(prefix="tsubasa-adapter-") as tmp:
        trained = train_user(student, dataset, spec, cfg, tmp, on_epoch=on_epoch, resume_dir=resume_dir,
                             on_step=(lambda s, n, _loss: progress("train", s, n)) if progress else None)
        manifest = make_manifest(dataset, spec, cfg, student.target_modules, trained.metrics, trained.n_examples,
                                 **extra)
        return registry.publish(dataset.tenant_id, dataset.user_id, trained.out_dir, manifest)


def users_needing_adapters(store, registry: AdapterRegistry, tenant_id: str) -> list[str]:
    """Users of a tenant with memories newer than their current adapter (or no adapter yet)."""
    out = []
    for user in store.users(tenant_id):
        mems = store.list_memories(tenant_id, user)
        if not mems:
            continue
        newest = max(m.updated_at for m in mems)
        cur = registry.current(tenant_id, user)
        mark: datetime | None = cur.manifest.memory_watermark if cur else None
        if mark is None or newest > mark:
            out.append(user)
    return out


def distill_local(settings: Settings, users: Sequence[tuple[str, str]], spec: TrainSpec | None = None,
                  registry: AdapterRegistry | None = None, engine: Engine | None = None,
                  embedder: Embedder | None = None, store=None,
                  progress: Callable[[str, str, int, int], None] | None = None) -> list[UserResult]:
    """Distil adapters for `users` [(tenant, user)] in this process (no Ray): the laptop path."""
    from tsubasa.embed import load_embedder
    from tsubasa.llm import load_engine
    from tsubasa.memory.store import MilvusStore

    cfg = settings.distill
    spec = spec or TrainSpec.from_config(cfg)
    registry = registry or registry_for(settings, spec)
    engine = engine or load_engine(settings.model, shared=False)  # not cached: freed after the teacher
    synth_engine = synth_engine_for(settings, engine)
    embedder = embedder or load_embedder(settings.embedder)
    store = store or MilvusStore(settings.milvus, uri=settings.milvus_uri)
    cache = JsonCache(f"{settings.distill_dir}/cache")
    # Teacher first for every user, then the student: the teacher's copy of the model is released
    # before the student loads its own (a 1.5B model in float32 is 7 GB; both at once, with the
    # Serve replica's copy beside them, were OOM-killed on a 24 GB laptop in `tsubasa demo`).
    results: list[UserResult | None] = []
    datasets = []
    for tenant_id, user_id in users:
        label = f"{tenant_id}/{user_id}"

        def cb(stage: str, a: int, b: int, label: str = label) -> None:
            if progress:
                progress(label, stage, a, b)

        corpus = UserCorpus.from_store(store, tenant_id, user_id)
        if not corpus.turns and not corpus.memories:
            results.append(UserResult(tenant_id=tenant_id, user_id=user_id, skipped="no turns or memories"))
            continue
        results.append(None)
        datasets.append((tenant_id, user_id, cb, prepare_dataset(
            engine, embedder, corpus, cfg, teacher_d(cfg, spec), cache, batch_size=settings.model.batch_size,
            progress=cb, synth_engine=synth_engine)))
    del engine, synth_engine  # ours is freed here (an engine the caller passed in stays theirs)
    gc.collect()
    student = BatchedStudent(settings.model, cfg, slots=1) if datasets else None
    trained = iter(datasets)
    for i, r in enumerate(results):
        if r is not None:
            continue
        tenant_id, user_id, cb, dataset = next(trained)
        v = train_and_publish(student, dataset, spec, cfg, registry, progress=cb,
                              resume_dir=f"{settings.distill_dir}/checkpoints/local/{spec.tag}/{tenant_id}/{user_id}")
        results[i] = UserResult(tenant_id=tenant_id, user_id=user_id, version=v.version, adapter=v.name,
                                metrics=v.manifest.metrics, stats=dataset.stats)
    return [r for r in results if r is not None]


def synth_engine_for(settings: Settings, teacher: Engine) -> Engine:
    """The QA writer: the memory writer's LLM when `distill.synth_with_writer` (llama.cpp on a laptop:
    same weights, generation only, several times faster than transformers there), else the teacher."""
    from tsubasa.llm import load_engine, writer_model

    w = writer_model(settings.model, settings.writer)
    if not settings.distill.synth_with_writer or (w.engine, w.name) == (settings.model.engine, settings.model.name):
        return teacher
    return load_engine(w)


def registry_for(settings: Settings, spec: TrainSpec) -> AdapterRegistry:
    """Where adapters of `spec` are published: the serving registry (`adapters.root`) for the
    configured TSUBASA adapter, `<distill_dir>/ablations/<tag>` for every other variant / d, so
    ablation runs never change what serving uses."""
    from tsubasa.distill.adapters import registry_from_settings

    if spec == TrainSpec.from_config(settings.distill):
        return registry_from_settings(settings)
    root = f"{settings.distill_dir}/ablations/{spec.tag}"
    return AdapterRegistry(root, keep_versions=settings.adapters.keep_versions)
