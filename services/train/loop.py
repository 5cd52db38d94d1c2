"""The Ray Train worker loop: train LoRA adapters for a batch of users, with checkpoints and resume.

Work is cut into rounds; in each round every worker trains one epoch (of its current user), then all
workers report together (`ray.train.report` is a barrier), each adding its users' state to the
round's checkpoint (Ray merges the workers' files into one directory):

    users/<tenant>/<user>/state.json    epoch reached, published version, metrics
    users/<tenant>/<user>/trainer.pt    adapter weights + optimizer (users still in training)

Strategies:
- `users`: worker r owns users[r::world] and trains them one after another (models that fit a
  device; throughput scales with the worker count).
- `fsdp`: all workers train each user in turn, with the student sharded by FSDP and the user's
  examples split across ranks (the 32B path); rank 0 publishes.

After a worker failure Ray restarts the group (`FailureConfig.max_failures`) and this function starts
again with `ray.train.get_checkpoint()`: finished users are skipped, users in training resume from
the epoch they reached. A user's adapter is published once its last epoch ends; the manifest carries
the job id, so a replay after a crash between publishing and checkpointing does not publish twice.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

log = logging.getLogger(__name__)


class UserState(BaseModel):
    tenant_id: str
    user_id: str
    epoch: int = 0
    epochs: int = 1
    version: int | None = None
    adapter: str | None = None
    metrics: dict[str, float] = Field(default_factory=dict)
    resumed_from_epoch: int = 0
    worker: int = -1
    status: str = "pending"
    """pending | training | published"""

    @property
    def key(self) -> str:
        return f"{self.tenant_id}/{self.user_id}"

    @property
    def done(self) -> bool:
        return self.version is not None


def _restore(checkpoint: Any, users: list[tuple[str, str]], epochs: int) -> tuple[dict[str, UserState], Path | None]:
    states = {f"{t}/{u}": UserState(tenant_id=t, user_id=u, epochs=epochs) for t, u in users}
    if checkpoint is None:
        return states, None
    root = Path(checkpoint.to_directory())
    for f in root.glob("users/*/*/state.json"):
        st = UserState.model_validate_json(f.read_text())
        if st.key in states:
            states[st.key] = st
    return states, root


def _report(states: dict[str, UserState], mine: list[str], trainer_blobs: dict[str, dict], rank: int,
            metrics: dict[str, Any], write: bool = True) -> None:
    import ray.train
    import torch

    with tempfile.TemporaryDirectory(prefix="tsubasa-ckpt-") as tmp:
        ckpt = None
        if write:
            root = Path(tmp)
            for key in mine:
                d = root / "users" / key
                d.mkdir(parents=True, exist_ok=True)
                (d / "state.json").write_text(states[key].model_dump_json())
                if key in trainer_blobs and not states[key].done:
                    torch.save(trainer_blobs[key], d / "trainer.pt")
            (root / "ranks").mkdir(exist_ok=True)
            (root / "ranks" / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "t": time.time()}))
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=ckpt)


def _board_update(board: Any, st: UserState) -> None:
    if board is not None:
        board.update.remote(st.key, st.model_dump())


def _published_by_job(registry: Any, st: UserState, job_id: str) -> Any:
    cur = registry.current(st.tenant_id, st.user_id)
    if cur is not None and cur.manifest.extra.get("job_id") == job_id:
        return cur
    return None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (see the module docstring). `config` is built by `services.train.job`."""
    import ray
    import ray.train
    import torch

    from tsubasa.distill.pipeline import make_manifest, registry_for
    from tsubasa.distill.teacher import UserDataset
    from tsubasa.distill.train import LoraStudent, TrainSpec, UserTrainer, final_metrics, make_examples

    settings = config["settings"]
    cfg = settings.distill
    spec = TrainSpec.model_validate(config["spec"])
    strategy: str = config["strategy"]
    job_id: str = config["job_id"]
    board = config.get("board")
    users = [tuple(u) for u in config["users"]]
    datasets: dict[str, Any] = config["datasets"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(cfg.seed)
    epochs = cfg.epochs
    states, restored = _restore(ray.train.get_checkpoint(), users, epochs)
    keys = [f"{t}/{u}" for t, u in users]
    sharded = strategy == "fsdp"
    owner = {k: (0 if sharded else i % world) for i, k in enumerate(keys)}
    mine = [k for k in keys if owner[k] == rank] if not sharded else keys

    def remaining(r: int) -> int:
        return sum(epochs - states[k].epoch for k in keys if (sharded or owner[k] == r) and not states[k].done)

    rounds = remaining(0) if sharded else max(remaining(r) for r in range(world))
    registry = registry_for(settings, spec)
    student: LoraStudent | None = None
    wrapped: Any = None
    current: tuple[str, UserTrainer, UserDataset] | None = None
    blobs: dict[str, dict] = {}
    log.info("rank %d/%d: %d users, %d rounds (restored=%s)", rank, world, len(mine), rounds, restored is not None)

    for rnd in range(rounds):
        key = next((k for k in mine if not states[k].done), None)
        metrics: dict[str, Any] = {"round": rnd, "rank": rank}
        if key is not None:
            st = states[key]
            if current is None or current[0] != key:
                ds_obj = datasets[key]
                ds = UserDataset.model_validate_json(ray.get(ds_obj) if isinstance(ds_obj, ray.ObjectRef) else ds_obj)
                if student is None:
                    student = LoraStudent(settings.model, cfg)
                    fsdp_ckpt = sharded and config.get("fsdp", {}).get("activation_checkpointing")
                    if config.get("gradient_checkpointing") or fsdp_ckpt:
                        _enable_gradient_checkpointing(student)
                    if sharded:
                        wrapped = _fsdp_wrap(student, config.get("fsdp", {}))
                examples = make_examples(ds, spec, student.tokenizer, settings.model.enable_thinking,
                                         cfg.vanilla_chunk_tokens)
                if sharded:  # same number of steps on every rank (collectives per step)
                    per = math.ceil(len(examples) / world)
                    examples = [examples[(rank + i * world) % len(examples)] for i in range(per)]
                trainer = (_fsdp_trainer(student, wrapped, spec, examples, cfg) if sharded
                           else UserTrainer(student, spec, examples, cfg, seed=cfg.seed))
                if st.epoch > 0 and restored is not None:
                    blob = restored / "users" / key / "trainer.pt"
                    if blob.is_file():
                        _load_trainer(trainer, torch.load(blob, weights_only=False), wrapped, rank)
                        st.resumed_from_epoch = st.epoch
                    else:  # no weights saved for that epoch: start the user over
                        st.epoch = 0
                current = (key, trainer, ds)
            _, trainer, ds = current
            st.status, st.worker = "training", rank
            m = trainer.run_epoch()
            st.epoch = trainer.epoch
            st.metrics = {k: float(v) for k, v in m.items()}
            metrics.update({f"{key}/loss": m["loss"], f"{key}/epoch": st.epoch})
            blob = _trainer_state(trainer, wrapped)
            if st.epoch >= epochs:
                is_owner = rank == owner[key]
                with tempfile.TemporaryDirectory(prefix="tsubasa-adapter-") as tmp:
                    # Under FSDP the gather is collective: every rank joins, the owner writes.
                    _save_adapter(student, wrapped, Path(tmp) if is_owner else None)
                    if is_owner:
                        st.metrics = {**final_metrics(trainer), "resumed_from_epoch": float(st.resumed_from_epoch)}
                        v = _published_by_job(registry, st, job_id)
                        if v is None:
                            manifest = make_manifest(ds, spec, cfg, student.target_modules, st.metrics,
                                                     len(trainer.examples), job_id=job_id,
                                                     resumed_from_epoch=str(st.resumed_from_epoch))
                            v = registry.publish(st.tenant_id, st.user_id, tmp, manifest)
                        st.version, st.adapter = v.version, v.name
                    else:
                        st.version = -1  # rank 0 holds the real version; this rank only needs "done"
                st.status = "published"
                current = None
                blobs.pop(key, None)
            elif rank == owner[key] or sharded:
                blobs[key] = blob
            if rank == owner[key]:
                _board_update(board, st)
        _report(states, mine if not sharded else keys, blobs, rank, metrics, write=(not sharded or rank == 0))
    if rounds == 0:  # everything was done before this attempt: still leave a final report
        _report(states, mine if not sharded else keys, blobs, rank, {"round": -1, "rank": rank},
                write=(not sharded or rank == 0))
    for k in mine:
        if rank == owner[k]:
            _board_update(board, states[k])


# ---- plain and sharded helpers ----------------------------------------------------------------
def _trainer_state(trainer: Any, wrapped: Any) -> dict[str, Any]:
    if wrapped is None:
        return trainer.state_dict()
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(wrapped, writeback=False):
        adapter = {k: v.detach().cpu().clone() for k, v in trainer.student.lora_parameters(wrapped).items()}
    # Optimizer moments are sharded per rank; a sharded resume restarts them (weights are kept).
    return {"adapter": adapter, "optimizer": None, "epoch": trainer.epoch, "history": trainer.history}


def _load_trainer(trainer: Any, state: dict[str, Any], wrapped: Any, rank: int) -> None:
    if wrapped is None:
        trainer.load_state_dict(state)
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    with FSDP.summon_full_params(wrapped, writeback=True):
        for key, param in trainer.student.lora_parameters(wrapped).items():
            param.data.copy_(state["adapter"][key])
    trainer.epoch = int(state["epoch"])
    trainer.history = list(state.get("history", []))


def _save_adapter(student: Any, wrapped: Any, out_dir: Path | None) -> None:
    if wrapped is None:
        if out_dir is not None:
            student.save(out_dir)
        return
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
    wrapped = FSDP(student.model, auto_wrap_policy=ModuleWrapPolicy(classes), use_orig_params=True,
                   sharding_strategy=getattr(ShardingStrategy, fsdp_cfg.get("sharding_strategy", "FULL_SHARD")),
                   mixed_precision=mp, device_id=student.device)
    return wrapped


def _enable_gradient_checkpointing(student: Any) -> None:
    """Recompute activations in backward (before any FSDP wrapping); LoRA needs input grads for it."""
    student.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    student.model.enable_input_require_grads()


def _fsdp_trainer(student: Any, wrapped: Any, spec: Any, examples: list, cfg: Any) -> Any:
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from tsubasa.distill.train import UserTrainer

    def reset(seed: int) -> None:
        with FSDP.summon_full_params(wrapped, writeback=True):
            student.reset(seed)  # same seed on every rank: identical fresh adapters

    return UserTrainer(student, spec, examples, cfg, seed=cfg.seed, module=wrapped, reset=reset,
                       clip=lambda max_norm: wrapped.clip_grad_norm_(max_norm))
