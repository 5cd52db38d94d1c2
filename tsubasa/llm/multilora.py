"""Multi-LoRA linear layers: one frozen base projection, N stacked LoRA adapters and a per-row
adapter index, so a batch mixing many users' adapters runs in one pass (Punica / S-LoRA's gathered
batched matmul, here with `torch.bmm`).

For a batch row i routed to slot s(i) the layer computes

    y_i = W x_i + scaling[s(i)] * (x_i A[s(i)]) B[s(i)]     A: (N, in, R), B: (N, R, out)

with A and B gathered per row (`index_select`) and two `bmm`s; rows routed to no adapter (slot -1)
skip the LoRA path. Adapters of rank r < R are zero-padded to R (the padding adds exact zeros);
scaling is alpha / r (alpha / sqrt(r) with rsLoRA) per adapter and module. Adapters are read from
and written to ordinary PEFT directories (adapter_config.json + adapter_model.safetensors), so
peft and vLLM load them unchanged. The same layers train: with `trainable=True` the stacks are
parameters and each slot's gradient is that adapter's own (see `tsubasa.distill.batched`).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

PEFT_PREFIX = "base_model.model."
SAFETENSORS = "adapter_model.safetensors"


class AdapterRouting:
    """The slot of every batch row, shared by all MultiLoraLinear layers of one model."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        """(B,) slot per row, None = no row uses an adapter (the plain base model)."""
        self.rows: torch.Tensor | None = None
        """Rows with an adapter, when only some have one (None = every row)."""
        self.row_slots: torch.Tensor | None = None
        self.version = 0
        """Bumped on every change: layers reuse their gathered weights while it stays the same."""

    def set(self, slots: Sequence[int] | None, device: torch.device) -> None:
        self.version += 1
        if slots is None or all(s < 0 for s in slots):
            self.index = self.rows = self.row_slots = None
            return
        idx = torch.tensor(list(slots), dtype=torch.long, device=device)
        self.index = idx
        if all(s >= 0 for s in slots):
            self.rows, self.row_slots = None, idx
        else:
            self.rows = (idx >= 0).nonzero()[:, 0]
            self.row_slots = idx.index_select(0, self.rows)


class MultiLoraLinear(nn.Module):
    """`base` (frozen nn.Linear) plus `slots` stacked LoRA adapters of rank up to `rank`."""

    def __init__(self, base: nn.Linear, routing: AdapterRouting, slots: int, rank: int,
                 dtype: torch.dtype = torch.float32, trainable: bool = False) -> None:
        super().__init__()
        self.base, self.routing = base, routing
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.zeros(slots, base.in_features, rank, dtype=dtype, device=dev),
                                   requires_grad=trainable)
        self.lora_B = nn.Parameter(torch.zeros(slots, rank, base.out_features, dtype=dtype, device=dev),
                                   requires_grad=trainable)
        self.register_buffer("scaling", torch.zeros(slots, dtype=dtype, device=dev), persistent=False)
        self.dropout = 0.0
        self._gathered: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def slots(self) -> int:
        return int(self.lora_A.shape[0])

    @property
    def rank(self) -> int:
        return int(self.lora_A.shape[2])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        route = self.routing
        if route.index is None:
            return y
        xs = x if route.rows is None else x.index_select(0, route.rows)
        a, b, scale = self._gather(route)
        h = xs.reshape(xs.shape[0], -1, xs.shape[-1]).to(a.dtype)  # peft computes LoRA in its weights' dtype
        if self.dropout and self.training:
            h = nn.functional.dropout(h, self.dropout)
        delta = torch.bmm(torch.bmm(h, a), b) * scale
        delta = delta.reshape(*xs.shape[:-1], -1).to(y.dtype)
        return y + delta if route.rows is None else y.index_add(0, route.rows, delta)

    def _gather(self, route: AdapterRouting) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row's A (b, in, R), B (b, R, out) and scaling (b, 1, 1). Frozen weights are gathered
        once per routing (every decoding step of a generate call reuses them); trainable ones every
        call, inside the autograd graph."""
        if self._gathered is not None and self._gathered[0] == route.version and not self.lora_A.requires_grad:
            return self._gathered[1:]
        slots = route.row_slots
        out = (self.lora_A.index_select(0, slots), self.lora_B.index_select(0, slots),
               self.scaling.index_select(0, slots)[:, None, None])
        self._gathered = None if self.lora_A.requires_grad else (route.version, *out)
        return out

    def resize(self, slots: int, rank: int) -> None:
        """Grow to `slots` x rank `rank`, keeping every slot's weights (new entries are zero)."""
        if slots == self.slots and rank == self.rank:
            return
        a = self.lora_A.new_zeros(slots, self.lora_A.shape[1], rank)
        b = self.lora_B.new_zeros(slots, rank, self.lora_B.shape[2])
        n, r = min(slots, self.slots), min(rank, self.rank)
        a[:n, :, :r] = self.lora_A.data[:n, :, :r]
        b[:n, :r] = self.lora_B.data[:n, :r]
        s = self.scaling.new_zeros(slots)
        s[:n] = self.scaling[:n]
        self.lora_A = nn.Parameter(a, requires_grad=self.lora_A.requires_grad)
        self.lora_B = nn.Parameter(b, requires_grad=self.lora_B.requires_grad)
        self.scaling = s


