"""Batched distillation on real Ray (Ray Data + Ray Train, 2 CPU workers), tiny-qwen3, Milvus Lite.

One story, in order (the default `batched` strategy: each worker trains its two users together):
1. a job for four users of two tenants is started in its own process and killed (SIGKILL, whole
   process group: driver, Ray, Milvus Lite) once its first checkpoint exists;
2. re-running the same job resumes every user from that checkpoint and publishes v0001 for each;
3. after a new memory, a second run publishes v0002 while v0001 stays current and readable until
   the pointer flips; a Ray Train worker is killed mid-run and the job still completes (retry from
   the last checkpoint).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, date, datetime
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
USERS = [("acme", "alice"), ("acme", "carol"), ("globex", "bob"), ("globex", "dave")]
EPOCHS = 6  # rounds of checkpoints: room for a kill to land mid-run

# The first driver also seeds the store: Milvus Lite admits one process, and the test process only
# opens the database once that driver is dead.
DRIVER = """
import json, sys
from distill_data import seed_user
from tsubasa.config import load_settings
from tsubasa.embed import load_embedder
from tsubasa.memory.store import MilvusStore
from services.train.config import TrainJobConfig
from services.train.job import ensure_ray, run_distill_job
settings = load_settings(**json.loads(sys.argv[1]))
users = [tuple(u) for u in json.loads(sys.argv[2])]
store = MilvusStore(settings.milvus, uri=settings.milvus_uri)
for t, u in users:
    seed_user(store, load_embedder(), t, u)
ensure_ray(num_cpus=2)
run_distill_job(settings, users, job=TrainJobConfig(num_workers=2), store=store)
"""


def _overrides(tmp: Path) -> dict:
    from testenv import MODEL_CACHE

    return {"data_dir": str(tmp / "data"), "model": {"name": "tiny-qwen3", "cache_dir": str(MODEL_CACHE),
                                                     "batch_size": 4},
            "milvus": {"uri": str(tmp / "milvus.db")},
            "distill": {"synth_mode": "template", "qa_per_user": 6, "lora_rank": 4, "lora_alpha": 8,
                        "epochs": EPOCHS, "batch_size": 4, "teacher_context_tokens": 256}}


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    os.environ["RAY_AUTH_MODE"] = "disabled"
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()


def _checkpoints(storage: Path) -> list[Path]:
    """Checkpoints Ray Train has committed: listed in the run's checkpoint manager snapshot. (A
    `checkpoint_*` directory appears before that; a job killed in between has nothing to resume.)"""
    found = []
    for snap in storage.glob("distill-*/checkpoint_manager_snapshot.json"):
        try:
            latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, ValueError):  # being rewritten: look again on the next poll
            continue
        if latest.get("checkpoint_dir_name") and (snap.parent / latest["checkpoint_dir_name"]).is_dir():
            found.append(snap.parent / latest["checkpoint_dir_name"])
    return found


def _train_workers() -> list:
    import psutil

    workers = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                workers.append(p)
        except psutil.Error:  # exited, or a zombie, between the listing and the read (is_running() is
            continue          # true for a zombie, and cmdline() then raises ZombieProcess)
    return workers


def test_kill_resume_and_second_version(tmp_path, embedder, ray_cluster):
    from services.train.config import TrainJobConfig
    from services.train.job import run_distill_job
    from tsubasa.config import load_settings
    from tsubasa.distill.adapters import AdapterRegistry
    from tsubasa.memory.store import MilvusStore
    from tsubasa.schema import EvolutionOp, MemoryRecord

    overrides = _overrides(tmp_path)
    settings = load_settings(**overrides)
    registry = AdapterRegistry(settings.adapter_root)
    storage = Path(settings.distill_dir) / "ray"

    # 1. Start the job in its own process group and kill all of it after the first checkpoint.
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests" / "support")])}
    log = open(tmp_path / "driver.log", "w")  # noqa: SIM115 (closed when the process is gone)
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(overrides), json.dumps(USERS)], cwd=REPO,
                            env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 150
    while not _checkpoints(storage) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert _checkpoints(storage), "the first job wrote no checkpoint:\n" + (tmp_path / "driver.log").read_text()[-3000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    log.close()
    assert all(registry.current(t, u) is None for t, u in USERS), "killed before any user finished"

    # 2. Re-run the same job: it resumes (same run name from the same data) and publishes v0001.
    store = MilvusStore(settings.milvus, uri=settings.milvus_uri)
    res = run_distill_job(settings, USERS, job=TrainJobConfig(num_workers=2), store=store)
    assert [(r.tenant_id, r.user_id, r.version) for r in res.users] == [(t, u, 1) for t, u in sorted(USERS)]
    first = {u: registry.current(t, u) for t, u in USERS}
    assert all(v.manifest.extra["job_id"] == res.name for v in first.values())
    resumed = [float(v.manifest.metrics["resumed_from_epoch"]) for v in first.values()]
    assert min(resumed) >= 1, f"a user did not resume from the killed run's checkpoint: {resumed}"
    assert all(v.manifest.metrics["epochs"] == EPOCHS for v in first.values())
    assert all(v.manifest.metrics["batch_users"] == 2 for v in first.values())  # two users per worker
    assert (storage / "finished").is_dir() and not list(storage.glob("distill-*"))

    # 3. New memory for alice -> a new run: v0002 published while v0001 serves until the flip.
    now = datetime.now(UTC)
    fact = "Alice got a promotion to head baker at Sweet Rolls"
    store.write_memory(MemoryRecord(memory_id="m-new", tenant_id="acme", user_id="alice", text=fact, created_at=now,
                                    updated_at=now, last_op=EvolutionOp.ADD, event_date=date(2023, 6, 1)),
                       embedder.embed([fact])[0], EvolutionOp.ADD, "o-new")
    seen: list[int | None] = []
    v1_reads: list[bool] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            cur = registry.current("acme", "alice")
            seen.append(cur.version if cur else None)
            if cur is not None and cur.version == 1:
                v1_reads.append((Path(registry.local_path(cur)) / "adapter_model.safetensors").is_file())
            time.sleep(0.05)

    killed: list[int] = []

    def on_progress(key: str, st: dict) -> None:
        if not killed and (st.get("epoch") or 0) >= 1:  # a real worker failure, mid-run
            workers = _train_workers()
            if workers:
                killed.append(workers[0].pid)
                os.kill(workers[0].pid, signal.SIGKILL)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        res2 = run_distill_job(settings, USERS, job=TrainJobConfig(num_workers=2, max_failures=2), store=store,
                               progress=on_progress)
    finally:
        stop.set()
        watcher.join()
    assert killed, "no train worker was found to kill"
    assert res2.name != res.name
    assert {(r.user_id, r.version) for r in res2.users} == {(u, 2) for _, u in USERS}
    assert seen[0] == 1 and seen[-1] == 2 and None not in seen and sorted(seen) == seen
    assert v1_reads and all(v1_reads)
    assert [v.version for v in registry.list("acme", "alice")] == [1, 2]  # v0001 kept (keep_versions=5)
    assert registry.current("acme", "alice").manifest.data_hash != first["alice"].manifest.data_hash
    store.close()
