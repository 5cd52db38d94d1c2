"""Random LoRA adapters for tests: peft LoRA on a base model with non-zero, seeded B matrices, so
every adapter changes the model's outputs (a freshly initialised LoRA has B = 0 and changes nothing)."""

from __future__ import annotations

from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_random_lora(base_path: str, out_dir: str | Path, seed: int, rank: int = 8, scale: float = 0.5) -> str:
    """Write a peft adapter directory for `base_path` to `out_dir`; returns the directory."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                  lora_dropout=0.0))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(out)
    return str(out)
