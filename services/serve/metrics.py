"""Prometheus metrics of one gateway replica (`GET /metrics`); Ray Serve exports its own
per-deployment metrics (queue lengths, replica counts, multiplexed model loads) beside these."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry()
REQUESTS = Counter("tsubasa_requests_total", "Gateway requests by route and status.", ["route", "status"],
                   registry=REGISTRY)
LATENCY = Histogram("tsubasa_request_seconds", "Gateway request latency.", ["route"], registry=REGISTRY,
                    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
RETRIEVAL = Histogram("tsubasa_retrieval_seconds", "Memory retrieval + prompt building per chat request.",
                      registry=REGISTRY, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
MEMORY_TOKENS = Histogram("tsubasa_memory_tokens", "Grounding tokens per chat request.", registry=REGISTRY,
                          buckets=(0, 16, 32, 64, 128, 256, 512, 1024))
COMPLETION_TOKENS = Counter("tsubasa_completion_tokens_total", "Generated tokens.", ["tenant"], registry=REGISTRY)
ADAPTER_REQUESTS = Counter("tsubasa_adapter_requests_total", "Chat requests by whether an adapter served them.",
                           ["adapter"], registry=REGISTRY)
REJECTED = Counter("tsubasa_rejected_total", "Requests refused by reason.", ["reason"], registry=REGISTRY)
INFLIGHT = Gauge("tsubasa_inflight_requests", "Chat requests being served by this replica.", registry=REGISTRY)
WAITING = Gauge("tsubasa_waiting_requests", "Chat requests queued in this replica.", registry=REGISTRY)
SESSION_QUEUE = Gauge("tsubasa_session_queue_depth", "Closed sessions waiting for memory evolution.",
                      registry=REGISTRY)
SESSIONS = Counter("tsubasa_sessions_processed_total", "Sessions evolved into memory, by outcome.", ["outcome"],
                   registry=REGISTRY)


def render() -> bytes:
    return generate_latest(REGISTRY)
