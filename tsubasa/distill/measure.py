"""The internalisation experiment for one user: train adapters for several d (and without grounding)
on the user's training QA, then measure each on the held-out QA against the teacher, before and
after (see `internalise.py`). An adapter that `tsubasa distill` already published for the same
variant, d and LoRA settings on exactly these training questions (`published_for`: same split
hash) is measured instead of trained again, so the LoCoMo ablation and this measure share their
adapters. Adapters it trains are written under `<distill_dir>/internalise/`, never into a registry:
measuring does not change what serving uses."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tsubasa.config import Settings


def run_internalisation(settings: Settings, tenant_id: str, user_id: str, d_values: Sequence[int],
                        progress: Callable[[str, int, int], None] | None = None, engine: Any = None,
                        embedder: Any = None, store: Any = None, reuse_published: bool = True) -> dict[str, Any]:
    from tsubasa.distill.batched import BatchedStudent, train_user
    from tsubasa.distill.internalise import Condition, compare, measure, teacher_reference
    from tsubasa.distill.pipeline import prepare_dataset, published_for, registry_for, synth_engine_for
    from tsubasa.distill.synth import JsonCache, UserCorpus
    from tsubasa.distill.train import TrainSpec
    from tsubasa.embed import load_embedder
    from tsubasa.llm import load_engine
    from tsubasa.memory.store import MilvusStore

    cfg = settings.distill
    engine = engine or load_engine(settings.model)
    embedder = embedder or load_embedder(settings.embedder)
    store = store or MilvusStore(settings.milvus, uri=settings.milvus_uri)
    corpus = UserCorpus.from_store(store, tenant_id, user_id)
    if not corpus.turns and not corpus.memories:
        raise ValueError(f"{tenant_id}/{user_id} has no turns or memories in {settings.milvus_uri}")
    cache = JsonCache(f"{settings.distill_dir}/cache")
    d_max = max([*d_values, cfg.top_d, cfg.teacher_top_d])
    ds = prepare_dataset(engine, embedder, corpus, cfg, d_max, cache, batch_size=settings.model.batch_size,
                         progress=progress, synth_engine=synth_engine_for(settings, engine))
    specs = [TrainSpec.from_config(cfg, "tsubasa", d) for d in d_values]
    specs.append(TrainSpec.from_config(cfg, "no_grounding", cfg.top_d))
    out_root = Path(settings.distill_dir) / "internalise" / tenant_id / user_id
    student = None  # loaded only if an adapter must be trained
    training: dict[str, dict[str, Any]] = {}
    for i, spec in enumerate(specs):
        name = f"internalise:{tenant_id}/{user_id}/{spec.tag}"
        engine.unload_adapter(name)  # a re-run replaces the previous weights
        reg = registry_for(settings, spec)
        published = published_for(reg, ds, spec, cfg) if reuse_published else None
        if published is not None:  # `tsubasa distill --variant/--d` trained it on these very questions
            training[spec.tag] = {**published.manifest.metrics, "reused": published.name}
            engine.load_adapter(name, reg.local_path(published))
            continue
        if progress:
            progress(f"train {spec.tag}", i, len(specs))
        t0 = time.perf_counter()
        student = student or BatchedStudent(settings.model, cfg, slots=1)
        trained = train_user(student, ds, spec, cfg, out_root / spec.tag, resume_dir=out_root / f"{spec.tag}.resume")
        training[spec.tag] = {**trained.metrics, "wall_s": time.perf_counter() - t0}
        engine.load_adapter(name, str(trained.out_dir))
    k = cfg.grounding_k
    before, before_ng = f"before (base model, k={k})", "before (base model, no grounding)"
    after = {s.d: f"after d={s.d} (k={k})" for s in specs[:-1]}
    after_ng = f"after no-grounding d={cfg.top_d}"
    conds = [Condition(label=before, adapter=None, grounding_k=k)]
    conds += [Condition(label=after[s.d], adapter=f"internalise:{tenant_id}/{user_id}/{s.tag}",
                        grounding_k=k) for s in specs[:-1]]
    conds += [Condition(label=before_ng, adapter=None, grounding_k=0),
              Condition(label=after_ng, grounding_k=0, adapter=f"internalise:{tenant_id}/{user_id}/{specs[-1].tag}")]
    # each adapter against the base model it started from; the paper's d against every other d; the
    # grounded adapter against the one trained and asked without grounding
    pairs = [(after[d], before) for d in after] + [(after_ng, before_ng)]
    if cfg.top_d in after:
        pairs += [(after[cfg.top_d], after[d]) for d in after if d != cfg.top_d] + [(after[cfg.top_d], after_ng)]
    if progress:
        progress(f"teacher answers ({len(ds.heldout)} held-out questions, one batched call)", 0, 1)
    ref = teacher_reference(engine, ds.heldout, max_new_tokens=cfg.max_answer_words * 3)
    rows = measure(engine, ds, conds, max_new_tokens=cfg.max_answer_words * 3, reference=ref, progress=progress)
    comparisons = compare(rows, pairs)
    return {"tenant_id": tenant_id, "user_id": user_id, "model": settings.model.name, "n_heldout": len(ds.heldout),
            "n_train": len(ds.train), "dataset": ds.stats, "training": training,
            "config": cfg.model_dump(include={"lora_rank", "lora_alpha", "epochs", "learning_rate", "batch_size",
                                              "grounding_k", "qa_per_user", "synth_mode", "top_d"}),
            "teacher_answers": [r.model_dump() for r in ref],
            "rows": [r.model_dump() for r in rows],
            "comparisons": [c.model_dump() for c in comparisons]}
