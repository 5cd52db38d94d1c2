"""Typed settings: one object composed of small sections, loaded from env (prefix ``TSUBASA_``,
nested with ``__``) and an optional YAML file, validated at start with messages naming the field.

    TSUBASA_MODEL__NAME=tiny-qwen3 TSUBASA_MEMORY__TOP_K=5 tsubasa ...
    TSUBASA_CONFIG=prod.yaml tsubasa ...
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from tsubasa.config.sections import (
    AdapterConfig,
    DistillConfig,
    EmbedderConfig,
    EngineName,
    EvalConfig,
    MemoryConfig,
    MilvusConfig,
    ModelConfig,
    WriterConfig,
    _default_data_dir,
)
from tsubasa.config.services import KafkaConfig, ServeConfig

__all__ = ["AdapterConfig", "ConfigError", "DistillConfig", "EmbedderConfig", "EngineName", "EvalConfig",
           "KafkaConfig", "MemoryConfig", "MilvusConfig", "ModelConfig", "ServeConfig", "Settings", "WriterConfig",
           "format_validation_error", "load_settings"]


class _YamlSource(PydanticBaseSettingsSource):
    """Values from the YAML file named by TSUBASA_CONFIG (lower priority than env)."""

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        super().__init__(settings_cls)
        self.path = path

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        if not self.path:
            return {}
        if not self.path.is_file():
            raise ConfigError(f"config file {self.path} does not exist")
        data = yaml.safe_load(self.path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"config file {self.path}: top level must be a mapping of sections")
        return data


class ConfigError(ValueError):
    """Invalid configuration; the message names the field."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TSUBASA_", env_nested_delimiter="__", extra="forbid")

    data_dir: Path = Field(default_factory=_default_data_dir)
    model: ModelConfig = Field(default_factory=ModelConfig)
    writer: WriterConfig = Field(default_factory=WriterConfig)
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    milvus: MilvusConfig = Field(default_factory=MilvusConfig)
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    adapters: AdapterConfig = Field(default_factory=AdapterConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    kafka: KafkaConfig = Field(default_factory=KafkaConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):  # type: ignore[override]
        path = os.environ.get("TSUBASA_CONFIG")
        return (init_settings, env_settings, _YamlSource(settings_cls, Path(path) if path else None),
                file_secret_settings)

    @property
    def milvus_uri(self) -> str:
        return self.milvus.uri or str(self.data_dir / "milvus.db")

    @property
    def adapter_root(self) -> str:
        return self.adapters.root or str(self.data_dir / "adapters")

    @property
    def distill_dir(self) -> str:
        return self.distill.work_dir or str(self.data_dir / "distill")


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Load settings from env + optional YAML (+ keyword overrides); raise ConfigError naming the field."""
    old = os.environ.get("TSUBASA_CONFIG")
    try:
        if config_file is not None:
            os.environ["TSUBASA_CONFIG"] = str(config_file)
        return Settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc)) from None
    finally:
        if config_file is not None:
            if old is None:
                os.environ.pop("TSUBASA_CONFIG", None)
            else:
                os.environ["TSUBASA_CONFIG"] = old


def format_validation_error(exc: ValidationError) -> str:
    """One line per problem: `memory.top_k: Input should be greater than or equal to 1 (got 0)`."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(root)"
        got = err.get("input")
        shown = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"{loc}: {err['msg']}{shown}")
    return "invalid configuration:\n  " + "\n  ".join(lines)
