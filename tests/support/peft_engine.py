"""The previous hf-engine adapter path, kept only as a reference for tests and benchmarks: peft LoRA
layers injected into the base model, mixed-adapter batches through peft's `adapter_names` (each
adapter's LoRA run on its own sub-batch). Same tokenisation, batching and generation as HFEngine."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from tsubasa.llm.base import AdapterNotLoadedError
from tsubasa.llm.hf import HFEngine

BASE = "__base__"  # peft's name for "no adapter" in mixed-adapter batches


class PeftEngine(HFEngine):
    def __init__(self, cfg: Any = None) -> None:
        super().__init__(cfg)
        self.peft: Any = None
        self._paths: OrderedDict[str, str] = OrderedDict()

    def load_adapter(self, name: str, path: str) -> None:
        from peft import PeftModel

        with self._lock:
            if name in self._paths:
                self._paths.move_to_end(name)
                return
            while len(self._paths) >= self.cfg.max_loaded_adapters:
                self.unload_adapter(next(iter(self._paths)))
            if self.peft is None:
                self.peft = PeftModel.from_pretrained(self.base_model, path, adapter_name=name)
            else:
                self.peft.load_adapter(path, adapter_name=name)
            self.peft.eval()
            self._paths[name] = path

    def unload_adapter(self, name: str) -> None:
        with self._lock:
            if name in self._paths:
                self.peft.delete_adapter(name)
                del self._paths[name]

    def loaded_adapters(self) -> list[str]:
        return list(self._paths)

    def routed(self, adapters: Sequence[str | None] | None, n: int) -> contextlib.AbstractContextManager:
        if self.peft is None:
            if adapters is not None and any(a is not None for a in adapters):
                raise AdapterNotLoadedError(next(a for a in adapters if a is not None))
            return contextlib.nullcontext()
        names = [BASE] * n if adapters is None else [a or BASE for a in adapters]
        for a in names:
            if a != BASE and a not in self._paths:
                raise AdapterNotLoadedError(a)
        return self.peft.base_model._enable_peft_forward_hooks(adapter_names=names)
