"""Driver of a batched distillation job: snapshot users from Milvus -> Ray Data (QA + teacher
targets) -> Ray Train (one TorchTrainer for the batch of users) -> adapters published per user.

    python -m services.train.job --config services/train/configs/local.yaml --tenant acme [--user alice]

The run name is derived from the users, the training spec and their data, so re-running a job that
was killed resumes it from its last checkpoint; a finished run's directory is moved aside under
`<storage>/finished/`, so the next run of the same users trains (and publishes) new versions.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from services.train.config import TrainJobConfig, build_trainer
from tsubasa.config import Settings
from tsubasa.distill.pipeline import UserResult, teacher_d
from tsubasa.distill.synth import UserCorpus
from tsubasa.distill.train import TrainSpec
from tsubasa.schema import stable_id, validate_identifier

log = logging.getLogger(__name__)


class JobFailedError(RuntimeError):
    """The training run failed after its retries (the message says why; checkpoints are kept)."""


class JobResult(BaseModel):
    name: str
    storage_path: str
    users: list[UserResult] = Field(default_factory=list)
    errors: dict[str, str] = Field(default_factory=dict)
    """Users left out before training (e.g. no QA survived synthesis), with the reason."""
    seconds: float = 0.0
    workers: dict[str, dict[str, float]] = Field(default_factory=dict)
    """Per worker (`_worker/<rank>`), where its time went: setup_s, train_s, publish_s, checkpoint_s."""


def _progress_board():
    import ray

    @ray.remote(num_cpus=0)
    class ProgressBoard:
        """Per-user training state, pushed by the workers and polled by the driver."""

        def __init__(self) -> None:
            self.states: dict[str, dict] = {}

        def update(self, key: str, state: dict) -> None:
            self.states[key] = state

        def snapshot(self) -> dict[str, dict]:
            return dict(self.states)

    return ProgressBoard.remote()


def absolutise(settings: Settings) -> Settings:
    """Ray workers do not share the driver's working directory: make every local path absolute."""
    data = settings.model_copy(deep=True)
    data.data_dir = Path(settings.data_dir).resolve()
    data.model.cache_dir = Path(settings.model.cache_dir).expanduser().resolve()
    if "://" not in settings.adapter_root:
        data.adapters.root = str(Path(settings.adapter_root).resolve())
    if "://" not in settings.distill_dir:
        data.distill.work_dir = str(Path(settings.distill_dir).resolve())
    if settings.milvus.uri and "://" not in settings.milvus.uri:
        data.milvus.uri = str(Path(settings.milvus.uri).resolve())
    if settings.model.name and Path(settings.model.name).expanduser().is_dir():
        data.model.name = str(Path(settings.model.name).expanduser().resolve())
    return data


def ensure_ray(num_cpus: int | None = None) -> None:
    """Connect to the cluster (RAY_ADDRESS) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a private local cluster
    ray.init(num_cpus=num_cpus, ignore_reinit_error=True, log_to_driver=False)


def snapshot_users(settings: Settings, users: Sequence[tuple[str, str]], store: Any = None) -> list[UserCorpus]:
    """Read each user's turns and memories once, in the driver (Milvus Lite admits one process)."""
    from tsubasa.memory.store import MilvusStore

    store = store or MilvusStore(settings.milvus, uri=settings.milvus_uri)
    out = []
    for t, u in users:
        c = UserCorpus.from_store(store, validate_identifier(t, "tenant_id"), validate_identifier(u, "user_id"))
        if c.turns or c.memories:
            out.append(c)
    return out


def run_name(spec: TrainSpec, datasets: dict[str, str]) -> str:
    parts = [f"{k}:{stable_id(v)}" for k, v in sorted(datasets.items())]
    return "distill-" + stable_id(spec.model_dump_json(), *parts)[:16]


