"""Serving benchmark, three measurements side by side in one run:

1. throughput of 8 distinct LoRA adapters in mixed batches vs the base model alone (the LLM
   deployment's own batcher + engine, in process, same requests and token budget), for the hf
   engine's multi-LoRA layer and, as the reference, peft's `adapter_names` path (the engine before
   the multi-LoRA layer, tests/support/peft_engine.py); both must give the same greedy tokens;
2. added latency of memory retrieval + prompt building per request (the gateway's `_prepare`:
   registry lookup, embedding, Milvus top-k, student prompt) vs a bare model call;
3. a 64-client load run over HTTP (loopback) against the full Ray Serve stack (gateway + LLM
   deployment, memories and a per-user adapter for every request), bounded in requests, with its
   error count (anything but 200 and deliberate 429/503) and p50/p99 latency.

    .venv/bin/python benchmarks/serving.py                       # smollm2-135m-instruct, CPU
    .venv/bin/python benchmarks/serving.py --model ~/.cache/tsubasa/models/qwen2.5-coder-1.5b-instruct \
        --only-throughput --requests 16 --max-tokens 16 --out benchmarks/results/serving-1.5b.json
    .venv/bin/python benchmarks/serving.py --model tiny-qwen3 --out benchmarks/results/serving-tiny.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

TENANT = "bench"
QUESTIONS = ["What did I do last weekend?", "Where does my sister live?", "Which pet do I have?",
             "What is my favourite book?", "When did I start painting?", "Who did I meet in Boston?"]


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def random_loras(base_path: str, root: Path, n: int, rank: int = 8) -> dict[int, str]:
    """n peft LoRAs with seeded non-zero B (stand-ins for distilled adapters of the same shape)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    out = {}
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for name, p in pm.named_parameters():
                if "lora_A" in name:
                    p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
                elif "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        pm.save_pretrained(root / f"lora{i}")
        out[i] = str(root / f"lora{i}")
    return out


def memory_texts(n: int) -> list[str]:
    """LoCoMo's own observations when the data is on disk (realistic memories), else synthetic."""
    try:
        from tsubasa.eval.locomo import load_locomo

        texts = [t for c in load_locomo() for obs in c.observations.values() for _, t, _ in obs]
    except Exception:
        texts = []
    while len(texts) < n:
        texts.append(f"On 2023-0{1 + len(texts) % 9}-1{len(texts) % 10} the user visited place number {len(texts)}.")
    return texts[:n]


def seed(settings, users: list[str], per_user: int, lora_src: dict[int, str]) -> None:
    from tsubasa.distill.adapters import AdapterManifest, registry_from_settings
    from tsubasa.embed import load_embedder
    from tsubasa.memory.store import MilvusStore
    from tsubasa.schema import EvolutionOp, MemoryRecord, stable_id

    store = MilvusStore(settings.milvus, uri=settings.milvus_uri)
    emb = load_embedder(settings.embedder)
    texts = memory_texts(per_user * len(users))
    now = datetime.now(UTC)
    for ui, user in enumerate(users):
        mine = texts[ui * per_user:(ui + 1) * per_user]
        vecs = emb.embed(mine)
        for t, v in zip(mine, vecs, strict=True):
            mid = stable_id(TENANT, user, t, prefix="m")
            store.write_memory(MemoryRecord(memory_id=mid, tenant_id=TENANT, user_id=user, text=t, created_at=now,
                                            updated_at=now), v, EvolutionOp.ADD, stable_id(mid, prefix="o"))
    registry = registry_from_settings(settings)
    manifest = AdapterManifest(base_model=settings.model.name, rank=8, alpha=16, d=5, loss="topd_kl",
                               data_hash="bench", grounding_k=settings.memory.top_k)
    for ui, user in enumerate(users):
        if registry.current(TENANT, user) is None:
            registry.publish(TENANT, user, lora_src[ui % len(lora_src)], manifest)


