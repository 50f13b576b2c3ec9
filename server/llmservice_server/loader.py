"""Find and load the model: local directory, Hugging Face repo id, GGUF file, or the bundled one.

Runs on the engine thread (never in a request, never on the event loop). A GGUF model is
dequantized by transformers on load, which is slow (~30 s for SmolLM2-135M on 2 CPU cores), so the
result is saved once with `save_pretrained` under the cache dir and later starts load that copy.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import logging as hf_logging

from .fetch import fetch, progress_writer
from .memory import KVShape, available_memory, check_model_fits, container_memory, cpu_free
from .placement import worker_cores
from .settings import Settings
from .source import Source, hub_layout, offline, resolve_source
from .threads import ThreadPlan, plan_threads

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    max_model_len: int
    eos_token_ids: frozenset[int]
    vocab_size: int  # rows of the output layer (may exceed len(tokenizer))
    threads: ThreadPlan | None = None  # torch's CPU threads per step; None: left as they are (a GPU)


def pick_device(settings: Settings) -> torch.device:
    if settings.device == "cuda" or (settings.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


def thread_plan(settings: Settings, device: torch.device, config: Any) -> ThreadPlan | None:
    """Torch's threads per step; on a GPU only an explicit count applies (it sizes the CPU-side work)."""
    if device.type != "cpu" and not settings.torch_threads:
        return None
    return plan_threads(worker_cores(settings), getattr(config, "hidden_size", None), settings.torch_threads)


def pick_dtype(settings: Settings, device: torch.device) -> torch.dtype:
    if settings.dtype != "auto":
        return _DTYPES[settings.dtype]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def converted_dir(settings: Settings, source: Source) -> Path:
    """Cache dir for a dequantized GGUF, keyed by what the file holds, not where it lies.

    A key of path and mtime made a new 540 MB copy of SmolLM2 for every virtualenv the bundled
    package was installed into (every clean clone, every image rebuild). Hashing the file costs
    about a second per GB at start; converting it again costs 30 s and the disk. A GGUF named in a
    Hugging Face repo (not a local file) is keyed by repo, file and revision.
    """
    gguf = Path(source.location) / (source.gguf_file or "")
    if gguf.is_file():
        with gguf.open("rb") as data:
            key = f"sha256:{hashlib.file_digest(data, 'sha256').hexdigest()}"
    else:
        key = f"{source.location}|{source.gguf_file}|{settings.revision}"
    name = hashlib.sha256(key.encode()).hexdigest()[:16]
    return settings.cache_dir / f"{Path(source.gguf_file or 'model').stem}-{name}"


def load_kwargs(settings: Settings, device: torch.device, gguf_file: str | None) -> dict[str, Any]:
    """`from_pretrained`'s placement: on a GPU each weight is read straight onto the device
    (`device_map`, through accelerate), so host memory never holds the whole model; a GGUF file is
    dequantized on the host first either way (transformers' GGUF reader)."""
    if device.type == "cuda" and gguf_file is None:
        return {"device_map": {"": device.index if device.index is not None else torch.cuda.current_device()}}
    return {}


def _from_pretrained(
    settings: Settings, location: str, gguf_file: str | None, dtype: torch.dtype, placed: dict[str, Any] | None = None
) -> tuple[Any, Any]:
    kwargs: dict[str, Any] = {
        "revision": settings.revision,
        "trust_remote_code": settings.trust_remote_code,
        "local_files_only": offline() or Path(location).is_dir(),
    }
    if gguf_file:
        kwargs["gguf_file"] = gguf_file
    tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, **kwargs, **(placed or {}))
    return model, tokenizer


