from pathlib import Path

import pytest

from tsubasa.config import ConfigError, load_settings


def test_defaults_are_the_embedded_ones(monkeypatch):
    monkeypatch.delenv("TSUBASA_CONFIG", raising=False)
    s = load_settings()
    assert s.model.name == "qwen2.5-coder-1.5b-instruct" and s.model.engine == "hf"
    assert s.memory.top_k == 3 and s.distill.top_d == 5
    assert s.milvus_uri.endswith("milvus.db")


def test_writer_inherits_the_model_and_writes_with_llamacpp_where_a_gguf_exists(monkeypatch):
    from tsubasa.llm import writer_model

    monkeypatch.delenv("TSUBASA_CONFIG", raising=False)
    s = load_settings()
    w = writer_model(s.model, s.writer)
    assert (w.name, w.engine) == ("qwen2.5-coder-1.5b-instruct", "llamacpp")  # same weights, llama.cpp
    s = load_settings(model={"name": "tiny-qwen3"})  # no GGUF: the writer stays on the model's engine
    assert writer_model(s.model, s.writer).engine == "hf"
    s = load_settings(writer={"engine": "openai", "base_url": "http://127.0.0.1:9/v1", "name": "judge"},
                      model={"name": "tiny-qwen3"})
    w = writer_model(s.model, s.writer)
    assert (w.engine, w.name, w.base_url, w.cache_dir) == ("openai", "judge", "http://127.0.0.1:9/v1",
                                                          s.model.cache_dir)
    with pytest.raises(ConfigError) as exc:
        load_settings(model={"engine": "openai"})
    assert "base_url" in str(exc.value)


def test_env_nested_override(monkeypatch):
    monkeypatch.setenv("TSUBASA_MEMORY__TOP_K", "7")
    monkeypatch.setenv("TSUBASA_MODEL__NAME", "tiny-qwen3")
    s = load_settings()
    assert s.memory.top_k == 7 and s.model.name == "tiny-qwen3"


def test_invalid_value_names_the_field(monkeypatch):
    monkeypatch.setenv("TSUBASA_MEMORY__TOP_K", "0")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "memory.top_k" in str(exc.value)


def test_cross_field_rule(monkeypatch):
    monkeypatch.setenv("TSUBASA_MEMORY__ADD_BELOW_SIMILARITY", "0.99")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "add_below_similarity must be below" in str(exc.value)


def test_yaml_file_and_env_priority(tmp_path: Path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("memory:\n  top_k: 5\nmodel:\n  name: tiny-qwen3\n")
    monkeypatch.setenv("TSUBASA_MODEL__NAME", "from-env/model")
    s = load_settings(f)
    assert s.memory.top_k == 5  # from YAML
    assert s.model.name == "from-env/model"  # env wins over YAML


def test_yaml_errors_are_clear(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("memory:\n  mode: sometimes\n")
    with pytest.raises(ConfigError, match=r"memory\.mode"):
        load_settings(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("memroy:\n  top_k: 3\n")
    with pytest.raises(ConfigError, match="memroy"):
        load_settings(unknown)
