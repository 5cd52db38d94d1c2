"""The Serve application: gateway ingress -> LLM deployment, built from one Settings.

    serve run services.serve.app:build_app                      # env / TSUBASA_CONFIG settings
    # RayService (Helm chart) serveConfigV2:
    #   applications:
    #   - name: tsubasa
    #     import_path: services.serve.app:build_app
    #     args: {model: {name: Qwen/Qwen3-8B, engine: vllm}, serve: {autoscaling: true, max_replicas: 8}}

`args` are overrides over each pod's env (`TSUBASA_*`, secrets included) and YAML config.
"""

from __future__ import annotations

from typing import Any

from services.serve.settings import settings_from_payload, settings_payload
from tsubasa.config import Settings


def llm_deployment_options(settings: Settings) -> dict[str, Any]:
    """Serve options of the LLM deployment: replicas or autoscaling, queue bounds, resources."""
    sc = settings.serve
    gpu = settings.model.engine == "vllm" and settings.model.device != "cpu"
    opts: dict[str, Any] = {
        "name": "llm",
        "max_ongoing_requests": sc.llm_max_ongoing_requests,
        "max_queued_requests": sc.llm_max_queued_requests,
        "ray_actor_options": {"num_cpus": sc.llm_num_cpus, "num_gpus": 1 if gpu else 0},
        "health_check_period_s": 10,
        "graceful_shutdown_timeout_s": sc.request_timeout_s,
    }
    if sc.autoscaling:
        opts["autoscaling_config"] = {
            "min_replicas": sc.min_replicas, "initial_replicas": sc.llm_replicas, "max_replicas": sc.max_replicas,
            "target_ongoing_requests": sc.target_ongoing_requests,
            "upscale_delay_s": 10, "downscale_delay_s": 120,
        }
    else:
        opts["num_replicas"] = sc.llm_replicas
    return opts


def gateway_deployment_options(settings: Settings) -> dict[str, Any]:
    sc = settings.serve
    return {
        "name": "gateway",
        "num_replicas": sc.gateway_replicas,
        # The replica admits running + queued chat requests itself and answers 429 past them (with
        # Retry-After); refusals are cheap, so Serve's own bound sits well above and its 503 is
        # the last resort.
        "max_ongoing_requests": 2 * (sc.max_ongoing_requests + sc.max_queued_requests) + 16,
        # Serve counts a burst's requests as queued while it picks a replica for them, so this
        # bound is for the proxy's assignment queue, kept wide enough for bursts.
        "max_queued_requests": 4 * sc.max_queued_requests + 64,
        "ray_actor_options": {"num_cpus": 0.25},
        "health_check_period_s": 10,
        "graceful_shutdown_timeout_s": sc.request_timeout_s,
    }


def build_app(config: dict[str, Any] | Settings | None = None):
    """The Serve application for `config` (overrides dict, full Settings, or None = env/YAML)."""
    from ray import serve

    from services.serve.gateway import Gateway
    from services.serve.llm import LLMServer

    payload = settings_payload(config)
    settings = settings_from_payload(payload)
    llm = serve.deployment(LLMServer).options(**llm_deployment_options(settings)).bind(payload)
    return serve.deployment(Gateway).options(**gateway_deployment_options(settings)).bind(llm, payload)
