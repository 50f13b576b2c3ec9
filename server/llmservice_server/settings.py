"""Server settings: one pydantic-settings model, read from CLI flags and `LLMSERVICE_*` env vars.

The operator configures the server through environment variables; a person running it by hand
uses the flags. Both spell the same field (`--max-model-len` == `LLMSERVICE_MAX_MODEL_LEN`).
Settings are built once in `main()` (or in the app factory of a uvicorn worker) and passed down.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, CliApp, SettingsConfigDict

ENV_PREFIX = "LLMSERVICE_"
BUNDLED = "bundled"

Dtype = Literal["auto", "float32", "float16", "bfloat16"]
Device = Literal["auto", "cpu", "cuda"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]


class Settings(BaseSettings):
    """Everything the operator (or a person) can set on the inference server."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="llmservice-server",
        frozen=True,
        extra="forbid",
    )

    model: str = Field(
        default=BUNDLED,
        description="Local directory, Hugging Face repo id, path to a .gguf file, or 'bundled'.",
    )
    revision: str | None = Field(default=None, description="Hugging Face revision (branch, tag, commit).")
    gguf_file: str | None = Field(default=None, description="GGUF file name inside a repo or directory.")
    trust_remote_code: bool = Field(default=False, description="Allow model code from the repository.")
    served_model_name: str | None = Field(default=None, description="Model name in the API; default derived.")
    dtype: Dtype = Field(default="auto", description="auto: bf16/fp16 on CUDA, float32 on CPU.")
    device: Device = "auto"
    max_model_len: int | None = Field(default=None, ge=1, description="Context length; default from config.")
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="CPU threads for torch; 0: chosen per engine step size between every core of the worker and "
        "one core fewer (left to the event loop and HTTP), by the steps' measured times.",
    )
    cpus: int = Field(
        default=0,
        ge=0,
        description="CPU cores one worker may use (the operator passes the pod's CPU per worker); "
        "0: the cores this process may run on, shared among the workers.",
    )
    cpu_placement: bool = Field(
        default=True,
        description="On a worker that owns its cores (a cpuset no larger than its CPU), for a model whose decode steps "
        "leave a core free, run the HTTP process on the last core and those steps on the others; off: the kernel places both.",
    )
    host: str = "0.0.0.0"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, description="uvicorn worker processes, each with its own model.")
    engine_process: bool = Field(
        default=True,
        description="Run the model in a child process, so the event loop and the engine do not share one GIL; "
        "off: a thread of the server process (one process, ~7 % less memory, slower streaming on CPU).",
    )
    fused_forward: bool = Field(
        default=True,
        description="For Llama, Mistral and Qwen2 models, run decode steps through the server's own forward over the model's "
        "weights (q/k/v and gate/up as one matmul each, none of transformers' per-call wrapping); off: transformers' forward.",
    )
    max_num_seqs: int = Field(default=16, ge=1, description="Sequences decoded together (running batch).")
    max_queue: int = Field(default=64, ge=0, description="Sequences admitted but waiting for a batch slot.")
    prefill_chunk_tokens: int = Field(
        default=512,
        ge=1,
        description="Prompt tokens (summed over newcomers) read per engine step, in the same forward as the running "
        "sequences' next tokens: bounds how much longer a step gets while new prompts are read.",
    )
    prefix_cache_mib: int = Field(
        default=128,
        ge=0,
        description="At most this much (MiB) of the K/V cache keeps blocks of prompts (and answers) no request holds any "
        "more; a prompt that starts with one (a shared system prompt, a conversation's earlier turns) reads only the rest. "
        "They live in the K/V cache's own blocks and give them up when running requests need them. 0: off.",
    )
    request_timeout_seconds: float = Field(default=600.0, gt=0)
    max_request_mib: float = Field(
        default=16.0,
        gt=0,
        description="Largest request body (MiB); a larger one is refused with 413 before it is read. The default holds "
        "a 128k-token context's prompt several times over, however it is spelled (docs/limits.md).",
    )
    request_read_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        description="A request's head and body must arrive whole within this long of its first byte (or of the "
        "connection opening); otherwise the connection is closed.",
    )
    max_connections: int = Field(
        default=1024,
        ge=1,
        description="Open connections (shared among the workers) beyond which a new connection is answered 503 with "
        "Retry-After and closed; /livez, /readyz and /startupz are answered on it all the same.",
    )
    drain_seconds: float = Field(default=30.0, ge=0, description="How long SIGTERM waits for streams.")
    api_key_file: Path | None = Field(default=None, description="File with the bearer token; auth is off if unset.")
    log_level: LogLevel = "info"
    cache_dir: Path = Field(
        default=Path.home() / ".cache" / "llmservice" / "models",
        description="Writable dir for converted (dequantized GGUF) model copies.",
    )
    load_delay_seconds: float = Field(default=0.0, ge=0, description="Fault injection: wait this long before loading (tests, demos).")
    kv_cache_mib: int = Field(
        default=0,
        ge=0,
        description="Size (MiB) of the K/V cache, one pool of blocks allocated once at start-up; 0: sized from the device "
        "(--gpu-memory-utilization of a GPU's memory, or the pod's memory limit on a CPU) less the weights and a margin.",
    )
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="On CUDA without --kv-cache-mib: the fraction of the GPU's memory the server may take (weights, the "
        "measured warm-up peak, the K/V cache).",
    )
    step_timeout_seconds: float = Field(
        default=120.0, gt=0, description="An engine step running longer than this makes /livez answer 503 (a hung device)."
    )
    termination_log: Path = Field(
        default=Path("/dev/termination-log"),
        description="Where a fatal error (a failed model load, a dead engine) is written, one line, before a non-zero exit "
        "(Kubernetes' terminationMessagePath); skipped when not writable.",
    )

    @model_validator(mode="after")
    def _gguf_only_with_model(self) -> Settings:
        if self.gguf_file is not None and self.model == BUNDLED:
            raise ValueError("--gguf-file names a file inside --model; it cannot be used with 'bundled'")
        return self

    def to_env(self) -> dict[str, str]:
        """The env vars that rebuild these settings in another process (uvicorn workers)."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(exclude_defaults=True).items():
            env[ENV_PREFIX + name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        return env


def parse_settings(argv: Sequence[str]) -> Settings:
    """Parse CLI flags over env vars (flags win), exiting with usage on a bad flag."""
    return CliApp.run(Settings, cli_args=list(argv))
