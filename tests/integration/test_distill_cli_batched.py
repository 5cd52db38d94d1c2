"""`tsubasa distill -t bench --all-new` on real Ray (tiny-qwen3, Milvus Lite): the tenant's users are
trained batched by default (one forward/backward for both), one version per user is published,
`tsubasa adapters list` shows them and the LLM deployment's core answers with them. The same users
trained one after another (`job.users_per_batch=1`) publish the same adapters (fp32 tolerance) and
the same manifests, apart from timing and batch size."""

from __future__ import annotations

import asyncio

import pytest
from typer.testing import CliRunner

from tsubasa.cli import app

pytestmark = [pytest.mark.integration, pytest.mark.slow]

USERS = ["alice", "bob"]
TOL = 2e-5  # fp32, max |batched - sequential| over every LoRA weight


@pytest.fixture()
def env(tmp_path, monkeypatch, tiny_cfg, embedder):
    from distill_data import seed_user

    from tsubasa.config import load_settings
    from tsubasa.memory.store import MilvusStore

    for key, value in {"DATA_DIR": tmp_path / "data", "MODEL__NAME": "tiny-qwen3",
                       "MODEL__CACHE_DIR": tiny_cfg.cache_dir, "MODEL__BATCH_SIZE": 4,
                       "MILVUS__URI": tmp_path / "milvus.db", "DISTILL__SYNTH_MODE": "template",
                       "DISTILL__QA_PER_USER": 6, "DISTILL__LORA_RANK": 4, "DISTILL__LORA_ALPHA": 8,
                       "DISTILL__EPOCHS": 2, "DISTILL__BATCH_SIZE": 4,
                       "DISTILL__TEACHER_CONTEXT_TOKENS": 256}.items():
        monkeypatch.setenv(f"TSUBASA_{key}", str(value))
    monkeypatch.setenv("COLUMNS", "200")
    settings = load_settings()
    store = MilvusStore(settings.milvus, uri=settings.milvus_uri)
    for u in USERS:
        seed_user(store, embedder, "bench", u)
    store.close()
    return settings


def _max_diff(a, b) -> float:
    from safetensors.torch import load_file

    x, y = load_file(f"{a}/adapter_model.safetensors"), load_file(f"{b}/adapter_model.safetensors")
    assert sorted(x) == sorted(y)
    return max(float((x[k] - y[k]).abs().max()) for k in x)


def test_distill_all_new_trains_batched_and_publishes_one_version_per_user(env):
    from services.serve.llm import GenerateRequest, LLMServerCore
    from services.train.config import TrainJobConfig
    from services.train.job import run_distill_job
    from tsubasa.distill.adapters import registry_from_settings
    from tsubasa.llm.base import ChatMessage, SamplingParams

    runner = CliRunner()
    r = runner.invoke(app, ["distill", "-t", "bench", "--all-new", "--workers", "1"])
    assert r.exit_code == 0, r.output
    registry = registry_from_settings(env)
    batched = {u: registry.current("bench", u) for u in USERS}
    assert {u: v.version for u, v in batched.items()} == {"alice": 1, "bob": 1}
    assert all(v.manifest.metrics["batch_users"] == 2 for v in batched.values())  # both in one batch
    listed = runner.invoke(app, ["adapters", "list", "-t", "bench"])
    assert listed.exit_code == 0 and all(f"bench/{u}/v0001" in listed.output for u in USERS), listed.output

    core = LLMServerCore(env)
    params = SamplingParams(max_new_tokens=6)
    ask = [ChatMessage(role="user", content="Where is my bakery?")]

    async def answer() -> list:
        return await asyncio.gather(*(core.generate(GenerateRequest(messages=ask, params=params, adapter=v.name))
                                      for v in batched.values()))

    gens = asyncio.run(answer())
    assert [g.adapter for g in gens] == [v.name for v in batched.values()] and all(g.completion_tokens for g in gens)

    # The same users one after another: the same adapters and manifests.
    res = run_distill_job(env, [("bench", u) for u in USERS],
                          job=TrainJobConfig(num_workers=1, users_per_batch=1, name="sequential-reference"))
    assert [r.version for r in res.users] == [2, 2]
    for u in USERS:
        seq = registry.get("bench", u, 2)
        assert seq.manifest.metrics["batch_users"] == 1
        assert _max_diff(registry.local_path(batched[u]), registry.local_path(seq)) < TOL
        a, b = (v.manifest.model_dump(exclude={"created_at", "extra", "metrics"}) for v in (batched[u], seq))
        assert a == b
        ma, mb = batched[u].manifest.metrics, seq.manifest.metrics
        assert set(ma) == set(mb)
        for k in set(ma) - {"train_seconds", "batch_users"}:
            assert ma[k] == pytest.approx(mb[k], rel=1e-5, abs=1e-6), k
        ea, eb = batched[u].manifest.extra, seq.manifest.extra
        assert {k: v for k, v in ea.items() if k != "job_id"} == {k: v for k, v in eb.items() if k != "job_id"}
