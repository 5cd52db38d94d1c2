"""The plain manifests in k8s/ (kustomize base + overlays for users without Helm): generated from the
chart and up to date, buildable, valid, and carrying the same key fields as the chart."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import yaml
from deploy_checks import (
    K8S,
    all_pod_specs,
    assert_valid,
    container_env,
    distill_rayjobs,
    env_of,
    find,
    kubectl_kustomize,
    kustomize,
    one,
)

OVERLAYS = {"dev-cpu": "tsubasa-dev", "gpu-prod": "tsubasa"}


def _generator():
    spec = importlib.util.spec_from_file_location("k8s_generate", K8S / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_k8s_is_up_to_date_with_the_chart(capsys):
    assert _generator().main(["--check"]) == 0, capsys.readouterr().out


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_builtin_kustomize_matches_kubectl(overlay):
    """The test's kustomize subset gives exactly what `kubectl kustomize` gives (when kubectl exists)."""
    theirs = kubectl_kustomize(K8S / "overlays" / overlay)
    if theirs is None:
        pytest.skip("kubectl not installed: overlays are built by the test's kustomize subset only")
    ours = kustomize(K8S / "overlays" / overlay)

    def index(docs):
        return {(d["kind"], d["metadata"]["name"]): json.dumps(d, sort_keys=True) for d in docs}

    assert index(ours) == index(theirs)


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_objects_are_valid(overlay):
    docs = kustomize(K8S / "overlays" / overlay)
    assert_valid(docs)
    assert_valid(distill_rayjobs(docs))
    assert {d["metadata"]["namespace"] for d in docs} == {OVERLAYS[overlay]}
    binding = one(docs, "RoleBinding")
    assert binding["subjects"][0]["namespace"] == OVERLAYS[overlay]
    assert not find(docs, "Secret")


def test_base_alone_is_valid():
    assert_valid(kustomize(K8S / "base"))


def test_gpu_prod_overlay():
    docs = kustomize(K8S / "overlays" / "gpu-prod")
    rc = one(docs, "RayService", "tsubasa")["spec"]["rayClusterConfig"]
    gpu = {g["groupName"]: g for g in rc["workerGroupSpecs"]}["gpu"]
    assert (gpu["minReplicas"], gpu["replicas"], gpu["maxReplicas"]) == (2, 2, 8)
    res = gpu["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] >= 1
    assert gpu["template"]["spec"]["containers"][0]["image"].endswith("-gpu")
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    job = distill_rayjobs(docs)[0]  # one per API-key tenant
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8
    topics = {t["spec"]["topicName"]: t["spec"]["replicas"] for t in find(docs, "KafkaTopic")}
    assert topics == {"tsubasa.events": 3, "tsubasa.events.dlq": 3}


def test_dev_cpu_overlay():
    docs = kustomize(K8S / "overlays" / "dev-cpu")
    assert "nvidia.com/gpu" not in json.dumps(docs)
    assert "nvidia.com/gpu" not in json.dumps(distill_rayjobs(docs))
    assert one(docs, "Deployment", "tsubasa-milvus-lite")["spec"]["replicas"] == 1
    assert one(docs, "PersistentVolumeClaim", "tsubasa-adapters")["spec"]["accessModes"] == ["ReadWriteOnce"]
    topics = {t["spec"]["topicName"]: t["spec"]["replicas"] for t in find(docs, "KafkaTopic")}
    assert topics == {"tsubasa.events": 1, "tsubasa.events.dlq": 1}
    assert one(docs, "RayService")["spec"]["rayClusterConfig"]["workerGroupSpecs"] == []


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_config_loads_with_tsubasa_settings(overlay, tmp_path, monkeypatch):
    from tsubasa.config import load_settings

    for var in [v for v in os.environ if v.startswith(("TSUBASA_", "AWS_", "HF_"))]:
        monkeypatch.delenv(var)
    docs = kustomize(K8S / "overlays" / overlay)
    path = tmp_path / "config.yaml"
    path.write_text(one(docs, "ConfigMap", "tsubasa-config")["data"]["config.yaml"])
    ingest = one(docs, "Deployment", "tsubasa-ingest")["spec"]["template"]["spec"]["containers"][0]
    for name, value in container_env(ingest).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("TSUBASA_CONFIG", str(path))
    settings = load_settings()
    assert (settings.kafka.topic, settings.kafka.dead_letter_topic) == ("tsubasa.events", "tsubasa.events.dlq")
    assert settings.kafka.bootstrap_servers == "kafka-kafka-bootstrap.kafka.svc:9092"
    if overlay == "dev-cpu":
        assert settings.model.engine == "hf" and settings.milvus.uri == "http://tsubasa-milvus-lite:19530"
        assert settings.adapters.root == "/adapters"
    else:
        assert settings.model.engine == "vllm" and settings.adapters.root.startswith("s3://")
    assert yaml.safe_load(path.read_text())["serve"]["port"] == 8000


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_secret_references(overlay):
    docs = kustomize(K8S / "overlays" / overlay)
    for where, pod in all_pod_specs(docs) + all_pod_specs(distill_rayjobs(docs)):
        for c in pod["containers"]:
            if c["name"] in ("launcher", "milvus-lite"):
                continue
            ref = env_of(c)["TSUBASA_API_KEYS"]["valueFrom"]["secretKeyRef"]
            assert ref == {"name": "tsubasa-api-keys", "key": "api-keys"}, where
            for e in c["env"]:
                if any(w in e["name"] for w in ("KEY", "TOKEN", "PASSWORD", "SECRET")):
                    assert "value" not in e, f"{where}: {e['name']} has a literal value"
