"""The `fsdp` strategy of the Ray Train loop (services/train/loop.py): all workers train each user in
turn, with the peft student sharded by FSDP (FULL_SHARD, `use_orig_params` so the frozen base and the
LoRA weights share units) and the user's examples split across ranks; rank 0 publishes. For models
that do not fit one device (Qwen3-14B/32B)."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

from services.train.loop import Worker, _board_update, _report


def run_fsdp(w: Worker, config: dict[str, Any]) -> None:
    import torch

    from tsubasa.distill.train import (
        LoraStudent,
        UserTrainer,
        enable_gradient_checkpointing,
        final_metrics,
        make_examples,
    )

    settings, cfg, states = w.settings, w.settings.distill, w.states
    rounds = sum(w.epochs - states[k].epoch for k in w.keys if not states[k].done)
    student: LoraStudent | None = None
    wrapped: Any = None
    current: tuple[str, UserTrainer, Any] | None = None
    blobs: dict[str, dict] = {}
    fsdp_cfg = config.get("fsdp", {})
    for rnd in range(rounds):
        key = next((k for k in w.keys if not states[k].done), None)
        metrics: dict[str, Any] = {"round": rnd, "rank": w.rank}
        if key is not None:
            st = states[key]
            if current is None or current[0] != key:
                ds = w.dataset(key)
                if student is None:
                    student = LoraStudent(settings.model, cfg)
                    if (cfg.gradient_checkpointing or config.get("gradient_checkpointing")
                            or fsdp_cfg.get("activation_checkpointing")):
                        enable_gradient_checkpointing(student.model)
                    wrapped = _fsdp_wrap(student, fsdp_cfg)
                examples = make_examples(ds, w.spec, student.tokenizer, settings.model.enable_thinking,
                                         cfg.vanilla_chunk_tokens)
                per = math.ceil(len(examples) / w.world)  # same number of steps on every rank (collectives)
                examples = [examples[(w.rank + i * w.world) % len(examples)] for i in range(per)]
                trainer = _fsdp_trainer(student, wrapped, w.spec, examples, cfg)
                blob = w.saved_trainer(key) if st.epoch > 0 else None
                if blob is not None:
                    _load_trainer(trainer, torch.load(blob, weights_only=False), wrapped)
                    st.resumed_from_epoch = st.epoch
                else:  # no weights saved for that epoch: start the user over
                    st.epoch = 0
                current = (key, trainer, ds)
            _, trainer, ds = current
            st.status, st.worker = "training", w.rank
            m = trainer.run_epoch()
            st.epoch = trainer.epoch
            st.metrics = {k: float(v) for k, v in m.items()}
            metrics.update({f"{key}/loss": m["loss"], f"{key}/epoch": st.epoch})
            blob_state = _trainer_state(trainer, wrapped)
            if st.epoch >= w.epochs:
                owner = w.rank == 0
                with tempfile.TemporaryDirectory(prefix="tsubasa-adapter-") as tmp:
                    _save_adapter(student, wrapped, Path(tmp) if owner else None)  # collective gather
                    if owner:
                        w.publish(st, ds, Path(tmp), final_metrics(trainer.history, len(trainer.examples)),
                                  len(trainer.examples), student.target_modules)
                    else:
                        st.version = -1  # rank 0 holds the real version; this rank only needs "done"
                st.status = "published"
                current = None
                blobs.pop(key, None)
            else:
                blobs[key] = blob_state
            if w.rank == 0:
                _board_update(w.board, st)
        _report(states, w.keys, blobs, w.rank, metrics, write=w.rank == 0)
    if rounds == 0:  # everything was done before this attempt: still leave a final report
        _report(states, w.keys, blobs, w.rank, {"round": -1, "rank": w.rank}, write=w.rank == 0)
    if w.rank == 0:
        for k in w.keys:
            _board_update(w.board, states[k])


def _trainer_state(trainer: Any, wrapped: Any) -> dict[str, Any]:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(wrapped, writeback=False):
        adapter = {k: v.detach().cpu().clone() for k, v in trainer.student.lora_parameters(wrapped).items()}
    # Optimizer moments are sharded per rank; a sharded resume restarts them (weights are kept).
    return {"adapter": adapter, "optimizer": None, "epoch": trainer.epoch, "history": trainer.history}


def _load_trainer(trainer: Any, state: dict[str, Any], wrapped: Any) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(wrapped, writeback=True):
        for key, param in trainer.student.lora_parameters(wrapped).items():
            param.data.copy_(state["adapter"][key])
    trainer.epoch = int(state["epoch"])
    trainer.history = list(state.get("history", []))


def _save_adapter(student: Any, wrapped: Any, out_dir: Path | None) -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(wrapped, writeback=False):
        state = {k: v.detach().cpu().clone() for k, v in student.lora_parameters(wrapped).items()}
    if out_dir is not None:
        student.save_state(out_dir, state)


def _fsdp_wrap(student: Any, fsdp_cfg: dict[str, Any]) -> Any:
    """Shard the peft student with FSDP (use_orig_params: frozen base and LoRA in the same units)."""
    import torch
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import MixedPrecision, ShardingStrategy
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    layer_name = fsdp_cfg.get("auto_wrap_layer", "Qwen3DecoderLayer")
    classes = {type(m) for m in student.model.modules() if type(m).__name__ == layer_name}
    if not classes:
        raise ValueError(f"job.fsdp.auto_wrap_layer {layer_name!r} is not a module of the model")
    mp = None
    if fsdp_cfg.get("mixed_precision") == "bf16":
        mp = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.bfloat16)
    return FSDP(student.model, auto_wrap_policy=ModuleWrapPolicy(classes), use_orig_params=True,
                sharding_strategy=getattr(ShardingStrategy, fsdp_cfg.get("sharding_strategy", "FULL_SHARD")),
                mixed_precision=mp, device_id=student.device)


def _fsdp_trainer(student: Any, wrapped: Any, spec: Any, examples: list, cfg: Any) -> Any:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from tsubasa.distill.train import UserTrainer

    def reset(seed: int) -> None:
        with FSDP.summon_full_params(wrapped, writeback=True):
            student.reset(seed)  # same seed on every rank: identical fresh adapters

    return UserTrainer(student, spec, examples, cfg, seed=cfg.seed, module=wrapped, reset=reset,
                       clip=lambda max_norm: wrapped.clip_grad_norm_(max_norm))
