"""Settings travel to Serve replicas as a payload: a dict of overrides (from a Serve config file /
the Helm chart's `args`, merged with each pod's env) or a full dump of the caller's Settings."""

from __future__ import annotations

from typing import Any

from tsubasa.config import Settings, load_settings


def settings_payload(settings: Settings | dict[str, Any] | None) -> dict[str, Any]:
    """What `build_app` hands to the deployments (secrets stay SecretStr objects, never plain text)."""
    if settings is None:
        return {}
    if isinstance(settings, Settings):
        return {"__full__": True, **settings.model_dump()}
    return dict(settings)


def settings_from_payload(data: dict[str, Any]) -> Settings:
    data = dict(data or {})
    if data.pop("__full__", False):
        return Settings(**data)
    return load_settings(**data)  # partial overrides over env/YAML in this process
