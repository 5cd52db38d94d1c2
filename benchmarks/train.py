"""Training benchmark on the CPU: a tenant's users distilled batched (`job.users_per_batch` users in
one forward/backward per step) against one user after another (`users_per_batch=1`), the whole Ray
Train job each time (snapshot, cached data stage, Train run, checkpoints, publishing), same data.

    .venv/bin/python benchmarks/train.py                                  # tiny-qwen3, 16 users
    .venv/bin/python benchmarks/train.py --model smollm2-135m-instruct --users 16 --qa 16 --epochs 1 \\
        --out benchmarks/results/train-smollm2.json

The data stage (template QA + teacher top-5 targets) runs once before both and is cached, so both
runs read the same datasets. Reports users/hour and examples/s (examples x epochs / wall seconds),
and where each run's time goes: the worker's setup (model, datasets), train steps, publishing,
checkpoint reports, and the rest (Ray Train start, driver, snapshot, cache reads).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))

TENANT = "bench"
PLACES = ["Lisbon", "Kyoto", "Denver", "Leeds", "Boston", "Oslo", "Lima", "Cairo", "Perth", "Quebec"]
THINGS = ["a grey cat", "a red bicycle", "an old cello", "a jazz record", "a sourdough starter", "a kayak",
          "a telescope", "a chess set", "a sketchbook", "a vintage camera"]


def facts_for(user: str, n: int) -> list[str]:
    """n distinct facts per user (each gives a cloze question and a date question)."""
    name = user.title()
    return [f"{name} bought {THINGS[i % len(THINGS)]} at a market in {PLACES[(i * 3 + len(user)) % len(PLACES)]} "
            f"during trip number {i + 1}" for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-qwen3")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--qa", type=int, default=30, help="QA pairs per user (80%% train, 20%% held out)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=4, help="examples per user per step (distill.batch_size)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train.json"))
    args = ap.parse_args()

    from distill_data import seed_user

    from services.train.config import TrainJobConfig
    from services.train.data import build_datasets
    from services.train.job import ensure_ray, run_distill_job, snapshot_users
    from tsubasa.config import load_settings
    from tsubasa.distill.pipeline import teacher_d
    from tsubasa.distill.train import TrainSpec
    from tsubasa.embed import load_embedder
    from tsubasa.memory.store import MilvusStore

    users = [f"user{i:02d}" for i in range(args.users)]
    result: dict = {"model": args.model, "users": args.users, "epochs": args.epochs, "batch_size": args.batch_size,
                    "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "python": sys.version.split()[0],
                    "at": datetime.now(UTC).isoformat(timespec="seconds"),
                    "load_average_1m_at_start": round(os.getloadavg()[0], 1)}
    with tempfile.TemporaryDirectory(prefix="tsubasa-train-bench-") as tmp:
        settings = load_settings(
            data_dir=Path(tmp) / "data", model={"name": args.model, "batch_size": 8},
            milvus={"uri": str(Path(tmp) / "milvus.db")},
            distill={"synth_mode": "template", "qa_per_user": args.qa, "epochs": args.epochs, "lora_rank": 8,
                     "lora_alpha": 16, "batch_size": args.batch_size, "teacher_context_tokens": 256})
        store = MilvusStore(settings.milvus, uri=settings.milvus_uri)
        emb = load_embedder(settings.embedder)
        for u in users:
            seed_user(store, emb, TENANT, u, facts=facts_for(u, max(8, args.qa // 2 + 4)))
        ensure_ray(num_cpus=2)
        pairs = [(TENANT, u) for u in users]
        spec = TrainSpec.from_config(settings.distill)
        t0 = time.perf_counter()
        from services.train.job import absolutise

        abs_settings = absolutise(settings)
        datasets, errors = build_datasets(snapshot_users(abs_settings, pairs, store), abs_settings,
                                          TrainJobConfig(), teacher_d(settings.distill, spec))
        result["data_stage_s"] = round(time.perf_counter() - t0, 1)
        assert not errors, errors
        n_examples = sum(len(json.loads(d)["items"]) - sum(it["heldout"] for it in json.loads(d)["items"])
                         for d in datasets.values())
        result["train_examples"] = n_examples
        print(f"data stage {result['data_stage_s']} s: {n_examples} training examples over {len(users)} users",
              flush=True)
        runs = {}
        for label, per_batch in (("sequential", 1), ("batched", args.users)):
            job = TrainJobConfig(num_workers=1, users_per_batch=per_batch, name=f"bench-{label}")
            t0 = time.perf_counter()
            res = run_distill_job(settings, pairs, spec, job, store=store)
            wall = time.perf_counter() - t0
            assert all(r.version for r in res.users) and len(res.users) == len(users), res
            timing = res.workers.get("_worker/0", {})
            inside = sum(timing.values())
            runs[label] = {
                "users_per_batch": per_batch, "seconds": round(wall, 2),
                "users_per_hour": round(len(users) / wall * 3600, 1),
                "examples_per_s": round(n_examples * args.epochs / wall, 2),
                "train_examples_per_s": round(n_examples * args.epochs / max(timing.get("train_s", 0), 1e-9), 2),
                "worker": {k: round(v, 2) for k, v in timing.items()},
                "outside_worker_loop_s": round(wall - inside, 2),
                "loss_last_epoch_mean": round(sum(r.metrics["loss_last_epoch"] for r in res.users) / len(users), 4),
            }
            print(f"{label}: {wall:.1f} s, {runs[label]['users_per_hour']} users/h, "
                  f"{runs[label]['examples_per_s']} examples/s, worker {runs[label]['worker']}", flush=True)
        store.close()
    result["runs"] = runs
    result["batched_over_sequential_users_per_hour"] = round(
        runs["batched"]["users_per_hour"] / runs["sequential"]["users_per_hour"], 2)
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 1)
    print(f"\ntraining benchmark, {args.model}, {len(users)} users, {args.epochs} epochs (1-min load average "
          f"{result['load_average_1m_at_start']} -> {result['load_average_1m_at_end']}): batched / sequential "
          f"users/hour = {result['batched_over_sequential_users_per_hour']}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
