"""`tsubasa events ...`: produce event streams (LoCoMo replay) to the event topic."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from tsubasa.commands.common import ConfigOpt, console, fail, progress, settings_or_exit, setup_logging

app = typer.Typer(no_args_is_help=True)


@app.command("produce-locomo")
def produce_locomo(
    conversation: list[str] = typer.Option(["conv-26"], "--conversation", "-C",
                                           help="LoCoMo sample id (repeatable), or 'all'."),
    tenant: list[str] = typer.Option(["demo"], "--tenant", "-t", help="Tenant (repeatable: each gets the stream)."),
    user: list[str] = typer.Option([], "--user", "-u",
                                   help="User id per conversation, in order (default: the conversation id)."),
    sessions: str = typer.Option("all", "--sessions", "-s", help="Session range, e.g. 1-3 or 1,4 or all."),
    copies: int = typer.Option(1, min=1, max=10_000, help="Replay each conversation as this many users (<user>-<i>)."),
    end_events: bool = typer.Option(True, "--end/--no-end",
                                    help="Emit session_end events (--no-end: sessions close by newer session/idle)."),
    rate: float = typer.Option(0.0, min=0.0, help="Events per second (0 = as fast as the broker takes them)."),
    bootstrap: str | None = typer.Option(None, "--bootstrap", "-b", help="kafka.bootstrap_servers."),
    topic: str | None = typer.Option(None, "--topic", help="kafka.topic."),
    partitions: int | None = typer.Option(None, min=1, help="Partitions if the topic is created (kafka.partitions)."),
    data: Path | None = typer.Option(None, help="locomo10.json (default: ../shared/data/)."),
    as_json: bool = typer.Option(False, "--json", help="Print the produce report as JSON."),
    config: Path | None = ConfigOpt,
) -> None:
    """Replay LoCoMo conversations as a stream of events keyed `tenant:user`.

    Users' sessions are interleaved as a live stream would be (round-robin over users, session by
    session); each user's events stay in order on one partition."""
    setup_logging()
    from tsubasa.eval.locomo import LocomoNotFoundError, load_locomo, parse_range, session_events
    from tsubasa.schema import InvalidIdentifierError, validate_identifier

    settings = settings_or_exit(config, **{"kafka.bootstrap_servers": bootstrap, "kafka.topic": topic,
                                           "kafka.partitions": partitions})
    try:
        for t in tenant:
            validate_identifier(t, "--tenant")
        for u in user:
            validate_identifier(u, "--user")
        convs = load_locomo(data)
    except (InvalidIdentifierError, LocomoNotFoundError) as exc:
        fail(str(exc))
    if conversation != ["all"]:
        by_id = {c.sample_id: c for c in convs}
        missing = [c for c in conversation if c not in by_id]
        if missing:
            fail(f"--conversation: no LoCoMo conversation {', '.join(missing)} (have {', '.join(by_id)})")
        convs = [by_id[c] for c in conversation]
    if len(user) > len(convs):
        fail(f"--user: {len(user)} users for {len(convs)} conversations")
    streams = []
    for t in tenant:
        for i, conv in enumerate(convs):
            base = user[i] if i < len(user) else conv.sample_id
            try:
                picked = parse_range(sessions, [s.index for s in conv.sessions])
            except ValueError as exc:
                fail(f"--sessions: {exc}")
            for k in range(copies):
                uid = base if copies == 1 else f"{base}-{k + 1}"
                streams.append([session_events(conv, conv.session(j), t, uid, close=end_events) for j in picked])

    from kafka.errors import KafkaError

    from services.ingest.kafka_io import ensure_topics
    from services.ingest.producer import EventProducer, interleave_sessions

    events = interleave_sessions(streams)
    try:
        ensure_topics(settings.kafka)
        with EventProducer(settings.kafka) as producer, progress() as bar:
            task = bar.add_task(f"producing to {settings.kafka.topic}", total=len(events))
            report = producer.produce(events, rate=rate, on_batch=lambda r: bar.update(task, completed=r.produced))
    except KafkaError as exc:
        fail(f"kafka.bootstrap_servers {settings.kafka.bootstrap_servers}: {exc!r}")
    out = {"topic": settings.kafka.topic, "events": report.produced, "users": len(streams),
           "seconds": round(report.seconds, 3), "events_per_s": round(report.events_per_s, 1),
           "resent": report.resent, "per_partition": report.per_partition, "end_offsets": report.end_offsets}
    if as_json:
        console.print_json(json.dumps(out))
    else:
        console.print(f"produced {out['events']} events for {out['users']} users to {out['topic']} in "
                      f"{out['seconds']}s ({out['events_per_s']}/s); end offsets {out['end_offsets']}")
