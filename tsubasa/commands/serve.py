"""`tsubasa serve`: run the OpenAI-compatible gateway and the LLM deployment on Ray Serve until
interrupted (a local Ray and a `milvus-lite server` unless configured otherwise)."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

import typer

from tsubasa.commands.common import ConfigOpt, console, fail, settings_or_exit, setup_logging


def serve(
    host: str | None = typer.Option(None, help="Bind address (default: serve.host, 127.0.0.1)."),
    port: int | None = typer.Option(None, help="HTTP port (default: serve.port, 8000)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Base model (default: model.name)."),
    engine: str | None = typer.Option(None, help="hf | vllm (default: model.engine)."),
    replicas: int | None = typer.Option(None, help="LLM replicas (default: serve.llm_replicas)."),
    hash_key: str | None = typer.Option(None, "--hash-key", help="Print the sha256 to put in TSUBASA_API_KEYS "
                                        "for this key, and exit."),
    config: Path | None = ConfigOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Serve /v1/chat/completions, /v1/models, /v1/events, /v1/users/{id}, /healthz and /metrics.

    API keys: TSUBASA_API_KEYS="tenant:sha256hex,..." (see `--hash-key`)."""
    setup_logging(verbose)
    if hash_key is not None:
        from services.serve.auth import hash_key as digest

        console.print(digest(hash_key))
        return
    if engine not in (None, "hf", "vllm"):
        fail(f"--engine must be hf or vllm (got {engine!r})")
    settings = settings_or_exit(config, **{"serve.host": host, "serve.port": port, "model.name": model,
                                           "model.engine": engine, "serve.llm_replicas": replicas})
    from services.serve import local
    from services.serve.auth import APIKeyAuth

    try:
        auth = APIKeyAuth.from_env(settings.serve.api_keys_env)
    except ValueError as exc:
        fail(f"{settings.serve.api_keys_env}: {exc}")
    if not auth.tenants:
        fail(f"{settings.serve.api_keys_env} is empty: set it to 'tenant:<sha256 of the key>,...' "
             "(`tsubasa serve --hash-key KEY` prints the hash)")
    os.environ.setdefault("TSUBASA_DATA_DIR", str(settings.data_dir))
    with local.shared_milvus(settings) as shared:
        started = local.start_ray(shared)
        try:
            with console.status("starting Ray Serve (gateway + LLM deployment)..."):
                url = local.run_app(shared)
            console.print(f"[bold green]TSUBASA serving[/bold green] {url}/v1 (model {shared.model.name}, engine "
                          f"{shared.model.engine}, tenants {', '.join(sorted(auth.tenants))}, Milvus "
                          f"{shared.milvus_uri}); Ctrl-C stops")
            console.print(f"  curl {url}/v1/chat/completions -H 'Authorization: Bearer $KEY' "
                          "-H 'Content-Type: application/json' -d '{\"model\": \"" + shared.model.name +
                          "\", \"user\": \"alice\", \"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}]}'")
            stop = threading.Event()
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
        finally:
            console.print("shutting down")
            local.shutdown(stop_ray=started)
