"""The Ray Train worker loop: train LoRA adapters for a batch of users, with checkpoints and resume.

Work is cut into rounds; in each round every worker trains one epoch (of its current user), then all
workers report together (`ray.train.report` is a barrier), each adding its users' state to the
round's checkpoint (Ray merges the workers' files into one directory):

    users/<tenant>/<user>/state.json    epoch reached, published version, metrics
    users/<tenant>/<user>/trainer.pt    adapter weights + optimizer (users still in training)

Strategies:
- `batched` (services/train/batched.py): worker r owns users[r::world] and trains up to
  `job.users_per_batch` of them together, one adapter slot each, in one forward and backward per
  step (models that fit a device); users join as slots free up and leave when their last epoch ends.
- `fsdp` (services/train/fsdp.py): all workers train each user in turn, with the student sharded by
  FSDP and the user's examples split across ranks (the 32B path); rank 0 publishes.

After a worker failure Ray restarts the group (`FailureConfig.max_failures`) and this function starts
again with `ray.train.get_checkpoint()`: finished users are skipped, users in training resume from
the epoch they reached. A user's adapter is published once its last epoch ends; the manifest carries
the job id, so a replay after a crash between publishing and checkpointing does not publish twice.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import dataclass
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


@dataclass
class Worker:
    """What one Ray Train worker knows about its run (built by `train_loop_per_worker`)."""

    settings: Any
    spec: Any
    job_id: str
    board: Any
    keys: list[str]
    datasets: dict[str, Any]
    rank: int
    world: int
    states: dict[str, UserState]
    restored: Path | None
    registry: Any

    @property
    def epochs(self) -> int:
        return self.settings.distill.epochs

    def dataset(self, key: str) -> Any:
        import ray

        from tsubasa.distill.teacher import UserDataset

        obj = self.datasets[key]
        return UserDataset.model_validate_json(ray.get(obj) if isinstance(obj, ray.ObjectRef) else obj)

    def saved_trainer(self, key: str) -> Path | None:
        """The user's trainer.pt in the restored checkpoint, if it has one."""
        if self.restored is None:
            return None
        blob = self.restored / "users" / key / "trainer.pt"
        return blob if blob.is_file() else None

    def publish(self, st: UserState, ds: Any, adapter_dir: Path, metrics: dict[str, float], n_examples: int,
                target_modules: list[str]) -> None:
        """Publish the user's adapter once per run (a replay finds the version it published before)."""
        from tsubasa.distill.pipeline import make_manifest

        st.metrics = {**metrics, "resumed_from_epoch": float(st.resumed_from_epoch)}
        v = _published_by_job(self.registry, st, self.job_id)
        if v is None:
            manifest = make_manifest(ds, self.spec, self.settings.distill, target_modules, st.metrics, n_examples,
                                     job_id=self.job_id, resumed_from_epoch=str(st.resumed_from_epoch))
            v = self.registry.publish(st.tenant_id, st.user_id, str(adapter_dir), manifest)
        st.version, st.adapter = v.version, v.name


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point (see the module docstring). `config` is built by `services.train.job`."""
    import ray.train
    import torch

    from tsubasa.distill.pipeline import registry_for
    from tsubasa.distill.train import TrainSpec

    settings = config["settings"]
    spec = TrainSpec.model_validate(config["spec"])
    users = [tuple(u) for u in config["users"]]
    ctx = ray.train.get_context()
    torch.manual_seed(settings.distill.seed)
    states, restored = _restore(ray.train.get_checkpoint(), users, settings.distill.epochs)
    w = Worker(settings=settings, spec=spec, job_id=config["job_id"], board=config.get("board"),
               keys=[f"{t}/{u}" for t, u in users], datasets=config["datasets"], rank=ctx.get_world_rank(),
               world=ctx.get_world_size(), states=states, restored=restored, registry=registry_for(settings, spec))
    if config["strategy"] == "fsdp":
        from services.train.fsdp import run_fsdp

        run_fsdp(w, config)
    else:
        from services.train.batched import run_batched

        run_batched(w, config)
