"""`tsubasa ingest ...`: feed events into the memory (LoCoMo conversations; Kafka in `run`/`backfill`)."""

from __future__ import annotations

from pathlib import Path

import typer

from tsubasa.commands.common import ConfigOpt, console, fail, progress, settings_or_exit, setup_logging

app = typer.Typer(no_args_is_help=True)


@app.command()
def locomo(
    conversation: str = typer.Option("conv-26", "--conversation", "-C", help="LoCoMo sample id, or 'all'."),
    sessions: str = typer.Option("all", "--sessions", "-s", help="Session range, e.g. 1-3 or 1,4 or all."),
    tenant: str = typer.Option("demo", "--tenant", "-t", help="Tenant to ingest as."),
    user: str | None = typer.Option(None, "--user", "-u", help="User id (default: the conversation id)."),
    mode: str | None = typer.Option(None, help="evolving | static (default: memory.mode)."),
    model: str | None = typer.Option(None, "--model", "-m", help="LLM (default: model.name); the writer uses it "
                                     "through llama.cpp where it has a GGUF (writer.engine=auto)."),
    data: Path | None = typer.Option(None, help="locomo10.json (default: ../shared/data/)."),
    config: Path | None = ConfigOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Ingest LoCoMo sessions as a tenant's user: raw turns, observations, evolved memory.

    Re-running is a no-op: turns are keyed by event id and processed sessions are skipped."""
    setup_logging(verbose)
    from tsubasa.commands.memory import print_counts
    from tsubasa.eval.locomo import LocomoNotFoundError, load_locomo, parse_range, session_events
    from tsubasa.llm import writer_model
    from tsubasa.memory.runtime import MemorySystem
    from tsubasa.schema import InvalidIdentifierError, validate_identifier

    settings = settings_or_exit(config, **{"memory.mode": mode, "model.name": model})
    try:
        validate_identifier(tenant, "--tenant")
        if user:
            validate_identifier(user, "--user")
        convs = load_locomo(data)
    except (InvalidIdentifierError, LocomoNotFoundError) as exc:
        fail(str(exc))
    if conversation != "all":
        convs = [c for c in convs if c.sample_id == conversation]
        if not convs:
            fail(f"--conversation: no LoCoMo conversation {conversation!r}")
    system = MemorySystem(settings)
    w = writer_model(settings.model, settings.writer)
    console.print(f"writer: {w.name} on the {w.engine} engine")
    scope = [(c, user or c.sample_id) for c in convs]
    before = {k: v for k, v in system.store.counts(tenant).items() if k[1] in {u for _, u in scope}}
    print_counts(before, "before")
    jobs = []
    for conv, uid in scope:
        try:
            picked = parse_range(sessions, [s.index for s in conv.sessions])
        except ValueError as exc:
            fail(f"--sessions: {exc}")
        jobs.extend((conv, conv.session(i), uid) for i in picked)
    totals = {"new_turns": 0, "observations": 0, "skipped": 0}
    with progress() as bar:
        task = bar.add_task("sessions", total=len(jobs))
        for conv, sess, uid in jobs:
            bar.update(task, description=f"{conv.sample_id} {sess.session_id}")
            appended, results = system.writer.ingest(session_events(conv, sess, tenant, uid))
            totals["new_turns"] += appended.new_turns
            for r in results:
                totals["observations"] += r.observations if not r.skipped else 0
                totals["skipped"] += int(r.skipped)
                ops = ", ".join(f"{op} {n}" for op, n in sorted(r.ops.items())) or "none"
                bar.console.print(f"{conv.sample_id} {sess.session_id}: " + (
                    "already processed" if r.skipped else f"{r.observations} observations; operations: {ops}"
                    + (f" ({r.fallbacks} fallback ADDs)" if r.fallbacks else "")))
            bar.advance(task)
    after = {k: v for k, v in system.store.counts(tenant).items() if k[1] in {u for _, u in scope}}
    print_counts(after, "after")
    stats = system.writer.manager.stats
    console.print(f"new turns {totals['new_turns']}, sessions skipped (already processed) {totals['skipped']}, "
                  f"new observations {totals['observations']}, ops {dict(stats.ops)}, "
                  f"LLM decisions {stats.llm_calls}, fallbacks {stats.fallbacks}")


def _kafka_overrides(bootstrap: str | None, topic: str | None, **more) -> dict:
    out = {"kafka.bootstrap_servers": bootstrap, "kafka.topic": topic}
    out.update({f"kafka.{k}": v for k, v in more.items()})
    return out


def _init_ray(address: str | None) -> None:
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)


def _metrics_table(metrics, title: str):
    from rich.table import Table

    table = Table(title=title)
    for col in ("partition", "committed", "highwater", "lag", "open", "pending"):
        table.add_column(col, justify="right")
    for p in metrics.partitions:
        table.add_row(str(p.partition), str(p.committed), str(p.highwater), str(p.lag), str(p.open_sessions),
                      str(p.pending_sessions))
    s = metrics.summary()
    table.caption = (f"consumed {s['consumed']}  appended {s['appended']}  duplicates {s['duplicates']}  "
                     f"dead-lettered {s['dead_lettered']}  sessions closed {s['sessions_closed']}  "
                     f"processed {s['sessions_processed']}  skipped {s['sessions_skipped']}"
                     + (f"  restarting {metrics.unavailable}" if metrics.unavailable else ""))
    return table


@app.command()
def run(
    bootstrap: str | None = typer.Option(None, "--bootstrap", "-b", help="kafka.bootstrap_servers."),
    topic: str | None = typer.Option(None, "--topic", help="Event topic (kafka.topic)."),
    consumers: int | None = typer.Option(None, min=1, help="Consumer actors (kafka.consumers)."),
    writers: int | None = typer.Option(None, min=1, help="Session-writer actors (kafka.writers)."),
    model: str | None = typer.Option(None, "--model", "-m", help="LLM for extraction/evolution (model.name)."),
    address: str | None = typer.Option(None, help="Ray cluster address (default: start Ray locally)."),
    until_drained: bool = typer.Option(False, help="Stop once everything produced is committed and no session waits."),
    max_seconds: float | None = typer.Option(None, min=1, help="Stop after this many seconds."),
    every: float = typer.Option(5.0, min=0.5, help="Seconds between metric reports."),
    config: Path | None = ConfigOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Consume the event topic: raw turn log, then observations and evolved memory per closed session.

    Runs until Ctrl-C / SIGTERM (graceful: in-flight sessions finish, durable offsets are committed).
    Needs a Milvus that several processes can share (`milvus-lite server` or a cluster)."""
    import signal
    import time

    setup_logging(verbose)
    settings = settings_or_exit(config, **_kafka_overrides(bootstrap, topic, consumers=consumers, writers=writers),
                                **{"model.name": model})
    from kafka.errors import KafkaError

    from services.ingest.service import IngestService, LocalMilvusFileError, check_milvus_uri

    try:
        check_milvus_uri(settings)
    except LocalMilvusFileError as exc:
        fail(str(exc))
    _init_ray(address)
    stop = {"now": False}

    def _stop(signum, frame) -> None:
        stop["now"] = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        service = IngestService(settings).start()
    except KafkaError as exc:
        fail(f"kafka.bootstrap_servers {settings.kafka.bootstrap_servers}: {exc!r}")
    console.print(f"consuming {settings.kafka.topic}: partitions {service.assignment} -> "
                  f"{len(service.consumers)} consumers, {len(service.writers)} writers (Ctrl-C stops)")
    t0 = last = time.monotonic()
    try:
        while not stop["now"]:
            time.sleep(0.5)
            if until_drained and service.drained():
                break
            if max_seconds and time.monotonic() - t0 >= max_seconds:
                break
            if time.monotonic() - last >= every:
                console.print(_metrics_table(service.metrics(), f"ingest after {time.monotonic() - t0:.0f}s"))
                last = time.monotonic()
    finally:
        console.print("stopping: finishing in-flight sessions and committing durable offsets ...")
        final = service.stop()
    console.print(_metrics_table(final, f"final ({time.monotonic() - t0:.0f}s)"))


@app.command()
def backfill(
    bootstrap: str | None = typer.Option(None, "--bootstrap", "-b", help="Kafka bootstrap servers."),
    topic: str | None = typer.Option(None, "--topic", help="Topic whose retained history is read (kafka.topic)."),
    reader: str = typer.Option("auto", help="auto | ray (ray.data.read_kafka) | kafka-python (bounded datasource)."),
    start: list[str] = typer.Option([], "--start", help="PARTITION:OFFSET to start from (repeatable; default 0)."),
    concurrency: int = typer.Option(1, min=1, help="Appender actors."),
    process_sessions: bool = typer.Option(False, help="Also process the sessions the history closes (needs the LLM)."),
    model: str | None = typer.Option(None, "--model", "-m", help="LLM for --process-sessions (model.name)."),
    address: str | None = typer.Option(None, help="Ray cluster address (default: start Ray locally)."),
    config: Path | None = ConfigOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v"),
) -> None:
    """Rebuild raw turn logs from a topic's retained history (bounded Ray Data read, idempotent writes)."""
    setup_logging(verbose)
    if reader not in ("auto", "ray", "kafka-python"):
        fail(f"--reader: expected auto, ray or kafka-python, got {reader!r}")
    starts: dict[int, int] = {}
    for item in start:
        p, _, off = item.partition(":")
        if not (p.isdigit() and off.isdigit()):
            fail(f"--start: expected PARTITION:OFFSET, got {item!r}")
        starts[int(p)] = int(off)
    settings = settings_or_exit(config, **_kafka_overrides(bootstrap, topic), **{"model.name": model})
    from services.ingest.backfill import backfill as run_backfill
    from services.ingest.service import LocalMilvusFileError, check_milvus_uri

    try:
        check_milvus_uri(settings)
    except LocalMilvusFileError as exc:
        fail(str(exc))
    _init_ray(address)
    report = run_backfill(settings, reader=reader, starts=starts, concurrency=concurrency)  # type: ignore[arg-type]
    console.print(f"reader {report.reader} ({report.why})")
    console.print(f"read {report.read} messages up to {report.end_offsets} in {report.seconds:.1f}s: "
                  f"{report.appended} turns appended, {report.duplicates} already stored, "
                  f"{report.session_ends} session ends, {report.invalid} invalid")
    for sample in report.invalid_samples:
        console.print(f"  invalid {sample}")
    closed = report.closed_sessions()
    if process_sessions and closed:
        from tsubasa.memory.runtime import MemorySystem

        writer = MemorySystem(settings).writer
        done = skipped = 0
        with progress() as bar:
            task = bar.add_task("sessions", total=len(closed))
            for key in closed:
                res = writer.process_session(*key)
                skipped += int(res.skipped)
                done += int(not res.skipped)
                bar.advance(task)
        console.print(f"sessions processed {done}, already done {skipped}")
    elif closed:
        console.print(f"{len(closed)} sessions are closed in this history (--process-sessions processes them)")