async def throughput(core, n_requests: int, max_tokens: int, adapters: list[str | None]) -> tuple[dict, list]:
    from services.serve.llm import GenerateRequest
    from tsubasa.llm.base import ChatMessage, SamplingParams

    params = SamplingParams(max_new_tokens=max_tokens)
    reqs = [GenerateRequest(messages=[ChatMessage(role="user", content=QUESTIONS[i % len(QUESTIONS)])],
                            params=params, adapter=adapters[i % len(adapters)]) for i in range(n_requests)]
    await asyncio.gather(*(core.generate(r) for r in reqs[: core.settings.serve.max_batch_size]))  # warm-up
    b0, r0 = core.batcher.batches, core.batcher.rows
    t0, c0 = time.perf_counter(), time.process_time()
    gens = await asyncio.gather(*(core.generate(r) for r in reqs))
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    toks = sum(g.completion_tokens for g in gens)
    batches = core.batcher.batches - b0
    return {"requests": n_requests, "seconds": round(dt, 3), "completion_tokens": toks,
            "tokens_per_s": round(toks / dt, 2), "requests_per_s": round(n_requests / dt, 3),
            "cpu_seconds": round(cpu, 3), "tokens_per_cpu_s": round(toks / cpu, 2),
            "engine_batches": batches, "mean_batch": round((core.batcher.rows - r0) / max(batches, 1), 2),
            "distinct_adapters": len({a for a in adapters if a})}, [g.token_ids for g in gens]


