"""Peak memory and seconds per step of local LoRA distillation, with and without
`distill.gradient_checkpointing`, on one user's cached training data (the laptop's memory knob).

    .venv/bin/python benchmarks/train_memory.py \\
        --dataset .tsubasa/distill-qwen15/distill/cache/targets/bench/conv-26/<key>.json \\
        --model qwen2.5-coder-1.5b-instruct --steps 4 --out benchmarks/results/train-memory-qwen15.json

Each setting runs in its own process (peak resident memory is per process: `ru_maxrss`), loads the
student exactly as `tsubasa distill --local` does (`BatchedStudent`, one slot), and trains `--steps`
steps of `distill.batch_size` examples in the dataset's order; the first step is reported apart (it
pays for allocator warm-up). Only figures go to the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def one(args: argparse.Namespace) -> dict:
    """Train `args.steps` steps in this process; return its figures."""
    from tsubasa.config import load_settings
    from tsubasa.distill.batched import BatchedStudent, BatchedTrainer
    from tsubasa.distill.teacher import UserDataset
    from tsubasa.distill.train import TrainSpec, make_examples

    settings = load_settings()
    model = settings.model.model_copy(update={"name": args.model})
    cfg = settings.distill.model_copy(update={"gradient_checkpointing": args.checkpointing})
    ds = UserDataset.model_validate_json(Path(args.dataset).read_text())
    spec = TrainSpec.from_config(cfg)
    t0 = time.perf_counter()
    student = BatchedStudent(model, cfg, slots=1)
    load_s = time.perf_counter() - t0
    examples = make_examples(ds, spec, student.tokenizer)[:args.steps * cfg.batch_size]
    trainer = BatchedTrainer(student, spec, cfg, seed=cfg.seed)
    trainer.add("user", examples)
    steps: list[float] = []
    last = [time.perf_counter()]

    def on_step(step: int, total: int, loss: float) -> None:
        now = time.perf_counter()
        steps.append(now - last[0])
        last[0] = now
        print(f"  step {step}/{total}: {steps[-1]:.1f} s, loss {loss:.3f}", flush=True)

    trainer.run_epoch(on_step=on_step)
    return {"gradient_checkpointing": args.checkpointing, "model": args.model, "batch_size": cfg.batch_size,
            "steps": len(steps), "load_s": round(load_s, 1), "first_step_s": round(steps[0], 1),
            "step_s_median": round(statistics.median(steps[1:] or steps), 1),
            "answer_tokens": int(sum(len(e.answer_ids) for e in examples)),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", required=True, help="a cached UserDataset (teacher targets) JSON")
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/train-memory-qwen15.json"))
    ap.add_argument("--one", choices=["on", "off"], help=argparse.SUPPRESS)  # a child process: one setting
    args = ap.parse_args()
    if args.one:
        args.checkpointing = args.one == "on"
        print("RESULT " + json.dumps(one(args)), flush=True)
        return 0
    if not Path(args.dataset).exists():
        raise SystemExit(f"--dataset {args.dataset}: no such file (a `targets` JSON under the distillation cache)")
    rows = []
    for setting in ("off", "on"):
        print(f"gradient checkpointing {setting}", flush=True)
        cmd = [sys.executable, __file__, "--dataset", args.dataset, "--model", args.model,
               "--steps", str(args.steps), "--one", setting]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        print(proc.stdout[-2000:], end="")
        if proc.returncode:
            raise SystemExit(f"the {setting} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        rows.append(json.loads(next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))[7:]))
    off, on = rows
    out = {"benchmark": "train-memory", "command": " ".join(sys.argv), "cpus": os.cpu_count(),
           "load1": os.getloadavg()[0], "settings": rows,
           "peak_rss_ratio_on_off": round(on["peak_rss_gb"] / off["peak_rss_gb"], 3),
           "step_time_ratio_on_off": round(on["step_s_median"] / off["step_s_median"], 3)}
    print(json.dumps({k: v for k, v in out.items() if k != "settings"}))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
