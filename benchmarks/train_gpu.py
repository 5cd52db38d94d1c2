"""GPU training benchmark: a Qwen3-8B-architecture model with random weights (speed needs no trained
weights), bf16, 32 users' LoRA adapters trained batched (`BatchedTrainer`: every user's mini-batch in
one forward/backward) against one user after another (the same trainer with one slot), on the same
examples; tokens/s and users/hour, each user's adapter saved as a PEFT directory (its fixed cost).

    python benchmarks/train_gpu.py                                   # cuda: Qwen3-8B shape, 32 users
    python benchmarks/train_gpu.py --tiny --device cpu --users 4     # smoke check on a CPU

Sized for one H200 (about 10 minutes in all: two random 8B inits, batched, then sequential under
`--budget-s`; if sequential would run longer it stops and extrapolates from the users it trained,
and says so). Gradient checkpointing is on for both (a 32-user step holds ~24k tokens). The device
image has torch, transformers, peft and numpy but no pydantic: install its wheels first.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def qwen3_config(tiny: bool):
    from transformers import Qwen3Config

    if tiny:
        return Qwen3Config(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=4096)
    # Qwen3-8B (config.json of Qwen/Qwen3-8B)
    return Qwen3Config(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                       rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def random_model(config, device: str, dtype):
    import torch
    from transformers import Qwen3ForCausalLM

    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(prev)
    return model


def make_examples(users: int, n: int, prompt: int, answer: int, vocab: int):
    import numpy as np

    from tsubasa.distill.train import Example

    rng = np.random.default_rng(0)
    out = {}
    for u in range(users):
        out[f"t/u{u:02d}"] = [Example(prompt_ids=rng.integers(10, vocab, prompt + int(rng.integers(-16, 17))).tolist(),
                                      answer_ids=rng.integers(10, vocab, answer).tolist()) for _ in range(n)]
    return out


def run(label: str, args, config, examples, slots: int, budget_s: float) -> dict:
    """Train every user's adapter for `args.epochs`, `slots` users at a time; returns the figures."""
    import torch

    from tsubasa.config import DistillConfig, ModelConfig
    from tsubasa.distill.batched import BatchedStudent, BatchedTrainer
    from tsubasa.distill.train import TrainSpec

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    t0 = time.perf_counter()
    model = random_model(config, args.device, dtype)
    init_s = time.perf_counter() - t0
    mcfg = ModelConfig(name="random/qwen3-8b", device=args.device, dtype="bfloat16" if dtype == torch.bfloat16
                       else "float32")
    dcfg = DistillConfig(lora_rank=args.rank, lora_alpha=2 * args.rank, batch_size=args.batch_size,
                         epochs=args.epochs, loss="ce_gold", learning_rate=1e-4)
    student = BatchedStudent(mcfg, dcfg, slots=slots, model=model,
                             tokenizer=SimpleNamespace(pad_token_id=0, eos_token="<eos>"))
    if args.device == "cuda":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainer = BatchedTrainer(student, TrainSpec(loss="ce_gold"), dcfg)
    keys = list(examples)
    tokens = {k: sum(len(e.prompt_ids) + len(e.answer_ids) for e in examples[k]) * args.epochs for k in keys}
    done: list[str] = []
    split = {"train_s": 0.0, "save_s": 0.0, "join_s": 0.0}
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    with tempfile.TemporaryDirectory(prefix="tsubasa-gpu-bench-") as tmp:
        start = time.perf_counter()
        queue = list(keys)
        while (queue or trainer.members) and time.perf_counter() - start < budget_s:
            t = time.perf_counter()
            while queue and trainer.free_slots:
                key = queue.pop(0)
                trainer.add(key, examples[key])
            split["join_s"] += time.perf_counter() - t
            for _ in range(args.epochs):
                t = time.perf_counter()
                trainer.run_epoch()
                sync()
                split["train_s"] += time.perf_counter() - t
            t = time.perf_counter()
            for key, m in list(trainer.members.items()):
                student.save(m.slot, Path(tmp) / key)
                trainer.remove(key)
                done.append(key)
            split["save_s"] += time.perf_counter() - t
        wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device == "cuda" else None
    del trainer, student, model
    gc.collect()
    if args.device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    n_tok = sum(tokens[k] for k in done)
    res = {"users_per_batch": slots, "users_trained": len(done), "seconds": round(wall, 2),
           "model_init_s": round(init_s, 1), "tokens_per_s": round(n_tok / wall, 1),
           "users_per_hour": round(len(done) / wall * 3600, 1), **{k: round(v, 2) for k, v in split.items()},
           "peak_gpu_gib": round(peak, 1) if peak else None,
           "extrapolated": len(done) < len(keys)}
    print(f"{label}: {res}", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--tiny", action="store_true", help="2-layer Qwen3 config (smoke check)")
    ap.add_argument("--users", type=int, default=32)
    ap.add_argument("--examples", type=int, default=24, help="training examples per user")
    ap.add_argument("--prompt-tokens", type=int, default=160)
    ap.add_argument("--answer-tokens", type=int, default=24)
    ap.add_argument("--batch-size", type=int, default=4, help="examples per user per step")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=240, help="wall-clock cap of the sequential run")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train-gpu.json"))
    args = ap.parse_args()
    import torch

    config = qwen3_config(args.tiny)
    examples = make_examples(args.users, args.examples, args.prompt_tokens, args.answer_tokens, config.vocab_size)
    result = {"at": datetime.now(UTC).isoformat(timespec="seconds"), "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
              "model": "tiny Qwen3" if args.tiny else "Qwen3-8B architecture, random weights",
              "dtype": "bfloat16" if args.device == "cuda" else "float32", "args": {
                  k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "load_average_1m_at_start": round(os.getloadavg()[0], 1)}
    result["batched"] = run("batched", args, config, examples, args.users, float("inf"))
    result["sequential"] = run("sequential", args, config, examples, 1, args.budget_s)
    result["batched_over_sequential_tokens_per_s"] = round(result["batched"]["tokens_per_s"]
                                                           / result["sequential"]["tokens_per_s"], 2)
    result["batched_over_sequential_users_per_hour"] = round(result["batched"]["users_per_hour"]
                                                             / result["sequential"]["users_per_hour"], 2)
    result["load_average_1m_at_end"] = round(os.getloadavg()[0], 1)
    print(json.dumps({k: result[k] for k in ("batched_over_sequential_tokens_per_s",
                                             "batched_over_sequential_users_per_hour")}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