def compare_paths(settings, args, users: list[str]) -> tuple[dict, object]:
    """Base vs 8 mixed adapters on peft's path and on the multi-LoRA engine, in `args.rounds`
    rounds of alternating order (one engine alive at a time: each holds the model), so load on a
    shared machine hits both alike. Ratios are medians of each round's adjacent measurements.
    Tokens per CPU-second of this process (one torch thread) are reported beside wall-clock tok/s:
    other jobs on a shared machine slow the wall clock, much less the CPU time a batch costs.
    Returns the figures and the last multi-LoRA core (kept for part 2)."""
    import gc
    import statistics

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
    from peft_engine import PeftEngine

    from services.serve.llm import LLMServerCore

    sc = settings.serve
    mcfg = settings.model.model_copy(update={  # the engine config LLMServerCore builds for itself
        "max_loaded_adapters": sc.adapters_per_replica + sc.llm_max_ongoing_requests,
        "batch_size": max(settings.model.batch_size, sc.max_batch_size)})
    rounds: dict[str, list[dict]] = {"peft": [], "multilora": []}
    tokens: dict[str, list] = {}
    core = None
    for r in range(args.rounds):
        for path in (("peft", "multilora") if r % 2 == 0 else ("multilora", "peft")):
            core = None
            gc.collect()
            core = LLMServerCore(settings) if path == "multilora" else LLMServerCore(settings, engine=PeftEngine(mcfg))
            names = [core.registry.current(TENANT, u).name for u in users]
            r_base, t_base = asyncio.run(throughput(core, args.requests, args.max_tokens, [None]))
            r_mixed, t_mixed = asyncio.run(throughput(core, args.requests, args.max_tokens, names))
            rel = round(r_mixed["tokens_per_s"] / r_base["tokens_per_s"], 3)
            rel_cpu = round(r_mixed["tokens_per_cpu_s"] / r_base["tokens_per_cpu_s"], 3)
            rounds[path].append({"base": r_base, "mixed_8_adapters": r_mixed, "relative": rel,
                                 "relative_cpu": rel_cpu, "load_average_1m": round(os.getloadavg()[0], 1)})
            if tokens.setdefault(path, t_base + t_mixed) != t_base + t_mixed:
                raise AssertionError(f"{path}: greedy tokens changed between rounds")
            print(f"round {r} [{path}]: base {r_base['tokens_per_s']} tok/s, 8 adapters mixed "
                  f"{r_mixed['tokens_per_s']} tok/s ({rel}x wall, {rel_cpu}x per CPU-second), "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    if core is None or isinstance(core.engine, PeftEngine):  # parts 2 and 3 run on the multi-LoRA core
        core = None
        gc.collect()
        core = LLMServerCore(settings)
    out: dict = {}
    for path, rs in rounds.items():
        med = {(k, m): statistics.median(x[k][m] for x in rs) for k in ("base", "mixed_8_adapters")
               for m in ("tokens_per_s", "tokens_per_cpu_s")}
        out[path] = {"rounds": rs, **{k: {m: round(med[(k, m)], 2) for m in ("tokens_per_s", "tokens_per_cpu_s")}
                                      for k in ("base", "mixed_8_adapters")},
                     "relative": round(statistics.median(x["relative"] for x in rs), 3),
                     "relative_cpu": round(statistics.median(x["relative_cpu"] for x in rs), 3)}
    out["token_identical"] = tokens["peft"] == tokens["multilora"]
    out["mixed_speedup_vs_peft"] = round(out["multilora"]["mixed_8_adapters"]["tokens_per_s"]
                                         / out["peft"]["mixed_8_adapters"]["tokens_per_s"], 3)
    out["mixed_speedup_vs_peft_cpu"] = round(out["multilora"]["mixed_8_adapters"]["tokens_per_cpu_s"]
                                             / out["peft"]["mixed_8_adapters"]["tokens_per_cpu_s"], 3)
    return out, core


async def overhead(svc, core, users: list[str], n: int, max_tokens: int) -> dict:
    from services.serve.llm import GenerateRequest
    from services.serve.protocol import ChatCompletionRequest
    from tsubasa.llm.base import ChatMessage, SamplingParams

    prep, bare = [], []
    for i in range(n):
        req = ChatCompletionRequest(model=svc.base_model, user=users[i % len(users)],
                                    messages=[ChatMessage(role="user", content=QUESTIONS[i % len(QUESTIONS)])])
        t0 = time.perf_counter()
        svc._prepare(TENANT, users[i % len(users)], req)
        prep.append((time.perf_counter() - t0) * 1000)
    for i in range(max(5, n // 5)):
        t0 = time.perf_counter()
        await core.generate(GenerateRequest(messages=[ChatMessage(role="user", content=QUESTIONS[i % len(QUESTIONS)])],
                                            params=SamplingParams(max_new_tokens=max_tokens)))
        bare.append((time.perf_counter() - t0) * 1000)
    return {"retrieval_prompt_ms_p50": round(pct(prep, 50), 2), "retrieval_prompt_ms_p99": round(pct(prep, 99), 2),
            "bare_model_call_ms_p50": round(pct(bare, 50), 1), "bare_model_call_ms_p99": round(pct(bare, 99), 1),
            "added_share_of_bare_call_p50": round(pct(prep, 50) / pct(bare, 50), 4),
            "retrievals": len(prep), "bare_calls": len(bare), "bare_max_tokens": max_tokens}


def load_run(url: str, key: str, model: str, users: list[str], clients: int, per_client: int,
             max_tokens: int) -> dict:
    import httpx

    async def one_client(i: int, client: httpx.AsyncClient, lat: list[float], codes: list[int]) -> None:
        for j in range(per_client):
            body = {"model": model, "user": users[(i + j) % len(users)], "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": QUESTIONS[(i + j) % len(QUESTIONS)]}]}
            t0 = time.perf_counter()
            try:
                r = await client.post("/v1/chat/completions", json=body)
                code = r.status_code
            except httpx.HTTPError:
                code = -1
            codes.append(code)
            if code == 200:
                lat.append((time.perf_counter() - t0) * 1000)

    async def main() -> tuple[list[float], list[int], float]:
        lat: list[float] = []
        codes: list[int] = []
        limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
        async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600,
                                     limits=limits) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(one_client(i, client, lat, codes) for i in range(clients)))
            return lat, codes, time.perf_counter() - t0

    lat, codes, dt = asyncio.run(main())
    deliberate = sum(1 for c in codes if c in (429, 503))
    errors = sum(1 for c in codes if c not in (200, 429, 503))
    return {"clients": clients, "requests": len(codes), "ok": codes.count(200), "deliberate_429_503": deliberate,
            "errors": errors, "seconds": round(dt, 2), "requests_per_s": round(codes.count(200) / dt, 3),
            "latency_ms_p50": round(pct(lat, 50), 1), "latency_ms_p99": round(pct(lat, 99), 1),
            "max_tokens": max_tokens, "status_counts": {str(c): codes.count(c) for c in sorted(set(codes))}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=32, help="requests per throughput configuration")
    ap.add_argument("--max-tokens", type=int, default=24, help="completion tokens per throughput request")
    ap.add_argument("--retrievals", type=int, default=100)
    ap.add_argument("--memories", type=int, default=40, help="memories per user")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--per-client", type=int, default=2, help="requests per client in the load run")
    ap.add_argument("--load-max-tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serving.json"))
    ap.add_argument("--only-throughput", action="store_true", help="part 1 only (base vs mixed, both paths)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of both paths in part 1")
    args = ap.parse_args()

    from services.serve import local
    from services.serve.auth import hash_key
    from services.serve.serving import GatewayService
    from tsubasa.config import load_settings
    from tsubasa.llm.models import resolve_model
    from tsubasa.memory.runtime import MemorySystem

    users = [f"u{i}" for i in range(8)]
    result: dict = {"model": args.model, "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
                    "python": sys.version.split()[0], "at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "load_average_1m_at_start": round(os.getloadavg()[0], 1)}
    with tempfile.TemporaryDirectory(prefix="tsubasa-bench-") as tmp:
        tmpd = Path(tmp)
        key = "sk-bench-" + secrets.token_hex(12)
        os.environ["TSUBASA_API_KEYS"] = f"{TENANT}:{hash_key(key)}"
        base = load_settings(data_dir=tmpd / "data", model={"name": args.model, "max_new_tokens": args.max_tokens},
                             milvus={"uri": str(tmpd / "milvus.db")},
                             serve={"port": local.free_port(), "max_batch_size": 8, "llm_num_cpus": 2})
        with local.shared_milvus(base) as settings:
            t0 = time.perf_counter()
            path = resolve_model(args.model, settings.model.cache_dir)
            loras = random_loras(path, tmpd, 8)
            seed(settings, users, args.memories, loras)
            print(f"seeded {len(users)} users x {args.memories} memories + 8 adapters in "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)

            # 1 + 2: in process, the deployment's own code (LLMServerCore = engine + pool + batcher)
            result["throughput"], core = compare_paths(settings, args, users)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2))  # part 1 kept even if a later part dies
            if args.only_throughput:
                finish(result, args)
                return
            memory = MemorySystem(settings, engine=core.engine)
            tok = core.engine.tokenizer
            svc = GatewayService(settings, core, memory, core.registry, core.engine.count_tokens,
                                 lambda ids: tok.decode(ids, skip_special_tokens=True))
            result["overhead"] = asyncio.run(overhead(svc, core, users, args.retrievals, 16))
            del core, svc, memory

            # 3: the full stack over HTTP
            t0 = time.perf_counter()
            started = local.start_ray(settings)
            try:
                url = local.run_app(settings)
                result["stack_start_s"] = round(time.perf_counter() - t0, 1)
                load_run(url, key, args.model, users, 8, 1, args.load_max_tokens)  # warm: load adapters
                result["load"] = load_run(url, key, args.model, users, args.clients, args.per_client,
                                          args.load_max_tokens)
            finally:
                local.shutdown(stop_ray=started)

    finish(result, args)