class MultiLoraModel:
    """Puts MultiLoraLinear layers into a transformers model in place (at the target projections)."""

    def __init__(self, model: nn.Module, slots: int, rank: int = 1, target_modules: Sequence[str] = (),
                 dtype: torch.dtype = torch.float32, trainable: bool = False) -> None:
        self.model, self.dtype, self.trainable = model, dtype, trainable
        self.routing = AdapterRouting()
        self.layers: dict[str, MultiLoraLinear] = {}
        self._slots, self._rank = slots, rank
        self.inject(target_modules)

    @property
    def slots(self) -> int:
        return self._slots

    def inject(self, target_modules: Sequence[str]) -> None:
        """Wrap every nn.Linear whose last name part is in `target_modules` (idempotent)."""
        wanted = set(target_modules)
        for name, module in list(self.model.named_modules()):
            leaf = name.rsplit(".", 1)[-1]
            if leaf not in wanted or name in self.layers or isinstance(module, MultiLoraLinear):
                continue
            if not isinstance(module, nn.Linear):
                raise ValueError(f"LoRA target {name} is a {type(module).__name__}, not a Linear")
            layer = MultiLoraLinear(module, self.routing, self._slots, self._rank, self.dtype, self.trainable)
            parent = self.model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else self.model
            setattr(parent, leaf, layer)
            self.layers[name] = layer

    def resize(self, slots: int, rank: int) -> None:
        self._slots, self._rank = max(slots, self._slots), max(rank, self._rank)
        for layer in self.layers.values():
            layer.resize(self._slots, self._rank)

    @property
    def target_modules(self) -> list[str]:
        return sorted({n.rsplit(".", 1)[-1] for n in self.layers})

    @contextlib.contextmanager
    def route(self, slots: Sequence[int] | None) -> Iterator[None]:
        """Route batch row i to adapter slot `slots[i]` (-1 = base model) inside the block."""
        device = next(self.model.parameters()).device
        self.routing.set(slots, device)
        try:
            yield
        finally:
            self.routing.set(None, device)

    def clear(self, slot: int) -> None:
        with torch.no_grad():
            for layer in self.layers.values():
                layer.lora_A[slot].zero_()
                layer.lora_B[slot].zero_()
                layer.scaling[slot] = 0.0

    # ---- PEFT directories ---------------------------------------------------------------------
    def load_peft(self, slot: int, path: str | Path) -> None:
        """Load a PEFT LoRA directory into `slot` (growing targets, rank or slots as needed)."""
        from safetensors.torch import load_file

        cfg = read_lora_config(path)
        tensors = load_file(str(Path(path) / SAFETENSORS))
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            name, kind = _split_key(key)
            pairs.setdefault(name, {})[kind] = value
        leaves = {n.rsplit(".", 1)[-1] for n in pairs}
        self.inject(sorted(leaves))
        missing = sorted(set(pairs) - set(self.layers))
        if missing:
            raise ValueError(f"adapter {path} targets modules the model does not have: {missing[:3]}")
        rank = max(int(p["lora_A"].shape[0]) for p in pairs.values())
        self.resize(max(self._slots, slot + 1, 2 * self._slots if slot >= self._slots else 0), rank)  # amortised
        self.clear(slot)
        with torch.no_grad():
            for name, p in pairs.items():
                layer, r = self.layers[name], int(p["lora_A"].shape[0])
                layer.lora_A[slot, :, :r] = p["lora_A"].t().to(layer.lora_A.dtype)
                layer.lora_B[slot, :r] = p["lora_B"].t().to(layer.lora_B.dtype)
                layer.scaling[slot] = lora_scaling(cfg, name, r)

    def slot_state(self, slot: int) -> dict[str, torch.Tensor]:
        """`slot`'s weights under the keys peft saves (`base_model.model.<module>.lora_A.weight`)."""
        out = {}
        for name, layer in self.layers.items():
            out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[slot].detach().t().contiguous().cpu()
            out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[slot].detach().t().contiguous().cpu()
        return out

    def load_slot_state(self, slot: int, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for key, value in state.items():
                name, kind = _split_key(key)
                layer = self.layers[name]
                getattr(layer, kind)[slot] = value.t().to(layer.lora_A.dtype)


def read_lora_config(path: str | Path) -> dict[str, Any]:
    """adapter_config.json of a plain LoRA (what this layer computes); a clear error otherwise."""
    f = Path(path) / "adapter_config.json"
    if not f.is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory (no adapter_config.json)")
    cfg = json.loads(f.read_text())
    unsupported = {"peft_type": cfg.get("peft_type", "LORA") != "LORA", "use_dora": bool(cfg.get("use_dora")),
                   "lora_bias": bool(cfg.get("lora_bias")), "fan_in_fan_out": bool(cfg.get("fan_in_fan_out")),
                   "modules_to_save": bool(cfg.get("modules_to_save"))}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise ValueError(f"adapter {path}: {', '.join(bad)} not supported by the multi-LoRA layer (plain LoRA only)")
    return cfg


def lora_scaling(cfg: dict[str, Any], module: str, rank: int) -> float:
    """alpha / r as peft computes it (alpha_pattern by module, rsLoRA: alpha / sqrt(r))."""
    from peft.utils.other import get_pattern_key

    pattern = cfg.get("alpha_pattern") or {}
    alpha = pattern.get(get_pattern_key(pattern.keys(), module), cfg.get("lora_alpha", 8)) if pattern else \
        cfg.get("lora_alpha", 8)
    return float(alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)


def _split_key(key: str) -> tuple[str, str]:
    """`base_model.model.<module>.lora_A.weight` -> (`<module>`, `lora_A`)."""
    body = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
    for kind in ("lora_A", "lora_B"):
        if body.endswith(f".{kind}.weight"):
            return body[: -len(f".{kind}.weight")], kind
    raise ValueError(f"unsupported adapter tensor {key!r} (plain LoRA A/B weights only)")
