"""What the contiguous LM-head input (`tsubasa.llm.models.contiguous_lm_head`) buys on a CPU:
a training step of the local student, teacher top-d scoring and a batched generate call, each with
and without the hook, alternated in one process on the same inputs (medians over `--repeats`).

    .venv/bin/python benchmarks/lm_head_slice.py --model qwen2.5-coder-1.5b-instruct \\
        --out benchmarks/results/lm-head-slice-qwen15.json

Inputs are random token ids of the lengths the reading ablation sees on conv-26: student prompts of
150 tokens (k=3 memories) and 77 (no grounding) with 8-token answers, batch 8; teacher rows of
1,000 tokens with 8-token continuations, batch 4; generation from 8 prompts of 300 tokens, 16 new
tokens. Figures only go to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/lm-head-slice-qwen15.json")
    args = ap.parse_args()

    import numpy as np
    import torch

    from tsubasa.config import load_settings
    from tsubasa.distill.batched import BatchedStudent, BatchedTrainer
    from tsubasa.distill.train import Example, TrainSpec
    from tsubasa.llm import load_engine
    from tsubasa.llm.models import contiguous_lm_head

    settings = load_settings()
    model_cfg = settings.model.model_copy(update={"name": args.model, "batch_size": 8})
    cfg = settings.distill
    engine = load_engine(model_cfg, shared=False)  # the HF engine: generation and teacher scoring
    student = BatchedStudent(model_cfg, cfg, slots=1, model=engine.base_model, tokenizer=engine.tokenizer)
    head = engine.base_model.get_output_embeddings()
    rng = np.random.default_rng(0)

    def ids(n: int) -> list[int]:
        return [int(x) for x in rng.integers(1000, 30000, n)]

    def example(n: int, a: int = 8) -> Example:
        return Example(ids(n), ids(a), [ids(5) for _ in range(a)], [[-1.0, -2.0, -3.0, -4.0, -5.0]] * a)

    spec = TrainSpec.from_config(cfg)
    trainers = {}
    for n in (150, 77):
        t = BatchedTrainer(student, spec, cfg, seed=cfg.seed)
        t.add(f"p{n}", [example(n) for _ in range(cfg.batch_size)])
        trainers[f"train_step_prompt{n}_b{cfg.batch_size}"] = t
    rows = [(ids(1000), ids(8)) for _ in range(4)]
    prompts = [ids(300) for _ in range(8)]
    gen = {"input_ids": torch.tensor(prompts), "attention_mask": torch.ones(8, 300, dtype=torch.long)}

    def generate() -> None:
        with torch.inference_mode():
            engine.base_model.generate(**gen, max_new_tokens=16, min_new_tokens=16, do_sample=False,
                                       pad_token_id=engine.tokenizer.pad_token_id)

    tasks = {**{k: t.run_epoch for k, t in trainers.items()},
             # one batch of HFEngine.score_topd on token ids (its public form takes chat messages)
             "teacher_score_4x1000": lambda: engine._score_batch(rows, 5, None),
             "generate_8x300_16new": generate}
    times: dict[str, dict[str, list[float]]] = {k: {"plain": [], "contiguous": []} for k in tasks}
    for r in range(args.repeats + 1):  # the first round warms up and is not counted
        for mode in ("plain", "contiguous") if r % 2 else ("contiguous", "plain"):
            if mode == "plain" and head._tsubasa_contiguous is not None:
                head._tsubasa_contiguous.remove()
                head._tsubasa_contiguous = None
            elif mode == "contiguous":
                contiguous_lm_head(engine.base_model)
            for name, fn in tasks.items():
                t0 = time.perf_counter()
                fn()
                dt = time.perf_counter() - t0
                if r:
                    times[name][mode].append(dt)
                print(f"round {r} {mode:10s} {name}: {dt:.1f} s", flush=True)
    out = {"model": args.model, "threads": torch.get_num_threads(), "repeats": args.repeats,
           "load_avg_at_end": os.getloadavg()[0], "tasks": {}}
    for name, t in times.items():
        plain, cont = statistics.median(t["plain"]), statistics.median(t["contiguous"])
        out["tasks"][name] = {"plain_s": round(plain, 2), "contiguous_s": round(cont, 2),
                              "speedup": round(plain / cont, 2)}
        print(f"{name:32s} plain {plain:6.1f} s  contiguous {cont:6.1f} s  {plain / cont:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
