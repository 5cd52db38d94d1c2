"""AdapterRegistry on a local root and on an fsspec (memory://) root."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from tsubasa.distill.adapters import (
    AdapterManifest,
    AdapterNotFoundError,
    AdapterRegistry,
    parse_adapter_name,
)
from tsubasa.schema import InvalidIdentifierError


def _src(tmp_path: Path, tag: str) -> Path:
    d = tmp_path / f"src-{tag}"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"tag": tag}))
    (d / "adapter_model.safetensors").write_bytes(tag.encode() * 10)
    return d


def _manifest(**kw) -> AdapterManifest:
    base = dict(base_model="tiny-qwen3", rank=4, alpha=8, d=5, loss="topd_kl", data_hash="abc", n_examples=3)
    return AdapterManifest(**{**base, **kw})


@pytest.fixture(params=["local", "memory"])
def registry(request, tmp_path) -> AdapterRegistry:
    if request.param == "local":
        return AdapterRegistry(str(tmp_path / "adapters"), keep_versions=2, cache_dir=str(tmp_path / "cache"))
    return AdapterRegistry(f"memory://reg-{uuid.uuid4().hex}/adapters", keep_versions=2,
                           cache_dir=str(tmp_path / "cache"))


def test_publish_versions_pointer_and_prune(registry, tmp_path):
    assert registry.current("acme", "alice") is None
    v1 = registry.publish("acme", "alice", _src(tmp_path, "one"), _manifest(metrics={"loss": 1.0}))
    assert v1.version == 1 and v1.name == "acme/alice/v0001"
    assert registry.current("acme", "alice").version == 1
    seen = {}

    def check_before_flip(v):  # v0002 is complete, but serving still gets v0001
        seen["current"] = registry.current("acme", "alice").version
        seen["v1_file"] = (Path(registry.local_path(registry.get("acme", "alice", 1))) /
                           "adapter_config.json").read_text()

    v2 = registry.publish("acme", "alice", _src(tmp_path, "two"), _manifest(), before_flip=check_before_flip)
    assert seen == {"current": 1, "v1_file": json.dumps({"tag": "one"})}
    assert registry.current("acme", "alice").version == v2.version == 2
    registry.publish("acme", "alice", _src(tmp_path, "three"), _manifest())
    assert [v.version for v in registry.list("acme", "alice")] == [2, 3]  # pruned to the last 2
    with pytest.raises(AdapterNotFoundError):
        registry.get("acme", "alice", 1)
    local = Path(registry.local_path(registry.current("acme", "alice")))
    assert json.loads((local / "adapter_config.json").read_text()) == {"tag": "three"}
    assert json.loads((local / "manifest.json").read_text())["base_model"] == "tiny-qwen3"
    assert registry.get_by_name("acme/alice/v0003").manifest.metrics == {}


def test_list_tenant_isolation_and_delete(registry, tmp_path):
    registry.publish("acme", "alice", _src(tmp_path, "a"), _manifest())
    registry.publish("acme", "bob", _src(tmp_path, "b"), _manifest())
    registry.publish("other", "alice", _src(tmp_path, "c"), _manifest())
    assert [v.name for v in registry.list("acme")] == ["acme/alice/v0001", "acme/bob/v0001"]
    assert [v.name for v in registry.list("other")] == ["other/alice/v0001"]
    assert registry.delete_user("acme", "alice") == 1
    assert registry.delete_user("acme", "alice") == 0  # idempotent
    assert registry.current("acme", "alice") is None
    assert registry.current("other", "alice").version == 1


def test_crash_before_flip_keeps_previous(registry, tmp_path):
    registry.publish("acme", "alice", _src(tmp_path, "one"), _manifest())

    def crash(_v):
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        registry.publish("acme", "alice", _src(tmp_path, "two"), _manifest(), before_flip=crash)
    assert registry.current("acme", "alice").version == 1
    nxt = registry.publish("acme", "alice", _src(tmp_path, "three"), _manifest())
    assert nxt.version == 3 and registry.current("acme", "alice").version == 3


def test_bad_identifiers_and_names(registry, tmp_path):
    with pytest.raises(InvalidIdentifierError, match="tenant_id"):
        registry.publish("../etc", "alice", _src(tmp_path, "x"), _manifest())
    with pytest.raises(InvalidIdentifierError, match="user_id"):
        registry.current("acme", "a/b")
    with pytest.raises(ValueError, match="tenant>/<user>/vNNNN"):
        parse_adapter_name("acme/alice")
    assert parse_adapter_name("acme/alice/v0012") == ("acme", "alice", 12)
    with pytest.raises(ValueError, match="src_dir"):
        registry.publish("acme", "alice", tmp_path / "missing", _manifest())
