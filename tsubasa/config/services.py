"""The sections of the settings that only `services/` reads: the HTTP gateway and Kafka."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator


class ServeConfig(BaseModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys_env: str = "TSUBASA_API_KEYS"
    """Env var holding `tenant:sha256hex,...` (from a Kubernetes Secret)."""
    max_ongoing_requests: int = Field(32, ge=1)
    max_queued_requests: int = Field(64, ge=0)
    request_timeout_s: float = Field(120.0, gt=0)
    max_request_bytes: int = Field(1_000_000, ge=1024)
    llm_replicas: int = Field(1, ge=1)
    """LLM replicas (the autoscaler's start value when `autoscaling` is on)."""
    gateway_replicas: int = Field(1, ge=1)
    """Gateway replicas; more than one needs a shared Milvus (`milvus-lite server` or a cluster)."""
    autoscaling: bool = False
    """Scale LLM replicas between `min_replicas` and `max_replicas` on ongoing requests."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    adapters_per_replica: int = Field(8, ge=1)
    """LoRA adapters kept loaded per LLM replica (Serve multiplexing LRU)."""
    llm_max_ongoing_requests: int = Field(64, ge=1)
    """Requests one LLM replica holds at once (batched together, see `max_batch_size`)."""
    llm_max_queued_requests: int = Field(128, ge=0)
    """Requests waiting for an LLM replica before the gateway answers 503."""
    max_batch_size: int = Field(8, ge=1, le=1024)
    """Concurrent requests merged into one mixed-adapter engine call."""
    batch_wait_timeout_s: float = Field(0.02, ge=0.0, le=5.0)
    max_completion_tokens: int = Field(512, ge=1)
    """Upper bound on `max_tokens` a client may ask for."""
    session_queue_size: int = Field(256, ge=1)
    """Closed sessions waiting for memory evolution in one gateway replica (`/v1/events` answers 429 beyond)."""
    retry_after_s: int = Field(1, ge=1)
    """Retry-After seconds sent with 429/503."""
    llm_num_cpus: float = Field(2.0, gt=0)
    """Ray CPUs of one LLM replica; a transformers engine also uses this many torch threads."""
    ray_address: str = ""
    """Ray cluster to join (`auto`, `ray://...`); empty = start a local Ray."""
    ray_num_cpus: int | None = Field(None, ge=1)
    """Logical CPUs of a local Ray (default: the machine's)."""

    @model_validator(mode="after")
    def _replica_bounds(self) -> ServeConfig:
        if self.autoscaling and not self.min_replicas <= self.llm_replicas <= self.max_replicas:
            raise ValueError("with autoscaling, min_replicas <= llm_replicas <= max_replicas must hold")
        return self


class KafkaConfig(BaseModel):
    """Streaming ingestion (`tsubasa ingest run`, services/ingest): Kafka -> Ray actors -> memory."""

    bootstrap_servers: str = "127.0.0.1:9092"
    topic: str = "tsubasa.events"
    dead_letter_topic: str = "tsubasa.events.dlq"
    group_id: str = "tsubasa-ingest"
    """Consumer group whose committed offsets record what is durable (partitions are assigned by the
    ingest service, not by group rebalancing)."""
    session_idle_timeout_s: float = Field(1800.0, gt=0)
    """A session with no new event for this long, on a partition read to its end, is closed."""
    max_retries: int = Field(3, ge=0)
    """Retries of a failing session (or event) before it goes to the dead-letter topic."""
    retry_backoff_s: float = Field(0.5, ge=0)
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "PLAIN"
    partitions: int = Field(8, ge=1, le=10_000)
    """Partitions of the event topic when the ingest service creates it."""
    consumers: int = Field(2, ge=1, le=1024)
    """Consumer actors; partitions are split between them (at most one actor per partition)."""
    writers: int = Field(2, ge=1, le=1024)
    """Session-writer actors, sharded by hash(tenant:user): a user's sessions apply in order."""
    max_poll_records: int = Field(500, ge=1, le=100_000)
    max_pending_sessions: int = Field(64, ge=1)
    """Back-pressure: a consumer pauses its partitions while this many closed sessions wait."""
    commit_interval_s: float = Field(1.0, gt=0)
    session_timeout_ms: int = Field(6000, ge=1000)
    heartbeat_interval_ms: int = Field(1000, ge=100)
    actor_num_cpus: float = Field(0.25, ge=0)
    """Logical CPUs Ray reserves per ingest actor."""
    actor_torch_threads: int = Field(1, ge=1, le=256)
    """Intra-op threads per actor (several actors share the cores; 1 is fastest on small machines)."""

    @model_validator(mode="after")
    def _sasl(self) -> KafkaConfig:
        if self.security_protocol.startswith("SASL") and not (self.sasl_username and self.sasl_password):
            raise ValueError("security_protocol SASL_* needs sasl_username and sasl_password")
        if self.heartbeat_interval_ms >= self.session_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be below session_timeout_ms")
        return self
