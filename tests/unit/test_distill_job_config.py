"""The distillation job configs (local and the documented Qwen3-32B one) build into Ray Train objects."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.train.config import (
    TrainJobConfig,
    deepspeed_config,
    load_job_file,
    run_config,
    scaling_config,
    torch_config,
)
from tsubasa.config import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "services" / "train" / "configs"


def test_qwen3_32b_config_builds():
    settings, job = load_job_file(CONFIGS / "qwen3-32b.yaml")
    assert settings.model.name == "Qwen/Qwen3-32B" and settings.model.dtype == "bfloat16"
    assert settings.distill.top_d == 5 and settings.adapters.root.startswith("s3://")
    sc = scaling_config(job)
    assert sc.num_workers == 8 and sc.use_gpu and sc.accelerator_type == "H100"
    assert sc.resources_per_worker == {"CPU": 8, "GPU": 1}
    rc = run_config(job, "distill-x", job.storage_path)
    assert rc.name == "distill-x" and rc.storage_path == "s3://tsubasa-train/checkpoints"
    assert rc.failure_config.max_failures == 3 and rc.checkpoint_config.num_to_keep == 2
    assert torch_config(job).backend == "nccl"
    assert job.strategy == "fsdp" and job.mixed_precision == "bf16" and job.fsdp.auto_wrap_layer == "Qwen3DecoderLayer"
    assert job.data.concurrency == 8 and job.data.num_gpus == 1
    ds = deepspeed_config(job, settings)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]


def test_local_config_builds():
    settings, job = load_job_file(CONFIGS / "local.yaml")
    assert settings.model.name == "smollm2-135m-instruct"
    sc = scaling_config(job)
    assert sc.num_workers == 2 and not sc.use_gpu and sc.resources_per_worker == {"CPU": 1}
    assert torch_config(job).backend == "gloo" and job.strategy == "batched" and job.users_per_batch == 2


def test_bad_job_values_name_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("job:\n  num_workers: 0\n")
    with pytest.raises(ConfigError, match=r"job\.num_workers"):
        load_job_file(bad)
    bad.write_text("job:\n  strategy: fsdp\n  num_workers: 1\n")
    with pytest.raises(ConfigError, match="num_workers must be >= 2"):
        load_job_file(bad)
    bad.write_text("settings:\n  distill:\n    top_d: 0\n")
    with pytest.raises(ConfigError, match=r"distill\.top_d"):
        load_job_file(bad)
    bad.write_text("jobs: {}\n")
    with pytest.raises(ConfigError, match="only `settings` and `job`"):
        load_job_file(bad)
    with pytest.raises(ValueError, match="nccl needs use_gpu"):
        TrainJobConfig(backend="nccl")
