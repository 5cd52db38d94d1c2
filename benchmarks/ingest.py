"""Streaming-ingestion throughput on this machine: events/s into the raw log and end-to-end
sessions/s with tiny-qwen3, through the real path (tansu broker -> Ray consumer actors -> Milvus
Lite server; session writers run extraction + evolution with the LLM).

    .venv/bin/python benchmarks/ingest.py                      # defaults below, 3 repeats, medians
    .venv/bin/python benchmarks/ingest.py --events 4000 --session-users 6 --repeats 3 --out runs/ingest.json

Raw log: `--events` turn events (no session ends, idle timeout off), produced after the actors are
ready; the clock runs from the first produce until every turn is appended (Milvus upsert included;
turns are embedded on arrival only with `--embed-turns`, the old default). Backlog (on by default,
`--no-backlog` skips it): the same events produced before the service starts, timed from the first
appended turns until all are in, so the producer is off the cores. `--session-users 0`
skips the sessions figure. Sessions: `--session-users` users x `--sessions` sessions, each ending with a
session_end event; the clock runs until every session is processed and committed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "support"))  # local_services: broker / milvus-lite server
sys.path.insert(0, str(ROOT))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _settings(tmp: Path, bootstrap: str, milvus_url: str, tag: str, args, **kafka):
    from tsubasa.config import load_settings

    cfg = {"bootstrap_servers": bootstrap, "topic": f"bench-{tag}", "dead_letter_topic": f"bench-{tag}.dlq",
           "group_id": f"bench-{tag}", "partitions": args.partitions, "consumers": args.consumers,
           "writers": args.writers, "commit_interval_s": 0.5, **kafka}
    return load_settings(data_dir=tmp / "data", model={"name": "tiny-qwen3"},
                         milvus={"uri": milvus_url, "collection_prefix": f"b{tag}"}, kafka=cfg,
                         memory={"embed_turns_on_ingest": args.embed_turns})


def _run(settings, events, done, timeout_s: float) -> tuple[float, dict]:
    """Live: the service is up, then the events are produced; the clock runs from the first
    produce until `done` (the producer shares the cores with the pipeline)."""
    from services.ingest.producer import EventProducer
    from services.ingest.service import IngestService

    service = IngestService(settings).start()
    try:
        t0 = time.monotonic()
        with EventProducer(settings.kafka) as producer:
            produced = producer.produce(events)
        if not service.wait_until(lambda: done(service, produced), timeout_s=timeout_s, every_s=0.2):
            raise RuntimeError(f"not finished in {timeout_s}s: {service.metrics().summary()}")
        elapsed = time.monotonic() - t0
        summary = service.metrics().summary()
        summary["produce_events_per_s"] = round(produced.events_per_s, 1)
    finally:
        service.stop(grace_s=5)
    return elapsed, summary


def _run_backlog(settings, events, timeout_s: float) -> tuple[int, float, dict]:
    """Backlog: every event is in the topic before the service starts (a consumer catching up,
    or `kafka-consumer-perf-test`'s set-up); the producer is not on the cores while the clock runs.
    The clock starts at the first poll that shows appended turns (those counted by then are left
    out) and stops when all are appended; returns (events timed, seconds, summary)."""
    from services.ingest.producer import EventProducer
    from services.ingest.service import IngestService

    with EventProducer(settings.kafka) as producer:
        producer.produce(events)
    n = len(events)
    service = IngestService(settings).start(wait_ready=False)
    first: list[tuple[float, int]] = []

    def done() -> bool:
        got = service.metrics().total("appended")
        if got and not first:
            first.append((time.monotonic(), got))
        return got >= n

    try:
        if not service.wait_until(done, timeout_s=timeout_s, every_s=0.1):
            raise RuntimeError(f"not finished in {timeout_s}s: {service.metrics().summary()}")
        t1, n1 = first[0]
        elapsed = time.monotonic() - t1
        summary = service.metrics().summary()
    finally:
        service.stop(grace_s=5)
    return n - n1, elapsed, summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=4000, help="turn events for the raw-log figure")
    ap.add_argument("--users", type=int, default=40)
    ap.add_argument("--session-users", type=int, default=6)
    ap.add_argument("--sessions", type=int, default=3, help="sessions per user for the sessions/s figure")
    ap.add_argument("--turns", type=int, default=12, help="turns per session for the sessions/s figure")
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--consumers", type=int, default=2)
    ap.add_argument("--writers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--embed-turns", action=argparse.BooleanOptionalAction, default=False,
                    help="embed raw turns on arrival (memory.embed_turns_on_ingest)")
    ap.add_argument("--backlog", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the raw log drained from a backlog (events produced before the service starts)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ingest.json"))
    args = ap.parse_args()

    import ray
    from ingest_workload import workload
    from local_services import MilvusLiteServer, TansuBroker

    load0 = os.getloadavg()[0]  # other work on a shared machine depresses the figures: recorded with them
    uptime0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    per_session = max(2, args.events // max(1, args.users))
    raw = workload(users=args.users, sessions=1, per_session=per_session, prefix="r")
    raw_events = [e for e in raw.events if e.kind == "turn"]
    # every session ends explicitly, so the clock stops on processing alone (no idle wait)
    sess_events = workload(users=args.session_users, sessions=args.sessions, per_session=args.turns + 1,
                           prefix="s", all_end=True).events if args.session_users else []
    n_sessions = sum(1 for e in sess_events if e.kind == "session_end")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}})
    results: dict[str, list] = {"raw_events_per_s": [], "backlog_events_per_s": [], "sessions_per_s": [],
                                "raw_runs": [], "backlog_runs": [], "session_runs": []}
    with TansuBroker(tmp / "broker") as broker, MilvusLiteServer(tmp / "milvus") as milvus:
        for r in range(args.repeats):
            s = _settings(tmp, broker.bootstrap, milvus.url, f"raw{r}", args, session_idle_timeout_s=1e6)
            n = len(raw_events)
            elapsed, summary = _run(s, raw_events, lambda svc, p, n=n: svc.metrics().total("appended") >= n,
                                    args.timeout)
            results["raw_events_per_s"].append(n / elapsed)
            results["raw_runs"].append({"events": n, "seconds": round(elapsed, 2), **summary})
            print(f"raw log  repeat {r + 1}: {n} events in {elapsed:.1f}s = {n / elapsed:.1f} events/s", flush=True)
        for r in range(args.repeats if args.backlog else 0):
            s = _settings(tmp, broker.bootstrap, milvus.url, f"log{r}", args, session_idle_timeout_s=1e6)
            timed, elapsed, summary = _run_backlog(s, raw_events, args.timeout)
            results["backlog_events_per_s"].append(timed / elapsed)
            results["backlog_runs"].append({"events": len(raw_events), "timed_events": timed,
                                            "seconds": round(elapsed, 2), **summary})
            print(f"backlog  repeat {r + 1}: {timed} events in {elapsed:.1f}s = {timed / elapsed:.1f} events/s",
                  flush=True)
        for r in range(args.repeats if n_sessions else 0):
            s = _settings(tmp, broker.bootstrap, milvus.url, f"ses{r}", args, session_idle_timeout_s=1e6)
            elapsed, summary = _run(s, sess_events, lambda svc, p: svc.drained(p.end_offsets), args.timeout)
            results["sessions_per_s"].append(n_sessions / elapsed)
            results["session_runs"].append({"sessions": n_sessions, "events": len(sess_events),
                                            "seconds": round(elapsed, 2), **summary})
            print(f"sessions repeat {r + 1}: {n_sessions} sessions ({len(sess_events)} events) in {elapsed:.1f}s = "
                  f"{n_sessions / elapsed:.3f} sessions/s", flush=True)
    ray.shutdown()
    out = {
        "benchmark": "ingest", "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_avg_1m_start_end": [round(load0, 1), round(os.getloadavg()[0], 1)],
                    "uptime_start": uptime0,
                    "uptime_end": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "raw_events_per_s_median": round(statistics.median(results["raw_events_per_s"]), 1),
        "backlog_events_per_s_median": (round(statistics.median(results["backlog_events_per_s"]), 1)
                                        if results["backlog_events_per_s"] else None),
        "sessions_per_s_median": (round(statistics.median(results["sessions_per_s"]), 3)
                                  if results["sessions_per_s"] else None),
        "turns_embedded_on_ingest": args.embed_turns,
        **{k: ([round(x, 3) for x in v] if k.endswith("_per_s") else v) for k, v in results.items()},
        "model": "tiny-qwen3", "embedder": "all-MiniLM-L6-v2",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nevents/s into the raw log (median of {args.repeats}): {out['raw_events_per_s_median']}")
    if results["backlog_events_per_s"]:
        print(f"events/s drained from a backlog (median of {args.repeats}): {out['backlog_events_per_s_median']}")
    if results["sessions_per_s"]:
        print(f"end-to-end sessions/s with tiny-qwen3 (median of {args.repeats}): {out['sessions_per_s_median']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
