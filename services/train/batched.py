"""The `batched` strategy of the Ray Train loop (services/train/loop.py): worker r owns users[r::world]
and trains up to `job.users_per_batch` of them at once, one adapter slot each, in one forward and
backward per step (`tsubasa.distill.batched.BatchedTrainer`).

A round is one epoch of every user in the batch. Before a round, free slots are filled with the
worker's next users (a user restored from a checkpoint continues from its trainer.pt); after it, a
user whose last epoch ended is published and leaves, the others' state goes into the round's
checkpoint. Workers report the same number of rounds (`ray.train.report` is a barrier): the count
is simulated from every worker's users, and a worker with nothing left reports empty rounds.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from services.train.loop import Worker, _board_update, _report


def batched_rounds(remaining: Sequence[int], capacity: int) -> int:
    """Rounds needed for users with `remaining` epochs each (in order), `capacity` at a time, each
    user taking a free slot as soon as one opens."""
    queue = [r for r in remaining if r > 0]
    active: list[int] = []
    rounds = 0
    while queue or active:
        while queue and len(active) < capacity:
            active.append(queue.pop(0))
        active = [r - 1 for r in active if r > 1]
        rounds += 1
    return rounds


def run_batched(w: Worker, config: dict[str, Any]) -> None:
    import torch

    from tsubasa.distill.batched import BatchedStudent, BatchedTrainer
    from tsubasa.distill.train import enable_gradient_checkpointing, final_metrics, make_examples

    settings, cfg, states = w.settings, w.settings.distill, w.states
    capacity = int(config.get("users_per_batch", 16))
    owner = {k: i % w.world for i, k in enumerate(w.keys)}
    mine = [k for k in w.keys if owner[k] == w.rank]
    for k in w.keys:  # a user in training whose weights are missing starts over (before counting rounds)
        if not states[k].done and states[k].epoch > 0 and w.saved_trainer(k) is None:
            states[k].epoch = 0
    rounds = max(batched_rounds([w.epochs - states[k].epoch for k in w.keys if owner[k] == r and not states[k].done],
                                capacity) for r in range(w.world))
    todo = [k for k in mine if not states[k].done]
    trainer: BatchedTrainer | None = None
    data: dict[str, Any] = {}
    blobs: dict[str, dict] = {}
    timing = {"setup_s": 0.0, "train_s": 0.0, "publish_s": 0.0, "checkpoint_s": 0.0}
    for rnd in range(rounds):
        metrics: dict[str, Any] = {"round": rnd, "rank": w.rank}
        t0 = time.perf_counter()
        waiting = [k for k in todo if k not in data and not states[k].done]
        if waiting and trainer is None:
            student = BatchedStudent(settings.model, cfg, slots=min(capacity, len(todo)))
            if config.get("gradient_checkpointing") and not cfg.gradient_checkpointing:  # else already on
                enable_gradient_checkpointing(student.model)
            trainer = BatchedTrainer(student, w.spec, cfg, seed=cfg.seed)
        for key in waiting[:trainer.free_slots if trainer else 0]:
            st, ds = states[key], w.dataset(key)
            examples = make_examples(ds, w.spec, trainer.student.tokenizer, settings.model.enable_thinking,
                                     cfg.vanilla_chunk_tokens)
            blob = w.saved_trainer(key) if st.epoch > 0 else None
            trainer.add(key, examples, torch.load(blob, weights_only=False) if blob else None)
            if blob is not None:
                st.resumed_from_epoch = st.epoch
            data[key] = ds
        timing["setup_s"] += time.perf_counter() - t0
        if trainer is not None and trainer.members:
            for key in trainer.members:
                states[key].status, states[key].worker = "training", w.rank
            t0 = time.perf_counter()
            epoch_metrics = trainer.run_epoch()
            timing["train_s"] += time.perf_counter() - t0
            metrics["batch_users"] = len(epoch_metrics)
            t0 = time.perf_counter()
            for key, m in epoch_metrics.items():
                st = states[key]
                st.epoch, st.metrics = int(m["epoch"]), {k: float(v) for k, v in m.items()}
                metrics.update({f"{key}/loss": m["loss"], f"{key}/epoch": st.epoch})
                if st.epoch >= w.epochs:
                    member = trainer.members[key]
                    with tempfile.TemporaryDirectory(prefix="tsubasa-adapter-") as tmp:
                        trainer.student.save(member.slot, tmp)
                        done = {**final_metrics(member.history, len(member.examples)),
                                "batch_users": float(len(epoch_metrics))}
                        w.publish(st, data[key], Path(tmp), done, len(member.examples),
                                  trainer.student.target_modules)
                    st.status = "published"
                    trainer.remove(key)
                    blobs.pop(key, None)
                else:
                    blobs[key] = trainer.user_state(key)
                _board_update(w.board, st)
            timing["publish_s"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        _report(states, mine, blobs, w.rank, {**metrics, **timing})
        timing["checkpoint_s"] += time.perf_counter() - t0
    if rounds == 0:  # everything was done before this attempt: still leave a final report
        _report(states, mine, blobs, w.rank, {"round": -1, "rank": w.rank})
    for k in mine:
        _board_update(w.board, states[k])
    if w.board is not None:
        w.board.update.remote(f"_worker/{w.rank}", timing)
