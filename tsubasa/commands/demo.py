"""`tsubasa demo`: the main job on embedded defaults, through the served path.

Starts a local Milvus (`milvus-lite server` over `.tsubasa/milvus.db`) and a local Ray with the
Serve app (gateway + LLM deployment), feeds the first sessions of a LoCoMo conversation through
`POST /v1/events`, waits for the evolving memory to be built, distils that user's adapter briefly
(`tsubasa distill --local`), then asks LoCoMo questions through `/v1/chat/completions` with the
official `openai` client and prints answer, gold answer, F1 and memory tokens."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import typer
from rich.table import Table

from tsubasa.commands.common import ConfigOpt, console, fail, progress, settings_or_exit, setup_logging


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def demo(
    conversation: str = typer.Option("conv-26", "--conversation", "-C", help="LoCoMo sample id."),
    sessions: int = typer.Option(2, "--sessions", "-s", min=1, help="How many first sessions to feed."),
    questions: int = typer.Option(5, "--questions", "-q", min=1, help="How many questions to ask."),
    tenant: str = typer.Option("demo", "--tenant", "-t"),
    distill: bool = typer.Option(True, "--distill/--no-distill", help="Distil the user's adapter before asking."),
    qa: int = typer.Option(8, "--qa", min=1, help="Synthetic QA pairs for the brief distillation."),
    epochs: int = typer.Option(1, "--epochs", min=1, help="Epochs of the brief distillation."),
    port: int | None = typer.Option(None, help="HTTP port (default: serve.port, or a free one)."),
    config: Path | None = ConfigOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Feed LoCoMo sessions through /v1/events, build the evolving memory, distil the user's adapter,
    then answer LoCoMo questions through the OpenAI-compatible endpoint."""
    setup_logging(verbose)
    from tsubasa.eval.locomo import LocomoNotFoundError, get_conversation, session_events
    from tsubasa.eval.metrics import f1_locomo
    from tsubasa.schema import InvalidIdentifierError, validate_identifier

    t_start = time.perf_counter()
    settings = settings_or_exit(config)
    try:
        validate_identifier(tenant, "--tenant")
        conv = get_conversation(conversation)
    except (LocomoNotFoundError, KeyError, InvalidIdentifierError) as exc:
        fail(str(exc))
    import httpx
    import openai

    from services.serve import local
    from services.serve.auth import hash_key

    local.exit_on_sigterm()
    sc = settings.serve
    chosen = port or (sc.port if _port_free(sc.host, sc.port) else local.free_port())
    settings = settings.model_copy(update={"serve": sc.model_copy(update={"port": chosen})})
    key = "sk-demo-" + secrets.token_hex(16)  # a throw-away key for this run's tenant
    var = sc.api_keys_env
    os.environ[var] = ",".join(p for p in (os.environ.get(var, ""), f"{tenant}:{hash_key(key)}") if p)
    os.environ.setdefault("TSUBASA_DATA_DIR", str(settings.data_dir))
    user = conv.sample_id
    picked = conv.sessions[:sessions]
    dias = {t.dia_id for s in picked for t in s.turns}
    qas = [q for q in conv.qa if q.scored and q.evidence and set(q.evidence) <= dias][:questions]
    console.print(f"[bold]TSUBASA demo[/bold]: LoCoMo {conv.sample_id}, sessions 1-{len(picked)} as "
                  f"{tenant}/{user}, model {settings.model.name} ({settings.model.engine}), data {settings.data_dir}")
    timings: dict[str, float] = {}
    with local.shared_milvus(settings) as shared:
        t0 = time.perf_counter()
        started = local.start_ray(shared)
        try:
            with console.status("starting local Ray + Serve (gateway, LLM deployment)..."):
                url = local.run_app(shared)
            timings["start"] = time.perf_counter() - t0
            console.print(f"serving {url}/v1 (Milvus {shared.milvus_uri}) in {timings['start']:.0f}s")
            headers = {"Authorization": f"Bearer {key}"}
            http = httpx.Client(base_url=url, headers=headers, timeout=shared.serve.request_timeout_s)

            # 1. events -> raw turns -> (session end) observations -> evolving memory
            t0 = time.perf_counter()
            with progress() as bar:
                task = bar.add_task("events", total=len(picked))
                for sess in picked:
                    bar.update(task, description=f"POST /v1/events {sess.session_id}")
                    events = [e.model_dump(mode="json") for e in session_events(conv, sess, tenant, user)]
                    r = http.post("/v1/events", json={"events": events})
                    if r.status_code != 200:
                        fail(f"/v1/events answered {r.status_code}: {r.text[:300]}", code=1)
                    bar.update(task, description=f"memory evolution {sess.session_id}")
                    for attempt in range(2):
                        while (status := http.get(f"/v1/users/{user}").json())["pending_sessions"]:
                            time.sleep(1.0)
                        failed = [f for f in status["failed_sessions"] if f.startswith(f"{sess.session_id}:")]
                        if not failed or attempt:
                            break
                        console.print(f"[yellow]retrying {failed[0]}[/yellow]")  # re-sending the end re-queues it
                        http.post("/v1/events", json={"events": events[-1:]})
                    bar.advance(task)
            timings["memory"] = time.perf_counter() - t0
            if status["failed_sessions"]:
                console.print(f"[yellow]sessions that failed evolution: {status['failed_sessions']}[/yellow]")
            console.print(f"memory of {tenant}/{user}: {status['turns']} turns, {status['observations']} "
                          f"observations, {status['memories']} memories ({timings['memory']:.0f}s)")

            # 2. self-learning: a brief distillation publishes the user's adapter; the gateway serves
            #    the new version from the next request on (no restart).
            if distill:
                t0 = time.perf_counter()
                cmd = [sys.executable, "-m", "tsubasa.cli", "distill", "--tenant", tenant, "--user", user, "--local",
                       "--qa", str(qa), "--epochs", str(epochs), "--milvus", shared.milvus_uri]
                if config is not None:
                    cmd += ["--config", str(config)]
                console.print(f"distilling: {' '.join(cmd[1:])}")
                proc = subprocess.run(cmd, env={**os.environ, "TSUBASA_DATA_DIR": str(settings.data_dir)})
                timings["distill"] = time.perf_counter() - t0
                if proc.returncode != 0:
                    console.print(f"[yellow]distillation failed (exit {proc.returncode}); answering with memories "
                                  "and the base model[/yellow]")
            else:
                console.print("distillation skipped (--no-distill)")

            # 3. questions through the OpenAI-compatible endpoint
            t0 = time.perf_counter()
            client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=2,
                                   timeout=shared.serve.request_timeout_s)
            table = Table(title=f"LoCoMo questions for {tenant}/{user} through {url}/v1/chat/completions")
            for col in ("question", "answer", "gold", "F1", "memory tokens", "model"):
                table.add_column(col)
            f1s, mem_tokens = [], []
            for q in qas:
                resp = client.chat.completions.create(
                    model=shared.model.name, user=user, max_tokens=32,
                    messages=[{"role": "user", "content": q.question}])
                answer = resp.choices[0].message.content or ""
                f1 = f1_locomo(answer, q.answer, q.category)
                f1s.append(f1)
                mem_tokens.append(resp.usage.memory_tokens)
                table.add_row(q.question, answer, str(q.answer), f"{f1:.2f}", str(resp.usage.memory_tokens), resp.model)
            timings["answers"] = time.perf_counter() - t0
            console.print(table)
            if f1s:
                console.print(f"mean F1 {sum(f1s) / len(f1s):.3f} over {len(f1s)} questions, mean memory tokens "
                              f"{sum(mem_tokens) / len(mem_tokens):.0f} (top-{shared.memory.top_k} memories)")
            console.print("timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()) +
                          f", total {time.perf_counter() - t_start:.0f}s")
        finally:
            local.shutdown(stop_ray=started)
