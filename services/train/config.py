"""Distillation job configuration and how it becomes Ray Train / Ray Data objects.

A job YAML has two sections: `settings` (overrides of tsubasa Settings: model, distill, adapters,
...) and `job` (this file's `TrainJobConfig`: workers, GPUs, strategy, failures, storage).
See `services/train/configs/` and `services/train/README.md`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from tsubasa.config import ConfigError, Settings, format_validation_error, load_settings


class DataPipelineConfig(BaseModel):
    """Ray Data stage (QA synthesis + teacher targets): an actor pool that holds the engine."""

    concurrency: int = Field(1, ge=1, le=1024)
    """Actors in the pool (each loads the model once)."""
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    """GPUs per actor (1 for a 32B teacher on one H100 in bf16 is not enough: use tensor-parallel vLLM)."""
    batch_size: int = Field(1, ge=1)
    """Users per `map_batches` call."""


class FSDPConfig(BaseModel):
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "HYBRID_SHARD"] = "FULL_SHARD"
    auto_wrap_layer: str = "Qwen3DecoderLayer"
    """Transformer block class wrapped as one FSDP unit."""
    cpu_offload: bool = False
    activation_checkpointing: bool = True


class TrainJobConfig(BaseModel):
    """How a batch of users is trained on Ray Train."""

    name: str = Field("", pattern=r"^[A-Za-z0-9_.-]{0,100}$")
    """Run name; empty = derived from the users, spec and data (a re-run of the same job resumes)."""
    storage_path: str = ""
    """Where Ray Train keeps checkpoints (local dir, NFS or s3://); empty = `<distill_dir>/ray`."""
    num_workers: int = Field(1, ge=1, le=4096)
    use_gpu: bool = False
    accelerator_type: str | None = None
    """Ray accelerator type the workers need, e.g. `H100` (None = any)."""
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, ge=0)
    strategy: Literal["batched", "fsdp", "deepspeed_zero3"] = "batched"
    """`batched`: each worker trains its own users, `users_per_batch` adapters at once in one
    forward/backward (model fits one device). `fsdp` / `deepspeed_zero3`: all workers train one
    user at a time with the model sharded (32B)."""
    users_per_batch: int = Field(4, ge=1, le=4096)
    """`batched`: adapters a worker trains together (1 = one user after another). Memory grows with
    it: each user adds `distill.batch_size` rows to a step's activations (no gradient checkpointing:
    SmolLM2-135M in fp32 with 16 users x 4 rows of ~120 tokens needed 17 GB) and one LoRA slot with
    its AdamW moments. Raise it on a GPU (with `gradient_checkpointing`)."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    gradient_checkpointing: bool = False
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    max_failures: int = Field(2, ge=-1)
    """Worker-group restarts from the last checkpoint before the job fails (-1 = unlimited)."""
    checkpoints_to_keep: int = Field(2, ge=1)
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    """Torch process-group backend; auto = nccl with GPUs, gloo otherwise."""
    data: DataPipelineConfig = Field(default_factory=DataPipelineConfig)

    @model_validator(mode="after")
    def _consistent(self) -> TrainJobConfig:
        if self.backend == "nccl" and not self.use_gpu:
            raise ValueError("backend=nccl needs use_gpu=true")
        if self.strategy in ("fsdp", "deepspeed_zero3") and self.num_workers < 2:
            raise ValueError(f"strategy={self.strategy} shards the model: num_workers must be >= 2")
        if self.strategy == "deepspeed_zero3" and not self.use_gpu:
            raise ValueError("strategy=deepspeed_zero3 needs use_gpu=true")
        if self.mixed_precision != "no" and not self.use_gpu and self.strategy != "batched":
            raise ValueError("mixed_precision with a sharded strategy needs use_gpu=true")
        return self

    @property
    def torch_backend(self) -> str:
        return ("nccl" if self.use_gpu else "gloo") if self.backend == "auto" else self.backend


def load_job_file(path: str | Path) -> tuple[Settings, TrainJobConfig]:
    """Read a job YAML (`settings:` + `job:`); ConfigError naming the field on a bad value."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"job config {p} does not exist")
    doc = yaml.safe_load(p.read_text()) or {}
    if not isinstance(doc, dict) or set(doc) - {"settings", "job"}:
        raise ConfigError(f"job config {p}: top level must have only `settings` and `job` sections")
    settings = load_settings(**(doc.get("settings") or {}))
    try:
        job = TrainJobConfig.model_validate(doc.get("job") or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc).replace("\n  ", "\n  job.")) from None
    return settings, job


# ---- building Ray objects (imported lazily: ray is a service dependency) ---------------------
def scaling_config(job: TrainJobConfig) -> Any:
    from ray.train import ScalingConfig

    resources: dict[str, float] = {"CPU": job.cpus_per_worker}
    if job.use_gpu:
        resources["GPU"] = job.gpus_per_worker
    return ScalingConfig(num_workers=job.num_workers, use_gpu=job.use_gpu, resources_per_worker=resources,
                         accelerator_type=job.accelerator_type)


def run_config(job: TrainJobConfig, name: str, storage_path: str) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(name=name, storage_path=storage_path,
                     failure_config=FailureConfig(max_failures=job.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoints_to_keep))


def torch_config(job: TrainJobConfig) -> Any:
    from ray.train.torch import TorchConfig

    return TorchConfig(backend=job.torch_backend)


def deepspeed_config(job: TrainJobConfig, settings: Settings) -> dict[str, Any]:
    """ZeRO-3 config for `strategy=deepspeed_zero3` (parameters, grads and optimizer state sharded)."""
    return {
        "train_micro_batch_size_per_gpu": settings.distill.batch_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": settings.distill.max_grad_norm,
        "bf16": {"enabled": job.mixed_precision == "bf16"},
        "fp16": {"enabled": job.mixed_precision == "fp16"},
        "zero_optimization": {
            "stage": 3, "overlap_comm": True, "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": True,
            "offload_param": {"device": "cpu" if job.fsdp.cpu_offload else "none"},
        },
        "optimizer": {"type": "AdamW", "params": {"lr": settings.distill.learning_rate,
                                                  "weight_decay": settings.distill.weight_decay}},
    }


def build_trainer(job: TrainJobConfig, train_fn: Any, loop_config: dict[str, Any], name: str,
                  storage_path: str) -> Any:
    """The TorchTrainer for one distillation job."""
    from ray.train.torch import TorchTrainer

    return TorchTrainer(train_loop_per_worker=train_fn, train_loop_config=loop_config,
                        scaling_config=scaling_config(job), run_config=run_config(job, name, storage_path),
                        torch_config=torch_config(job))