def run_distill_job(settings: Settings, users: Sequence[tuple[str, str]], spec: TrainSpec | None = None,
                    job: TrainJobConfig | None = None, store: Any = None,
                    progress: Callable[[str, dict], None] | None = None) -> JobResult:
    """Distil adapters for `users` on Ray (see the module docstring). `progress(key, state)` is
    called with each user's stage: `data` (dataset ready or failed) and training states."""
    import ray

    from services.train.data import build_datasets
    from services.train.loop import train_loop_per_worker

    t0 = time.perf_counter()
    settings = absolutise(settings)
    job = job or TrainJobConfig()
    spec = spec or TrainSpec.from_config(settings.distill)
    ensure_ray()
    corpora = snapshot_users(settings, users, store)
    missing = {f"{t}/{u}" for t, u in users} - {f"{c.tenant_id}/{c.user_id}" for c in corpora}
    on_user = (lambda k, s: progress(k, {"status": f"data: {s}"})) if progress else None
    datasets, errors = build_datasets(corpora, settings, job, teacher_d(settings.distill, spec), on_user=on_user)
    errors.update({k: "no turns or memories" for k in missing})
    storage = job.storage_path or str(Path(settings.distill_dir) / "ray")
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    name = job.name or run_name(spec, datasets)
    result = JobResult(name=name, storage_path=storage, errors=errors)
    if not datasets:
        result.seconds = time.perf_counter() - t0
        return result
    keys = sorted(datasets)
    board = _progress_board()
    loop_config = {
        "settings": settings, "spec": spec.model_dump(), "strategy": job.strategy, "job_id": name,
        "users": [k.split("/", 1) for k in keys], "datasets": {k: ray.put(datasets[k]) for k in keys},
        "board": board, "fsdp": {**job.fsdp.model_dump(), "mixed_precision": job.mixed_precision},
        "gradient_checkpointing": job.gradient_checkpointing, "users_per_batch": job.users_per_batch,
    }
    trainer = build_trainer(job, train_loop_per_worker, loop_config, name, storage)
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["result"] = trainer.fit()
        except Exception as exc:  # surfaced below with the run name
            outcome["error"] = exc

    th = threading.Thread(target=fit, name=f"fit-{name}", daemon=True)
    th.start()
    seen: dict[str, dict] = {}
    while th.is_alive():
        th.join(timeout=0.5)
        if progress:
            for k, st in ray.get(board.snapshot.remote()).items():
                if seen.get(k) != st:
                    seen[k] = st
                    progress(k, st)
    if "error" in outcome:
        raise JobFailedError(f"distillation run {name} failed (checkpoints kept under {storage}/{name}; "
                             f"re-run to resume): {outcome['error']}") from outcome["error"]
    states = ray.get(board.snapshot.remote())
    for k in keys:
        st = states.get(k, {})
        t, u = k.split("/", 1)
        result.users.append(UserResult(tenant_id=t, user_id=u, version=st.get("version"), adapter=st.get("adapter"),
                                       metrics=st.get("metrics", {})))
        if progress:
            progress(k, st)
    result.workers = {k: v for k, v in states.items() if k.startswith("_worker/")}
    _finish(storage, name)
    result.seconds = time.perf_counter() - t0
    return result


def _finish(storage: str, name: str) -> None:
    """Move a finished run aside, so the next run of the same users starts fresh."""
    import fsspec

    fs, base = fsspec.core.url_to_fs(storage)
    src = f"{base.rstrip('/')}/{name}"
    if fs.exists(src):
        fs.mv(src, f"{base.rstrip('/')}/finished/{name}-{int(time.time())}", recursive=True)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    from services.train.config import load_job_file
    from tsubasa.config import ConfigError, load_settings
    from tsubasa.distill.adapters import registry_from_settings
    from tsubasa.distill.pipeline import users_needing_adapters
    from tsubasa.memory.store import MilvusStore

    ap = argparse.ArgumentParser(prog="python -m services.train.job", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="job YAML (settings + job sections)")
    ap.add_argument("--tenant", required=True)
    ap.add_argument("--user", action="append", default=[], help="user id (repeat); default: users with new memories")
    ap.add_argument("--variant", default="tsubasa", choices=["tsubasa", "no_grounding", "vanilla"])
    ap.add_argument("--d", type=int, default=None)
    ap.add_argument("--num-cpus", type=int, default=None, help="local Ray cluster size")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings, job = load_job_file(args.config) if args.config else (load_settings(), TrainJobConfig())
    except ConfigError as exc:
        print(f"error: {exc}")
        return 2
    store = MilvusStore(settings.milvus, uri=settings.milvus_uri)
    users = args.user or users_needing_adapters(store, registry_from_settings(settings), args.tenant)
    spec = TrainSpec.from_config(settings.distill, args.variant, args.d)  # type: ignore[arg-type]
    ensure_ray(args.num_cpus)
    res = run_distill_job(settings, [(args.tenant, u) for u in users], spec, job, store=store,
                          progress=lambda k, st: print(f"[progress] {k} {st.get('status')} epoch={st.get('epoch')} "
                                                       f"version={st.get('version')}", flush=True))
    print(res.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