def finish(result: dict, args) -> None:
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 1)  # other work on the machine skews every figure
    t = result["throughput"]
    rows = []
    for path in ("peft", "multilora"):
        p = t[path]
        per_round = ", ".join(f"{x['relative']:.2f}/{x['relative_cpu']:.2f}" for x in p["rounds"])
        rows += [(f"[{path}] base model alone (median)", f"{p['base']['tokens_per_s']} tok/s, "
                                                         f"{p['base']['tokens_per_cpu_s']} tok/CPU-s"),
                 (f"[{path}] 8 adapters mixed (median)", f"{p['mixed_8_adapters']['tokens_per_s']} tok/s, "
                                                         f"{p['mixed_8_adapters']['tokens_per_cpu_s']} tok/CPU-s"),
                 (f"[{path}]   mixed / base", f"{p['relative']:.2f}x wall, {p['relative_cpu']:.2f}x per CPU-s "
                                              f"(rounds wall/CPU: {per_round})")]
    rows += [("mixed: multi-LoRA / peft", f"{t['mixed_speedup_vs_peft']:.2f}x wall, "
                                          f"{t['mixed_speedup_vs_peft_cpu']:.2f}x per CPU-s"),
             ("greedy tokens identical (both paths)", str(t["token_identical"]))]
    if "overhead" in result:
        o, ld = result["overhead"], result["load"]
        rows += [
            ("retrieval + prompt, per request",
             f"p50 {o['retrieval_prompt_ms_p50']} ms, p99 {o['retrieval_prompt_ms_p99']} ms"),
            ("bare model call (16 tokens)",
             f"p50 {o['bare_model_call_ms_p50']} ms, p99 {o['bare_model_call_ms_p99']} ms"),
            ("  added / bare (p50)", f"{100 * o['added_share_of_bare_call_p50']:.1f}%"),
            (f"load: {ld['clients']} clients, {ld['requests']} requests",
             f"{ld['ok']} ok, {ld['deliberate_429_503']} 429/503, {ld['errors']} errors"),
            ("  latency",
             f"p50 {ld['latency_ms_p50']} ms, p99 {ld['latency_ms_p99']} ms, {ld['requests_per_s']} req/s"),
        ]
    print(f"\nserving benchmark, {args.model} on {result['machine']} (1-min load average at start "
          f"{result['load_average_1m_at_start']}, at end {result['load_average_1m_at_end']})")
    for k, v in rows:
        print(f"  {k:<40} {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    if not t["token_identical"] or result.get("load", {}).get("errors"):
        sys.exit(1)


if __name__ == "__main__":
    main()
