"""ray_cluster.yaml: accepted by Ray's own cluster-launcher loader (`prepare_config` fills the AWS
defaults as `ray up` does, `validate_config` checks ray-schema.json), and sized for the 32B jobs."""

from __future__ import annotations

import copy

import pytest
import yaml
from deploy_checks import REPO

CLUSTER = REPO / "ray_cluster.yaml"


def load() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def prepared(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(config))
    validate_config(config)
    return config


def test_ray_accepts_the_cluster_config():
    config = prepared(load())
    types = config["available_node_types"]
    assert config["head_node_type"] == "head" and types["head"]["resources"] == {"CPU": 0}
    assert sum(t.get("min_workers", 0) for t in types.values()) <= config["max_workers"]


def test_rays_validation_is_not_vacuous():
    import jsonschema

    broken = load()
    broken["available_node_types"]["gpu_train"]["min_worker"] = 0  # typo of min_workers
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        prepared(broken)
    broken = load()
    broken["head_node_type"] = "gpu"
    with pytest.raises(ValueError, match="head_node_type"):
        prepared(broken)


def test_gpu_node_types_fit_qwen3_32b():
    """Serving: one bf16 Qwen3-32B replica (~64 GB) per 80 GB H100; training: 8 H100 on one node."""
    types = load()["available_node_types"]
    for name in ("gpu_serve", "gpu_train"):
        assert types[name]["node_config"]["InstanceType"] == "p5.48xlarge"  # 8 x H100 80GB
        assert types[name]["resources"]["GPU"] == 8
    assert types["gpu_serve"]["min_workers"] >= 1  # serving never scales to zero
    assert types["gpu_train"]["min_workers"] == 0  # training nodes exist only while a job runs


def test_no_secrets_in_the_cluster_config():
    text = CLUSTER.read_text()
    for var in ("TSUBASA_API_KEYS", "TSUBASA_MILVUS__TOKEN", "TSUBASA_KAFKA__SASL_PASSWORD", "HF_TOKEN",
                "AWS_SECRET_ACCESS_KEY"):
        assert f"{var}=" not in text
    assert "--env-file /home/ubuntu/tsubasa.env" in text


def test_train_node_type_fits_the_32b_recipe():
    """services/train/configs/qwen3-32b.yaml asks for its workers and data actors on one node type."""
    recipe = yaml.safe_load((REPO / "services" / "train" / "configs" / "qwen3-32b.yaml").read_text())["job"]
    node = load()["available_node_types"]["gpu_train"]
    assert recipe["accelerator_type"] == "H100" and node["node_config"]["InstanceType"] == "p5.48xlarge"
    assert recipe["num_workers"] * recipe["gpus_per_worker"] <= node["resources"]["GPU"]
    assert recipe["num_workers"] * recipe["cpus_per_worker"] <= node["resources"]["CPU"]
    data = recipe["data"]
    assert data["concurrency"] * data["num_gpus"] <= node["resources"]["GPU"]
    assert data["concurrency"] * data["num_cpus"] <= node["resources"]["CPU"]


def test_serving_reads_the_adapters_training_publishes():
    recipe = yaml.safe_load((REPO / "services" / "train" / "configs" / "qwen3-32b.yaml").read_text())
    options = " ".join(load()["docker"]["run_options"])
    assert f"TSUBASA_ADAPTERS__ROOT={recipe['settings']['adapters']['root']}" in options
    assert f"TSUBASA_MODEL__NAME={recipe['settings']['model']['name']}" in options
