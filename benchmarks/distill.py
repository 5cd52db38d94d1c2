"""Distillation costs: teacher-target storage per answer token (top-d vs the full vocabulary) and the
training step time of top-d KL relative to cross-entropy, measured side by side in one run.

Storage: for each answer token we keep d token ids (int32) and d log-probs (float32); the
alternative is one float32 per vocabulary entry. Reported both as arithmetic for the model's
vocabulary (and Qwen3's 151,936) and as measured from real teacher targets (score_topd on the model,
packed as numpy arrays, and as the JSON the cache writes).

Step time: one optimizer step (forward, loss, backward, AdamW) of the LoRA student on the same batch,
with loss = cross-entropy on the teacher's argmax, top-d KL (d = 1, 5, 20) and top-5 KL with the
student renormalised; the variants are interleaved within each repeat and the medians reported.

    .venv/bin/python benchmarks/distill.py --model smollm2-135m-instruct --repeats 10
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QWEN3_VOCAB = 151_936


def _batch(engine, n: int, prompt_words: int, answer_words: int, d: int, seed: int = 0):
    """n (prompt, answer) pairs scored by the teacher: real top-d targets for the benchmark batch."""
    from tsubasa.distill.prompts import student_messages

    rng = np.random.default_rng(seed)
    words = ["memory", "cat", "bakery", "marathon", "sister", "Lisbon", "cello", "orchestra", "promotion", "garden",
             "river", "summer", "painting", "friend", "school", "concert", "trip", "camera", "book", "city"]
    prompts, answers = [], []
    for _ in range(n):
        grounding = [" ".join(rng.choice(words, prompt_words // 3)) for _ in range(3)]
        prompts.append(student_messages(" ".join(rng.choice(words, 8)) + "?", grounding))
        answers.append(" ".join(rng.choice(words, answer_words)))
    scores = engine.score_topd(prompts, answers, d=d)
    return prompts, answers, scores


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--batch", type=int, default=8, help="examples per step")
    ap.add_argument("--prompt-words", type=int, default=60, help="grounding size (3 memories)")
    ap.add_argument("--answer-words", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/distill.json"))
    args = ap.parse_args()

    import torch

    from tsubasa.config import DistillConfig, ModelConfig
    from tsubasa.distill.teacher import target_bytes_per_token
    from tsubasa.distill.train import Example, LoraStudent, TrainSpec, batch_loss, collate
    from tsubasa.llm import load_engine

    mcfg = ModelConfig(name=args.model, batch_size=args.batch)
    engine = load_engine(mcfg)
    vocab = int(engine.base_model.config.vocab_size)
    d_max = 20
    prompts, _answers, scores = _batch(engine, args.batch, args.prompt_words, args.answer_words, d_max)

    # ---- storage ------------------------------------------------------------------------------
    n_tok = sum(len(s.token_ids) for s in scores)
    storage = {}
    for d in (1, 5, 20):
        packed = sum(s.topd_ids[:, :d].astype(np.int32).nbytes + s.topd_logprobs[:, :d].astype(np.float32).nbytes
                     for s in scores)
        as_json = sum(len(json.dumps({"ids": s.topd_ids[:, :d].tolist(),
                                      "lp": np.round(s.topd_logprobs[:, :d], 6).tolist()})) for s in scores)
        storage[f"top{d}"] = {"arith": target_bytes_per_token(d, vocab), "measured_packed_per_token": packed / n_tok,
                              "measured_json_per_token": as_json / n_tok}
    full_measured = 4 * vocab  # one float32 per vocabulary entry per answer token
    storage["full_vocab_per_token"] = full_measured
    storage["qwen3_full_vocab_per_token"] = 4 * QWEN3_VOCAB
    storage["qwen3_top5_ratio"] = target_bytes_per_token(5, QWEN3_VOCAB)["ratio"]

    # ---- step time ----------------------------------------------------------------------------
    cfg = DistillConfig(lora_rank=args.rank, lora_alpha=2 * args.rank, batch_size=args.batch)
    student = LoraStudent(mcfg, cfg)
    student.reset(0)
    tok = student.tokenizer
    from tsubasa.distill.train import chat_ids

    prompt_ids = [chat_ids(tok, p) for p in prompts]
    variants = {
        "ce (teacher argmax)": (TrainSpec(loss="ce_gold"), 1),
        "topd_kl d=1": (TrainSpec(loss="topd_kl", d=1), 1),
        "topd_kl d=5": (TrainSpec(loss="topd_kl", d=5), 5),
        "topd_kl d=20": (TrainSpec(loss="topd_kl", d=20), 20),
        "topd_kl d=5 renorm": (TrainSpec(loss="topd_kl", d=5, renormalize_student=True), 5),
    }
    batches = {}
    for name, (spec, d) in variants.items():
        ex = [Example(p, s.token_ids.tolist(), s.topd_ids[:, :d].tolist() if spec.loss == "topd_kl" else None,
                      s.topd_logprobs[:, :d].tolist() if spec.loss == "topd_kl" else None)
              for p, s in zip(prompt_ids, scores, strict=True)]
        if spec.loss == "ce_gold":  # CE on the teacher's argmax tokens, at the same positions
            ex = [Example(e.prompt_ids, [int(i) for i in s.topd_ids[:, 0]]) for e, s in zip(ex, scores, strict=True)]
        batches[name] = (spec, {k: v for k, v in collate(ex, student.pad_id).items()})
    params = student.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=1e-5)
    student.model.train()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for rep in range(args.warmup + args.repeats):
        for name, (spec, batch) in batches.items():
            t0 = time.perf_counter()
            loss = batch_loss(student.model, batch, spec)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            dt = time.perf_counter() - t0
            if rep >= args.warmup:
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["ce (teacher argmax)"]

    print(f"model {args.model} (vocab {vocab:,}), batch {args.batch}, {n_tok} answer tokens, "
          f"prompt ~{len(prompt_ids[0])} tokens, LoRA rank {args.rank}, torch threads {torch.get_num_threads()}")
    print("\nteacher-target bytes per answer token")
    print(f"  {'targets':<12}{'arith':>10}{'packed':>10}{'json':>10}{'x smaller than full':>22}")
    for d in (1, 5, 20):
        s = storage[f"top{d}"]
        print(f"  {'top-' + str(d):<12}{s['arith']['topd_bytes']:>10.0f}{s['measured_packed_per_token']:>10.0f}"
              f"{s['measured_json_per_token']:>10.0f}{full_measured / s['measured_packed_per_token']:>22.0f}")
    print(f"  {'full vocab':<12}{full_measured:>10,}   (Qwen3: {4 * QWEN3_VOCAB:,} B/token, "
          f"{storage['qwen3_top5_ratio']:,.0f}x the top-5 size)")
    print(f"\nstep time (median of {args.repeats}, interleaved)")
    for k, v in med.items():
        print(f"  {k:<22}{v * 1000:>9.1f} ms   x{v / base:.3f} of CE")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "model": args.model, "vocab": vocab, "batch": args.batch, "answer_tokens": n_tok,
        "prompt_tokens": len(prompt_ids[0]), "lora_rank": args.rank, "repeats": args.repeats,
        "storage": storage, "step_ms_median": {k: v * 1000 for k, v in med.items()},
        "step_ms_all": {k: [x * 1000 for x in v] for k, v in times.items()},
        "relative_to_ce": {k: v / base for k, v in med.items()},
        "machine": {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "load_avg": os.getloadavg()},
    }, indent=2))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
