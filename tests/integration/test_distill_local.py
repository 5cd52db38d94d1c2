"""The laptop path on tiny-qwen3 and real Milvus Lite: `tsubasa distill --local` publishes an adapter,
`tsubasa adapters list/show` read the registry, the evaluation harness answers through the adapter
systems (TSUBASA, no grounding, vanilla FT), and the internalisation measure runs."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

pytestmark = pytest.mark.integration


@pytest.fixture()
def seeded(settings, store, embedder, monkeypatch):
    from distill_data import seed_user

    seed_user(store, embedder, "acme", "alice")
    fast = {"synth_mode": "template", "qa_per_user": 6, "lora_rank": 4, "lora_alpha": 8, "epochs": 1,
            "batch_size": 4, "teacher_context_tokens": 256, "heldout_fraction": 0.34}
    for k, v in fast.items():
        monkeypatch.setenv(f"TSUBASA_DISTILL__{k.upper()}", str(v))
    monkeypatch.setenv("TSUBASA_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("TSUBASA_MODEL__NAME", "tiny-qwen3")
    monkeypatch.setenv("TSUBASA_MODEL__CACHE_DIR", str(settings.model.cache_dir))
    monkeypatch.setenv("TSUBASA_MILVUS__URI", settings.milvus_uri)
    from tsubasa.config import load_settings

    return load_settings()


def test_local_distill_registry_cli_and_eval_systems(seeded, store, embedder, tiny_engine):
    from tsubasa.cli import app
    from tsubasa.distill.pipeline import distill_local, registry_for
    from tsubasa.distill.train import TrainSpec
    from tsubasa.eval.distilled import MissingAdapterError
    from tsubasa.eval.systems import Question, SystemContext, available_systems, build_system
    from tsubasa.memory.retrieve import Retriever

    settings = seeded
    runner = CliRunner(env={"COLUMNS": "200"})
    res = runner.invoke(app, ["distill", "--tenant", "acme", "--user", "alice", "--local"])
    assert res.exit_code == 0, res.output
    assert "acme/alice/v0001" in res.output
    res = runner.invoke(app, ["adapters", "list", "--tenant", "acme"])
    assert res.exit_code == 0 and "acme/alice/v0001" in res.output and "topd_kl" in res.output
    res = runner.invoke(app, ["adapters", "show", "acme/alice"])
    assert res.exit_code == 0 and '"data_hash"' in res.output and "adapter_model.safetensors" in res.output
    res = runner.invoke(app, ["distill", "--tenant", "acme", "--all-new", "--local"])
    assert res.exit_code == 0 and "no user of acme has memories newer" in res.output
    assert runner.invoke(app, ["distill", "--tenant", "bad tenant", "--user", "x"]).exit_code == 2
    assert runner.invoke(app, ["distill", "--tenant", "acme", "--user", "alice", "--variant", "nope"]).exit_code == 2

    # The ablation variants go to their own registries; serving's registry keeps only the TSUBASA one.
    for variant in ("no_grounding", "vanilla"):
        spec = TrainSpec.from_config(settings.distill, variant)
        [r] = distill_local(settings, [("acme", "alice")], spec, engine=tiny_engine, embedder=embedder, store=store)
        assert r.version == 1 and registry_for(settings, spec).root.endswith(spec.tag)

    systems = available_systems()
    assert {"tsubasa", "tsubasa-no-grounding", "vanilla-ft", "tsubasa-d1", "tsubasa-d20"} <= set(systems)
    ctx = SystemContext(engine=tiny_engine, store=store, retriever=Retriever(store, embedder, tiny_engine.count_tokens),
                        k=3, max_new_tokens=8, options={"settings": settings})
    q = [Question(tenant_id="acme", user_id="alice", question="What is the name of Alice's cat?")]
    a = build_system("tsubasa", ctx).answer(q)[0]
    assert a.adapter == "acme/alice/v0001" and a.grounding_tokens > 0 and len(a.grounding_ids) == 3
    a = build_system("tsubasa-no-grounding", ctx).answer(q)[0]
    assert a.adapter == "no_grounding-kl-d5-k0:acme/alice/v0001" and a.grounding_tokens == 0
    a = build_system("vanilla-ft", ctx).answer(q)[0]
    assert a.adapter == "vanilla-lm:acme/alice/v0001" and a.grounding_tokens > 0
    with pytest.raises(MissingAdapterError, match="tsubasa distill --tenant acme --user alice --variant tsubasa --d 3"):
        build_system("tsubasa-d3", ctx).answer(q)


def test_internalisation_measure(seeded, store, tmp_path):
    """`tsubasa distill internalise`: every condition with a bootstrap interval, and the paired
    differences the paper's orderings are read from, in the table and in the JSON."""
    import json

    from tsubasa.cli import app

    out = tmp_path / "internalise.json"
    res = CliRunner(env={"COLUMNS": "220"}).invoke(
        app, ["distill", "internalise", "-t", "acme", "-u", "alice", "--d", "1,5", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "95% CI" in res.output and "paired differences on the same questions" in res.output
    # no terminal: a line per stage, so a long measurement says where it is
    assert "teacher answers (" in res.output and "teacher distributions: 0/" in res.output
    assert "measure after no-grounding d=5 (5/5): 0/" in res.output
    report = json.loads(out.read_text())
    labels = [r["label"] for r in report["rows"]]
    assert labels == ["before (base model, k=3)", "after d=1 (k=3)", "after d=5 (k=3)",
                      "before (base model, no grounding)", "after no-grounding d=5"]
    assert report["n_heldout"] >= 1
    for r in report["rows"]:
        assert r["mean_kl"] >= 0 and 0 <= r["agreement"] <= 1
        assert len(r["kl_per_question"]) == len(r["qa_ids"]) == r["n_questions"] == report["n_heldout"]
        assert r["kl_ci"]["lo"] <= r["mean_kl"] <= r["kl_ci"]["hi"]
        assert r["agreement_ci"]["lo"] <= r["agreement"] <= r["agreement_ci"]["hi"]
    # each adapter against its base, the paper's d against the other d, grounded against not
    pairs = [(c["a"], c["b"]) for c in report["comparisons"]]
    assert pairs == [("after d=1 (k=3)", labels[0]), ("after d=5 (k=3)", labels[0]), (labels[4], labels[3]),
                     ("after d=5 (k=3)", "after d=1 (k=3)"), ("after d=5 (k=3)", labels[4])]
    rows = {r["label"]: r for r in report["rows"]}
    c = report["comparisons"][3]
    diffs = [a - b for a, b in zip(rows[c["a"]]["kl_per_question"], rows[c["b"]]["kl_per_question"], strict=True)]
    assert c["kl_diff"]["mean"] == pytest.approx(sum(diffs) / len(diffs))


def test_student_grounding_is_what_serving_retrieves(seeded, store, embedder, tiny_engine):
    """Train/serve parity: the memories a student is trained with are the texts the Retriever hands
    the gateway and the harness for the same question (same items, same rendering of dates)."""
    from tsubasa.distill.pipeline import prepare_dataset
    from tsubasa.distill.synth import UserCorpus
    from tsubasa.memory.retrieve import Retriever

    cfg = seeded.distill
    ds = prepare_dataset(tiny_engine, embedder, UserCorpus.from_store(store, "acme", "alice"), cfg, cfg.top_d)
    retriever = Retriever(store, embedder, tiny_engine.count_tokens)
    assert ds.items
    for it in ds.items:
        served = retriever.retrieve("acme", "alice", it.qa.question, k=cfg.grounding_k)
        assert sorted(it.grounding) == sorted(g.text for g in served.items)
        assert all(text.startswith("[") and not text.startswith("[20") for text in it.grounding)  # "[7 May 2023]"


def test_internalisation_reuses_adapters_distill_published(seeded, store, embedder, tiny_engine):
    """An adapter `tsubasa distill` published for the same variant, d and training questions is
    measured, not trained again; one trained with other settings is not taken for it."""
    from tsubasa.distill.measure import run_internalisation
    from tsubasa.distill.pipeline import distill_local
    from tsubasa.distill.train import TrainSpec

    cfg = seeded.distill
    for spec in (TrainSpec.from_config(cfg, "tsubasa", 5), TrainSpec.from_config(cfg, "no_grounding", 5)):
        [r] = distill_local(seeded, [("acme", "alice")], spec, engine=tiny_engine, embedder=embedder, store=store)
        assert r.version == 1
    d1, d5, ng = (TrainSpec.from_config(cfg, "tsubasa", 1).tag, TrainSpec.from_config(cfg, "tsubasa", 5).tag,
                  TrainSpec.from_config(cfg, "no_grounding", 5).tag)
    report = run_internalisation(seeded, "acme", "alice", [1, 5], engine=tiny_engine, embedder=embedder, store=store)
    training = report["training"]
    assert training[d5]["reused"] == "acme/alice/v0001" and training[ng]["reused"] == "acme/alice/v0001"
    assert "reused" not in training[d1] and training[d1]["wall_s"] > 0  # nothing published for d=1
    assert [r["n_questions"] for r in report["rows"]] == [report["n_heldout"]] * 5

    other = seeded.model_copy(update={"distill": cfg.model_copy(update={"learning_rate": cfg.learning_rate * 2})})
    report = run_internalisation(other, "acme", "alice", [5], engine=tiny_engine, embedder=embedder, store=store)
    assert all("reused" not in t for t in report["training"].values())


class _Killed(Exception):
    pass


class _DiesAfter:
    """The engine, failing on its score_topd call number `limit + 1`, as a run killed mid-teacher."""

    def __init__(self, engine, limit: int) -> None:
        self.engine, self.limit, self.calls = engine, limit, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def score_topd(self, *args, **kwargs):
        self.calls += 1
        if self.calls > self.limit:
            raise _Killed
        return self.engine.score_topd(*args, **kwargs)


def test_teacher_targets_resume_after_a_kill(seeded, store, embedder, tiny_engine, tmp_path):
    """The teacher's finished batches survive a kill; the rerun scores only the rest and ends with the
    dataset an uninterrupted run builds, and the partial file is gone."""
    import json

    from tsubasa.distill.pipeline import prepare_dataset
    from tsubasa.distill.synth import JsonCache, UserCorpus

    cfg = seeded.distill
    assert cfg.teacher_answer == "gold"  # one score_topd call per batch
    corpus = UserCorpus.from_store(store, "acme", "alice")
    whole = prepare_dataset(tiny_engine, embedder, corpus, cfg, cfg.top_d, batch_size=2)
    n = len(whole.items)
    assert n >= 4
    cache = JsonCache(tmp_path / "cache")
    with pytest.raises(_Killed):
        prepare_dataset(_DiesAfter(tiny_engine, 1), embedder, corpus, cfg, cfg.top_d, cache, batch_size=2)
    [part] = (tmp_path / "cache" / "targets-partial").rglob("*.json")
    assert len(json.loads(part.read_text())["items"]) == 2
    engine = _DiesAfter(tiny_engine, 10**6)
    resumed = prepare_dataset(engine, embedder, corpus, cfg, cfg.top_d, cache, batch_size=2)
    assert engine.calls == (n - 2 + 1) // 2
    assert resumed.model_dump(exclude={"stats"}) == whole.model_dump(exclude={"stats"})
    assert not list((tmp_path / "cache" / "targets-partial").rglob("*.json"))


def test_d_ablation_shares_one_teacher_pass(seeded, store, embedder, tiny_engine):
    """With `distill.teacher_top_d` the teacher's targets are stored once at that d: a d=1 and a d=7
    variant of one user make one teacher pass between them, each trained on targets cut to its d."""
    from tsubasa.distill.pipeline import distill_local
    from tsubasa.distill.train import TrainSpec

    cfg = seeded.distill.model_copy(update={"teacher_top_d": 7})
    settings = seeded.model_copy(update={"distill": cfg})
    engine = _DiesAfter(tiny_engine, 10**6)  # counts the teacher's scoring calls
    [d1] = distill_local(settings, [("acme", "alice")], TrainSpec.from_config(cfg, "tsubasa", 1), engine=engine,
                         embedder=embedder, store=store)
    first = engine.calls
    assert first > 0 and d1.version == 1
    [d7] = distill_local(settings, [("acme", "alice")], TrainSpec.from_config(cfg, "tsubasa", 7), engine=engine,
                         embedder=embedder, store=store)
    assert engine.calls == first  # the d=7 variant's targets came from the cache
    assert d7.version == 1 and d7.metrics["loss_first_epoch"] != d1.metrics["loss_first_epoch"]