def load(settings: Settings, on_stage: Callable[[str], None]) -> LoadedModel:
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # untyped in transformers; bars are not log lines
    source = resolve_source(settings)
    device = pick_device(settings)
    dtype = pick_dtype(settings, device)
    if device.type == "cpu":
        # Loading (GGUF dequantization) gets every core the worker has, or the count asked for.
        torch.set_num_threads(settings.torch_threads or worker_cores(settings))
    location, gguf_file = source.location, source.gguf_file
    layout = hub_layout(settings)
    if layout is not None:
        # Downloaded checked and resumable, with bytes done for /startupz, then loaded from disk.
        on_stage("fetching")
        fetched = fetch(
            layout.repo, settings.revision, layout.root, endpoint=os.environ.get("HF_ENDPOINT") or None, report=progress_writer(layout)
        )
        if not fetched.ok or fetched.path is None:
            raise RuntimeError(f"{fetched.reason}: {fetched.message}")
        location = fetched.path
    converted = converted_dir(settings, source) if gguf_file else None
    if converted is not None and (converted / "config.json").is_file():
        location, gguf_file = str(converted), None
        log.info("Using converted GGUF copy", extra={"path": str(converted)})
    on_stage("loading_model")
    if gguf_file is None:
        check_fits_before_loading(settings, location, device, dtype)
    model, tokenizer = _from_pretrained(settings, location, gguf_file, dtype, load_kwargs(settings, device, gguf_file))
    if converted is not None and gguf_file is not None:
        _save_converted(model, tokenizer, converted)
    model = model.to(device).eval()  # already there on a GPU (device_map): only a GGUF or CPU model moves, if at all
    config_len = getattr(model.config, "max_position_embeddings", None)
    max_len = settings.max_model_len or config_len or 2048
    if config_len is not None and max_len > config_len:
        raise ValueError(f"--max-model-len {max_len} exceeds the model's context of {config_len}")
    vocab_size = int(model.get_output_embeddings().weight.shape[0])
    threads = thread_plan(settings, device, model.config)
    return LoadedModel(model, tokenizer, device, int(max_len), _eos_ids(model, tokenizer), vocab_size, threads)


def kv_shape(config: Any, dtype: torch.dtype) -> KVShape:
    """What one token of this model costs in the K/V cache, from its config."""
    heads = int(config.num_attention_heads)
    head_dim = getattr(config, "head_dim", None) or int(config.hidden_size) // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    return KVShape(int(config.num_hidden_layers), int(kv_heads), int(head_dim), dtype.itemsize)


def free_memory(settings: Settings, device: torch.device) -> int:
    """Bytes the model and its K/V may take on `device` now (see `memory`)."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return min(int(free), int(total * settings.gpu_memory_utilization))
    limit, used = container_memory()
    return cpu_free(limit, used, available_memory())


def check_fits_before_loading(settings: Settings, location: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse, before reading any weight, a model whose weights and one full-length sequence exceed free memory.

    The sizes come from the config alone: the model is built on the meta device (no memory) to count
    its parameters. Quantized checkpoints and configs that cannot be read are not checked here.
    """
    try:
        local = offline() or Path(location).is_dir()
        config = AutoConfig.from_pretrained(
            location, revision=settings.revision, trust_remote_code=settings.trust_remote_code, local_files_only=local
        )
        if getattr(config, "quantization_config", None) is not None:
            return
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=settings.trust_remote_code)  # type: ignore[no-untyped-call]
        weights = sum(p.numel() for p in skeleton.parameters()) * dtype.itemsize
        shape = kv_shape(config, dtype)
    except Exception:  # no sizes: the load itself reports what is wrong
        return
    max_len = settings.max_model_len or getattr(config, "max_position_embeddings", None) or 2048
    check_model_fits(weights, shape, int(max_len), free_memory(settings, device), str(device))


def _save_converted(model: Any, tokenizer: Any, target: Path) -> None:
    # Write to a temp dir and rename, so a crash mid-save never leaves a half copy that loads.
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # GGUF weights were dequantized to plain tensors on load; only the quantizer marker
        # makes save_pretrained refuse, and the saved copy is an ordinary float checkpoint.
        model.hf_quantizer = None
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
        log.info("Saved converted GGUF copy", extra={"path": str(target)})
    except Exception as exc:  # a failed cache write only costs the next start the conversion again
        log.warning("Could not cache converted model", extra={"path": str(target), "error": str(exc)})


def _eos_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    return frozenset(ids)
