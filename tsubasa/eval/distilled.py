"""Evaluation systems of the reading wing, registered into the harness (`tsubasa.eval.systems`
imports this plugin module before a lookup):

| system | adapter | grounding |
| --- | --- | --- |
| `tsubasa` | the user's current adapter (serving registry) | top-k memories |
| `tsubasa-no-grounding` | adapter trained without grounding | none |
| `vanilla-ft` | LM fine-tuning on the raw conversation | top-k memories |
| `tsubasa-d1`, `-d3`, `-d5`, `-d10`, `-d20` | top-d KL with that d | top-k memories |

Every system answers with the harness's own memory prompt (identical to the prompt the adapters
were trained on). A user without the needed adapter is an error naming the `tsubasa distill`
command that builds it, never a silent fall-back to the base model.
"""

from __future__ import annotations

from typing import Any

from tsubasa.config import Settings, load_settings
from tsubasa.distill.adapters import AdapterRegistry
from tsubasa.distill.pipeline import registry_for
from tsubasa.distill.train import TrainSpec, Variant
from tsubasa.eval.systems import RetrievalSystem, SystemContext, register_system

D_ABLATION = (1, 3, 5, 10, 20)


class MissingAdapterError(LookupError):
    pass


class AdapterResolver:
    """(tenant, user) -> the name of the user's adapter, loaded into the engine on first use."""

    def __init__(self, engine: Any, registry: AdapterRegistry, spec: TrainSpec, serving: bool) -> None:
        self.engine, self.registry, self.spec, self.serving = engine, registry, spec, serving

    def __call__(self, tenant_id: str, user_id: str) -> str:
        v = self.registry.current(tenant_id, user_id)
        if v is None:
            flags = "" if self.serving else f" --variant {self.spec.variant} --d {self.spec.d}"
            raise MissingAdapterError(f"no {self.spec.tag} adapter for {tenant_id}/{user_id} in {self.registry.root}: "
                                      f"run `tsubasa distill --tenant {tenant_id} --user {user_id}{flags}`")
        name = v.name if self.serving else f"{self.spec.tag}:{v.name}"
        if name not in self.engine.loaded_adapters():
            self.engine.load_adapter(name, self.registry.local_path(v))
        return name


def _settings(ctx: SystemContext) -> Settings:
    s = ctx.options.get("settings")
    return s if isinstance(s, Settings) else load_settings()


def adapter_system(ctx: SystemContext, name: str, variant: Variant, d: int | None = None,
                   grounded: bool = True) -> RetrievalSystem:
    settings = _settings(ctx)
    spec = TrainSpec.from_config(settings.distill, variant, d)
    registry = registry_for(settings, spec)
    serving = spec == TrainSpec.from_config(settings.distill)
    resolver = AdapterResolver(ctx.engine, registry, spec, serving)
    return RetrievalSystem(ctx, name, "memories", k=ctx.k if grounded else 0, adapter=resolver)


register_system("tsubasa", lambda ctx: adapter_system(ctx, "tsubasa", "tsubasa"),
                description="TSUBASA: per-user adapter (top-d KL) + top-k evolving memories")
register_system("tsubasa-no-grounding", lambda ctx: adapter_system(ctx, "tsubasa-no-grounding", "no_grounding",
                                                                   grounded=False),
                uses_k=False, description="adapter trained and asked without grounding")
register_system("vanilla-ft", lambda ctx: adapter_system(ctx, "vanilla-ft", "vanilla"),
                description="LoRA LM fine-tuning on the raw conversation + top-k memories")
for _d in D_ABLATION:
    register_system(f"tsubasa-d{_d}", lambda ctx, d=_d: adapter_system(ctx, f"tsubasa-d{d}", "tsubasa", d),
                    description=f"TSUBASA with top-{_d} teacher targets" + (" (= cross-entropy)" if _d == 1 else ""))
