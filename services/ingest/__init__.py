"""Streaming ingestion: Kafka -> Ray consumer actors -> raw turn log -> session writers -> memory.

Modules (import what you need; this package imports nothing heavy by itself):

- `direct`: the same write path without Kafka or Ray (the gateway's `/v1/events`, scripts).
- `kafka_io`: kafka-python clients, topic creation, murmur2 partitioning, dead-letter records.
- `tracker`: per-partition session and commit bookkeeping (pure Python).
- `consumer`, `session_writer`, `service`: the Ray actors and the service that runs them.
- `producer`: publish events (LoCoMo replay, benchmarks).
- `backfill`: rebuild raw logs from a topic's retained history with Ray Data.
"""
