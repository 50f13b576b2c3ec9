"""The engine: one thread owns the model and decodes every running sequence in one batch.

Why one thread: torch and the KV cache are not shared between threads, and one owner makes
step-level batching simple. Requests arrive through `submit` (any thread), wait in a bounded
deque (admission bounds it), join the batch between engine steps and leave it when finished,
stopped, cancelled or timed out. Results go back through each request's `sink`, which the async
side points at its `Handoff` (one loop wakeup per step) - the engine never touches the event loop.
In its own process (`engine_process`, the default) the sinks feed the pipe to the HTTP process
instead, flushed once per step through `after_events`.

One engine step is one forward (`ragged.py`): the next token of every running row and a chunk of
the newcomers' prompts (at most `prefill_chunk_tokens` of them, so a long prompt never stalls the
running streams for more than one chunk), packed into one sequence with no padding. A prompt whose
last chunk went through joins the batch in the same step, its first token sampled from that
forward. Every row has its own positions and its own KV slot, so a row computes what it would
compute alone: batched greedy output is the sequential greedy output. For Llama-family models
the forward is the engine's own (`decoder.py`), over the same weights; others run `model(...)`.

K/V live in one pool of fixed size, allocated once when the model is loaded (`kv_cache.py`, sized by
`memory.py`), in blocks handed out by `kv_blocks.py`. A request is admitted while the pool has
the blocks of its prompts; a running row takes one more block each `BLOCK_TOKENS` tokens. When
none is left, the most recently admitted row (or prompt being read) is preempted: its blocks go
back, it returns to the head of the queue, and when admitted again its prompt and the tokens it
already sent are read again (the prefix cache usually still has most of them) and it goes on
from there: its stream sees no gap and no repeat. A full pool makes requests slower, not failed.
The prefix cache is the same pool: full blocks of prompts read and of rows that ended stay
findable by their tokens until their blocks are needed; a newcomer starts reading after its
longest cached beginning, holding those blocks.

Failures stay as small as they are: a prompt whose reading fails fails its request only; an
out-of-memory step preempts a row and goes on; a step failure leaves the engine serving; an error
that leaves the device unusable (a CUDA error) fails the engine, and the server exits with it.
`step_clock` holds when the running step began (0: none), for `/livez` to see a hung step.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .backend import StepClock
from .decoder import FusedDecoder, adopt
from .events import Delta, Done, Event, Failed, FailureKind, Finished, FinishReason, GenerationRequest, SamplingParams, Sink, TokenInfo
from .kv_blocks import BLOCK_TOKENS, BlockPool
from .kv_cache import KVCache, SlotTable
from .loader import LoadedModel, kv_shape, load
from .memory import MIB, available_memory, check_context_fits, container_memory, cpu_kv_budget, cuda_budget, pool_blocks
from .metrics import Metrics
from .placement import Placement, pin_thread
from .ragged import Chunk, RaggedStep, UnsupportedModel, install
from .sampling import Choice, RowSampler, select_tokens
from .settings import Settings
from .textstream import IncrementalDetokenizer, StopMatcher
from .threads import ThreadTuner

log = logging.getLogger(__name__)

PREFILL_TOKEN_BUDGET = 8192  # prompt tokens being read at once (bounds how long a newcomer waits for its first chunk)
# Messages of errors after which the device cannot be trusted: the CUDA context is poisoned.
_POISONED = ("CUDA error", "illegal memory access", "device-side assert", "CUBLAS_STATUS", "cuDNN error")


@dataclass
class _Clock:
    value: float = 0.0


def poisoned(exc: BaseException) -> bool:
    """An error that leaves the device unusable for every later request (only a new process recovers)."""
    accelerator = getattr(torch, "AcceleratorError", None)
    if accelerator is not None and isinstance(exc, accelerator):
        return True
    return not isinstance(exc, torch.OutOfMemoryError) and any(text in str(exc) for text in _POISONED)


class Ticket:
    """The caller's side of a submitted request: cancel it from any thread."""

    def __init__(self, request: GenerationRequest, sink: Sink, wake: Callable[[], None]) -> None:
        self.request = request
        self.sink = sink
        self.submitted = time.monotonic()
        self.deadline = self.submitted + request.timeout
        self.cancelled = False
        self._wake = wake

    def cancel(self) -> None:
        self.cancelled = True
        self._wake()


# --- engine-side state -----------------------------------------------------------------------


@dataclass(eq=False)
class _Active:
    ticket: Ticket
    rows_left: int
    prompt_tokens: int
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    first_token_at: float | None = None
    reasons: set[str] = field(default_factory=set)


@dataclass(eq=False)
class _Row:
    active: _Active
    index: int
    prompt: list[int]
    max_tokens: int
    sampler: RowSampler
    detok: IncrementalDetokenizer
    stopper: StopMatcher
    length: int = 0  # tokens in its K/V
    next_token: int = 0  # fed in the next step
    generated: int = 0
    last_token_at: float = 0.0
    tokens: list[int] = field(default_factory=list)  # generated so far (read again after a preemption)
    blocks: list[int] = field(default_factory=list)  # its K/V blocks, in token order
    admitted: int = 0  # admission order: the highest is preempted first

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    def history(self) -> list[int]:
        return self.prompt + self.tokens


@dataclass(eq=False)
class _Reading:
    """Tokens to read a chunk per step, its rows joining the batch when they are through: a newcomer's
    prompt (its n rows share its K/V), or a preempted row's prompt and generated tokens (`resumed`)."""

    ticket: Ticket
    ids: list[int]  # the tokens: its blocks' keys in the prefix cache
    rows: list[_Row]
    resumed: bool = False
    read: int = 0  # tokens already through the model (or found in the prefix cache)
    blocks: list[int] = field(default_factory=list)
    copies: list[int] = field(default_factory=list)  # rows[1:]: each its own copy of a partial last block
    slots: torch.Tensor | None = None  # [len(ids)] pool slots of the tokens, on the device
    tokens: torch.Tensor | None = None  # [len(ids)] on the CPU: packed with the step's other tokens
    admitted: int = 0

    @property
    def length(self) -> int:
        return len(self.ids)

    def blocks_needed(self, block_tokens: int) -> int:
        whole = -(-self.length // block_tokens)
        return whole + (len(self.rows) - 1 if self.length % block_tokens else 0)


class Engine:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        loader: Callable[[Settings, Callable[[str], None]], LoadedModel] = load,
        on_stage: Callable[[str], None] | None = None,
        after_events: Callable[[], None] | None = None,
        placement: Placement | None = None,
        step_clock: StepClock | None = None,
    ) -> None:
        self._settings = settings
        self._placement = placement  # the engine thread's cores per step's threads; None: the kernel's choice
        self._on_stage = on_stage  # told every stage change, after `error` / `load_seconds` are set
        self._after_events = after_events  # on this thread, once the sinks of a step (or of the final failures) were fed
        self._metrics = metrics
        self._loader = loader
        self._cond = threading.Condition()
        self._inbox: deque[Ticket] = deque()
        self._waiting: deque[Ticket | _Reading] = deque()  # new requests; preempted work at the head
        self._rows: list[_Row] = []  # the running batch: row i's slots are row i of the slot table
        self._reading: list[_Reading] = []  # prompts being read, oldest first
        self._pool: BlockPool | None = None
        self._cache: KVCache | None = None
        self._table: SlotTable | None = None
        self._admissions = itertools.count(1)
        self.step_clock: StepClock = step_clock if step_clock is not None else _Clock()
        self._decoder: FusedDecoder | None = None  # the engine's own forward, for the architectures it knows
        self._threads = 0  # torch's CPU threads as last set by a step (0: not yet)
        self._tuner: ThreadTuner | None = None  # from the first served step: warm-up times are not representative
        self._stopping = False
        self._abort_message: str | None = None
        self._model: LoadedModel | None = None
        self.stage = "starting"
        self.error: str | None = None
        self.load_seconds: float | None = None
        self._settled = threading.Event()  # the model loaded, failed to load, or the engine stopped
        self._ended = threading.Event()  # the engine failed for good, or was stopped
        self._thread = threading.Thread(target=self._run, name="llmservice-engine", daemon=True)

    # --- public API (any thread) ---

    @property
    def ready(self) -> bool:
        return self.stage == "ready"

    @property
    def loaded(self) -> LoadedModel:
        if self._model is None:
            raise RuntimeError("model not loaded")
        return self._model

    @property
    def placement(self) -> Placement | None:
        """The cores the engine keeps to, once loaded (None: the kernel places it, and HTTP is not pinned)."""
        return self._placement

    @property
    def pool(self) -> BlockPool:
        if self._pool is None:
            raise RuntimeError("model not loaded")
        return self._pool

    def alive(self) -> bool:
        """Running (or stopped on purpose), and not stuck in one step for longer than `--step-timeout-seconds`."""
        began = self.step_clock.value
        hung = began > 0 and time.monotonic() - began > self._settings.step_timeout_seconds
        return (self._thread.is_alive() or self.stage == "stopped") and not hung

    def start(self) -> None:
        self._thread.start()

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Block until loading is over (ready or failed) or the engine stopped; never on the event loop."""
        return self._settled.wait(timeout)

    def wait_ended(self, timeout: float | None = None) -> bool:
        return self._ended.wait(timeout)

    def submit(self, request: GenerationRequest, sink: Sink) -> Ticket:
        ticket = Ticket(request, sink, self._wake)
        with self._cond:
            self._inbox.append(ticket)
            self._cond.notify()
        return ticket

    def abort_all(self, message: str) -> None:
        """Fail every request in the engine (drain deadline passed)."""
        with self._cond:
            self._abort_message = message
            self._cond.notify()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._settled.set()
        self._ended.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # --- the engine thread ---

    def _run(self) -> None:
        try:
            self._load()
        except Exception as exc:
            log.exception("Model load failed")
            self.error = f"{type(exc).__name__}: {exc}"
            self._set_stage("failed")
            self._fail_everything("internal", f"model failed to load: {self.error}")
            self._events_fed()
            return
        finally:
            self._settled.set()
        try:
            self._serve()
        except Exception as exc:
            log.exception("Engine loop crashed")
            self.error = f"{type(exc).__name__}: {exc}"
            self._fail_everything("internal", "internal error: the engine failed")
            self._events_fed()
            self._set_stage("failed")
        finally:
            self._fail_everything("shutdown", "server is shutting down")
            self._events_fed()
            if self.stage != "failed":
                self._set_stage("stopped")

    def _load(self) -> None:
        started = time.monotonic()
        if self._settings.load_delay_seconds:
            self._set_stage("delayed")
            with self._cond:
                self._cond.wait_for(lambda: self._stopping, timeout=self._settings.load_delay_seconds)
        self._set_stage("loading")
        self._model = self._loader(self._settings, self._set_stage)
        install(self._model.model)
        self._decoder = adopt(self._model.model) if self._settings.fused_forward else None
        log.info("Decoder forward", extra={"forward": "fused" if self._decoder is not None else "transformers"})
        plan = self._model.threads
        if plan is None or (self._placement is not None and not self._placement.suits(plan, self._settings.max_num_seqs)):
            self._placement = None  # a GPU, or decode steps on every core: the kernel places the threads
        self._set_stage("warming")
        self._allocate_kv()
        self._warm_up()
        if plan is not None:
            self._tuner = ThreadTuner(plan)
        self.load_seconds = time.monotonic() - started
        if self._metrics is not None:
            self._metrics.model_load_seconds.set(self.load_seconds)
        log.info("Model ready", extra={"load_seconds": round(self.load_seconds, 3)})
        self._set_stage("ready")

    def _events_fed(self) -> None:
        if self._after_events is not None:
            self._after_events()

    def _set_stage(self, stage: str) -> None:
        self.stage = stage
        if self._on_stage is not None:
            self._on_stage(stage)
        if stage == "failed":
            self._ended.set()

    # --- the K/V pool ---

    def _allocate_kv(self) -> None:
        """Size the pool (memory.py), refuse a context that cannot fit it, and allocate it: once."""
        loaded, settings = self.loaded, self._settings
        dtype = next(loaded.model.parameters()).dtype
        shape = kv_shape(loaded.model.config, dtype)
        if settings.kv_cache_mib:
            budget = settings.kv_cache_mib * MIB
        elif loaded.device.type == "cuda":
            budget = self._cuda_kv_budget(shape.block_bytes(BLOCK_TOKENS), dtype)
        else:
            limit, used = container_memory()
            budget = cpu_kv_budget(limit, used, available_memory())
        blocks = pool_blocks(budget, shape, BLOCK_TOKENS, max_num_seqs=settings.max_num_seqs, max_model_len=loaded.max_model_len)
        check_context_fits(blocks, shape, BLOCK_TOKENS, loaded.max_model_len)
        self._install_pool(blocks, dtype)
        log.info(
            "K/V cache allocated",
            extra={"blocks": blocks, "tokens": blocks * BLOCK_TOKENS, "mib": round(self._cache_or_fail().nbytes / MIB, 1)},
        )

    def _install_pool(self, blocks: int, dtype: torch.dtype) -> None:
        loaded, settings = self.loaded, self._settings
        shape = kv_shape(loaded.model.config, dtype)
        cache_blocks = min(blocks, settings.prefix_cache_mib * MIB // shape.block_bytes(BLOCK_TOKENS))
        self._pool = BlockPool(blocks, BLOCK_TOKENS, cache_blocks)
        self._cache = None  # the old pool goes before the new one is allocated
        self._cache = KVCache.allocate(shape, blocks, BLOCK_TOKENS, dtype, loaded.device)
        columns = -(-loaded.max_model_len // BLOCK_TOKENS) * BLOCK_TOKENS
        self._table = SlotTable.create(settings.max_num_seqs, columns, loaded.device)

    def _cuda_kv_budget(self, block_bytes: int, dtype: torch.dtype) -> int:
        """--gpu-memory-utilization of the GPU less the weights and the peak of the largest prompt step, measured."""
        device = self.loaded.device
        tokens = max(1, min(self._settings.prefill_chunk_tokens, self.loaded.max_model_len - 1))
        self._install_pool(-(-(tokens + 2) // BLOCK_TOKENS) + 1, dtype)  # just what the profiling step needs
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        self._generate([0] * tokens, 1)
        torch.cuda.synchronize(device)
        profiled = self._cache_or_fail().nbytes
        peak = torch.cuda.max_memory_allocated(device) - profiled
        self._cache, self._pool, self._table = None, None, None
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        others = max(0, total - free - torch.cuda.memory_reserved(device))  # the CUDA context, other processes
        budget = cuda_budget(total, peak + others, self._settings.gpu_memory_utilization)
        log.info("K/V cache budget measured", extra={"peak_mib": peak // MIB, "others_mib": others // MIB, "kv_mib": budget // MIB})
        return budget - budget % block_bytes

    def _cache_or_fail(self) -> KVCache:
        if self._cache is None:
            raise RuntimeError("model not loaded")
        return self._cache

    def _table_or_fail(self) -> SlotTable:
        if self._table is None:
            raise RuntimeError("model not loaded")
        return self._table

    def _warm_up(self) -> None:
        # One real generation through the batching path: first-call overheads are paid here,
        # and a model whose attention we cannot batch fails now instead of on a request.
        tokenizer = self.loaded.tokenizer
        ids = tokenizer("Hello", add_special_tokens=False).input_ids or [0]
        self._generate(list(ids), 2)

    def _generate(self, prompt: list[int], max_tokens: int) -> None:
        """Run one greedy request to its end on this thread (before serving), raising if it failed."""
        warm = GenerationRequest(prompts=[prompt], max_tokens=[max_tokens], params=SamplingParams(temperature=0.0))
        failures: list[Failed] = []
        self._waiting.append(Ticket(warm, lambda events: failures.extend(e for e in events if isinstance(e, Failed)), self._wake))
        metrics, self._metrics = self._metrics, None  # warm-up traffic is not user traffic
        try:
            while self._waiting or self._reading or self._rows:
                self._admit()
                self._step()
        finally:
            self._metrics = metrics
        if failures:
            raise RuntimeError(f"the warm-up generation failed: {failures[0].message}")

    def _serve(self) -> None:
        while True:
            with self._cond:
                if not self._rows and not self._reading and not self._waiting:
                    self._cond.wait_for(lambda: self._inbox or self._stopping or self._abort_message, timeout=1.0)
                if self._stopping:
                    return
                self._waiting.extend(self._inbox)
                self._inbox.clear()
                abort, self._abort_message = self._abort_message, None
            if abort is not None:
                self._fail_everything("shutdown", abort)
            try:
                self._expire()
                self._admit()
                self._publish_queue()
                if self._rows or self._reading:
                    self.step_clock.value = time.monotonic()
                    try:
                        self._step()
                    finally:
                        self.step_clock.value = 0.0
                    self._publish_queue()
            except Exception as exc:
                if poisoned(exc):
                    raise  # the device cannot be trusted any more: the engine fails, the server exits
                if isinstance(exc, torch.OutOfMemoryError) and self._rows_taken() > 1:
                    # Slower, not failed: fewer rows make the next step smaller.
                    log.warning("Out of memory in a step: preempting the youngest row")
                    self._preempt(self._youngest())
                else:
                    # One bad step fails the requests it involved, not the server: the engine
                    # thread goes on with an empty batch.
                    log.exception("Engine step failed: failing the running requests")
                    self._fail_running("internal", "internal error while generating")
            self._events_fed()

    # --- scheduling ---

    def _rows_taken(self) -> int:
        return len(self._rows) + sum(len(reading.rows) for reading in self._reading)

    def _expire(self) -> None:
        now = time.monotonic()
        involved = [row.active.ticket for row in self._rows] + [reading.ticket for reading in self._reading]
        involved += [item if isinstance(item, Ticket) else item.ticket for item in self._waiting]
        gone = {ticket for ticket in involved if ticket.cancelled or now > ticket.deadline}
        for ticket in gone:
            self._close(ticket, now, cancelled=ticket.cancelled)
        self._remove(gone)

    def _close(self, ticket: Ticket, now: float, *, cancelled: bool) -> None:
        if not cancelled:
            ticket.sink([Failed("timeout", f"request timed out after {ticket.request.timeout:g} s")])
        if self._metrics is not None:
            self._metrics.finished("abort", now - ticket.submitted)

    def _remove(self, tickets: set[Ticket]) -> None:
        """Take these requests out of the engine: waiting, being read, running; their blocks go back."""
        if not tickets:
            return
        kept: deque[Ticket | _Reading] = deque()
        for item in self._waiting:
            if (item if isinstance(item, Ticket) else item.ticket) not in tickets:
                kept.append(item)
        self._waiting = kept
        for reading in [reading for reading in self._reading if reading.ticket in tickets]:
            self._reading.remove(reading)
            self._release_reading(reading)
        self._retire({i for i, row in enumerate(self._rows) if row.active.ticket in tickets})

    def _admit(self) -> None:
        """Start reading waiting work, oldest first, while rows, the read budget and free blocks allow."""
        pool = self.pool
        room = self._settings.max_num_seqs - self._rows_taken()
        budget = PREFILL_TOKEN_BUDGET - sum(reading.length - reading.read for reading in self._reading)
        while self._waiting:
            head = self._waiting[0]
            if isinstance(head, Ticket):
                request = head.request
                rows, cost = request.rows, sum(len(p) for p in request.prompts)
                remainder = [len(p) % BLOCK_TOKENS != 0 for p in request.prompts]
                need = sum(pool.blocks_for(len(p)) for p in request.prompts) + (request.n - 1) * sum(remainder)
            else:
                rows, cost, need = len(head.rows), head.length - head.read, head.blocks_needed(BLOCK_TOKENS)
            if need > pool.total:  # could never be admitted: fail it rather than wait forever
                ticket = head if isinstance(head, Ticket) else head.ticket
                self._remove({ticket})
                self._fail([ticket], "internal", f"the request needs {need} K/V blocks; the cache has {pool.total}")
                continue
            if rows > room or (self._reading and cost > budget) or need > pool.available:
                break
            self._waiting.popleft()
            room -= rows
            budget -= cost
            for reading in self._readings_of(head) if isinstance(head, Ticket) else [head]:
                self._start_reading(reading)

    def _readings_of(self, ticket: Ticket) -> list[_Reading]:
        """A newcomer's prompts, each with its n rows."""
        request, loaded = ticket.request, self.loaded
        cost = sum(len(p) for p in request.prompts)
        active = _Active(ticket, rows_left=request.rows, prompt_tokens=cost)
        if self._metrics is not None:
            self._metrics.scheduled(time.monotonic() - ticket.submitted, cost)
        readings = []
        for p_index, prompt in enumerate(request.prompts):
            rows = []
            for i in range(request.n):
                index = p_index * request.n + i
                # torch takes seeds in [-2**63, 2**64); wrapping keeps seed + index in range.
                seed = None if request.params.seed is None else (request.params.seed + index) % 2**64
                sampler = RowSampler.create(request.params, loaded.vocab_size, seed)
                detok = IncrementalDetokenizer(loaded.tokenizer, prompt)
                rows.append(_Row(active, index, prompt, request.max_tokens[p_index], sampler, detok, StopMatcher(request.stop)))
            readings.append(_Reading(ticket, prompt, rows))
        return readings

    def _start_reading(self, reading: _Reading) -> None:
        """Give a reading its blocks (cached ones first: reading starts after them) and its place in line."""
        pool, cache = self.pool, self._cache_or_fail()
        reading.admitted = next(self._admissions)
        for row in reading.rows:
            row.admitted = reading.admitted
        reading.blocks = pool.lookup(reading.ids)
        reading.read = len(reading.blocks) * BLOCK_TOKENS
        if not reading.resumed:
            reading.rows[0].active.cached_tokens += reading.read
            if self._metrics is not None:
                self._metrics.prefix_cache_lookup(reading.length, reading.read)
        while len(reading.blocks) < pool.blocks_for(reading.length):
            reading.blocks.append(self._allocated())
        if reading.length % BLOCK_TOKENS:
            reading.copies = [self._allocated() for _ in reading.rows[1:]]
        reading.slots = cache.slots(reading.blocks, reading.length).to(self.loaded.device)
        reading.tokens = torch.tensor(reading.ids, dtype=torch.long)
        self._reading.append(reading)

    def _allocated(self) -> int:
        block = self.pool.allocate()
        if block is None:  # admission counted the blocks: this is a bug, not a full pool
            raise RuntimeError("the K/V pool ran out of blocks admission had counted")
        return block

    def _release_reading(self, reading: _Reading) -> None:
        self.pool.release(reading.blocks)
        self.pool.release(reading.copies)
        reading.blocks, reading.copies, reading.slots, reading.read = [], [], None, 0

    def _youngest(self) -> _Row | _Reading:
        """The most recently admitted row or prompt being read: the first to preempt."""
        candidates: list[_Row | _Reading] = [*self._rows, *self._reading]
        return max(candidates, key=lambda item: item.admitted)

    def _preempt(self, victim: _Row | _Reading) -> None:
        """Give back `victim`'s blocks and put it at the head of the queue, to be read again from the start."""
        if isinstance(victim, _Reading):
            self._reading.remove(victim)
            self._release_reading(victim)
            self._waiting.appendleft(victim)
        else:
            index = self._rows.index(victim)
            history = victim.history()  # its K/V's tokens and the one it feeds next
            self._retire({index})
            self._waiting.appendleft(_Reading(victim.active.ticket, history, [victim], resumed=True))
        if self._metrics is not None:
            self._metrics.preemptions.inc()
        ticket = victim.ticket if isinstance(victim, _Reading) else victim.active.ticket
        log.debug("Preempted", extra={"request_id": ticket.request.request_id})

    def _grow(self) -> None:
        """Give each running row whose blocks are full a new block for the token it writes this step,
        oldest rows first, preempting the youngest when the pool has none."""
        full = [row for row in self._rows if row.length == len(row.blocks) * BLOCK_TOKENS]
        if not full:
            return
        pool, cache, table = self.pool, self._cache_or_fail(), self._table_or_fail()
        for row in sorted(full, key=lambda r: r.admitted):
            if not any(r is row for r in self._rows):
                continue  # preempted for an older row in this loop
            block = pool.allocate()
            while block is None:
                victim = self._youngest()
                self._preempt(victim)
                if victim is row:
                    break
                block = pool.allocate()
            if block is not None:
                table.set(self._rows.index(row), len(row.blocks) * BLOCK_TOKENS, cache.block_slots(block))
                row.blocks.append(block)

    def _plan_chunks(self) -> list[tuple[_Reading, int, int]]:
        """The prompt tokens this step reads: oldest prompts first, `prefill_chunk_tokens` in all."""
        budget = max(1, self._settings.prefill_chunk_tokens)
        plan: list[tuple[_Reading, int, int]] = []
        for reading in self._reading:
            if budget <= 0:
                break
            start = reading.read
            end = min(reading.length, start + budget)
            plan.append((reading, start, end))
            budget -= end - start
        return plan

    # --- one engine step ---

    def _step(self) -> None:
        """One forward: every running row's next token and the next prompt chunks; then sample."""
        self._grow()
        plan = self._plan_chunks()
        if not self._rows and not plan:
            return
        try:
            logits = self._forward(plan)
        except UnsupportedModel:
            raise  # not this request's fault: the model cannot be served (found at warm-up)
        except Exception as exc:
            if not plan or poisoned(exc) or isinstance(exc, torch.OutOfMemoryError):
                raise  # the running rows' step itself failed, or the device did: the caller decides
            # Fail only the newcomers whose prompts were in it: the running rows' K/V writes go to
            # fixed slots, so their part of the step can be run again on its own.
            log.exception("Reading a prompt failed: failing the new requests", extra={"requests": len(plan)})
            failed = {reading.ticket for reading, _, _ in plan}
            self._remove(failed)
            self._fail(list(failed), "internal", "internal error while reading the prompt")
            if not self._rows:
                return
            plan = []
            logits = self._forward(plan)
        running = len(self._rows)
        for row in self._rows:
            row.length += 1
        joining: list[_Row] = []
        picks = list(range(running))  # logits row of each row that samples this step
        logit_row = running
        for reading, _, end in plan:
            reading.read = end
            if end == reading.length:
                self._join(reading)
                joining += reading.rows
                picks += [logit_row] * len(reading.rows)
                logit_row += 1
        self._reading = [reading for reading in self._reading if reading.read < reading.length]
        if picks:
            index = torch.tensor(picks, dtype=torch.long, device=logits.device)
            self._advance(logits[index], self._rows[:running] + joining)

    def _forward(self, plan: list[tuple[_Reading, int, int]]) -> torch.Tensor:
        """Run the model over the packed step; the logits of each running row, then of each prompt read to its end."""
        loaded = self.loaded
        device = loaded.device
        rows = self._rows
        count = len(rows)
        lengths = torch.tensor([row.length for row in rows], dtype=torch.long)
        ids = [torch.tensor([row.next_token for row in rows], dtype=torch.long)]
        positions = [lengths]
        kv_len = max((row.length for row in rows), default=0) + 1
        table = self._table_or_fail().table
        row_columns = lengths.to(device)
        row_slots = table[:count, :kv_len]
        writes = [table[torch.arange(count, device=device), row_columns]] if count else []
        chunks: list[Chunk] = []
        offset = count
        keep = list(range(count))
        for reading, start, end in plan:
            assert reading.slots is not None and reading.tokens is not None
            chunks.append(Chunk(start, end, offset, reading.slots[:end]))
            writes.append(reading.slots[start:end])
            ids.append(reading.tokens[start:end])
            positions.append(torch.arange(start, end, dtype=torch.long))
            offset += end - start
            if end == reading.length:
                keep.append(offset - 1)
        uniform = all(row.length == kv_len - 1 for row in rows)
        step = RaggedStep(self._cache_or_fail(), count, row_columns, row_slots, torch.cat(writes), kv_len, uniform, chunks)
        threads = self._step_threads(offset)
        started = time.perf_counter()
        input_ids, position_ids = torch.cat(ids).to(device), torch.cat(positions).to(device)
        kept = torch.tensor(keep or [0], dtype=torch.long, device=device)
        with torch.inference_mode():
            if self._decoder is not None:
                logits = self._decoder(input_ids, position_ids, step, kept)
            else:
                out = loaded.model(
                    input_ids=input_ids[None], position_ids=position_ids[None], use_cache=False, logits_to_keep=kept, ragged=step
                )
                logits = out.logits[0]
        if self._tuner is not None and threads is not None:
            self._tuner.record(offset, threads, time.perf_counter() - started)
        layers = len(self._cache_or_fail().keys)
        if step.calls != layers:
            raise UnsupportedModel(f"the model made {step.calls} attention calls for {layers} layers: not all of it is batched")
        return logits

    def _step_threads(self, tokens: int) -> int | None:
        """Set torch's threads for a step of `tokens`: the tuner's choice once serving, the plan's while
        warming up (first calls are not what steps cost); None leaves them (a GPU)."""
        plan = self.loaded.threads
        if plan is None:
            return None
        threads = self._tuner.choose(tokens) if self._tuner is not None else plan.for_step(tokens)
        if threads != self._threads:  # cheap calls, but only a change needs them
            # Cores first: torch's worker threads, started at the first step on more than one,
            # take the cores of the thread that starts them. Refused once: not tried again.
            if self._placement is not None and not pin_thread(self._placement.for_step(threads)):
                self._placement = None
            torch.set_num_threads(threads)
            self._threads = threads
        return threads

    def _join(self, reading: _Reading) -> None:
        """A fully read prompt's rows join the batch: the first holds its blocks, the others share its
        full blocks and copy its partial last one; its full blocks become findable in the prefix cache."""
        pool, cache, table = self.pool, self._cache_or_fail(), self._table_or_fail()
        first = len(self._rows)
        table.ensure_rows(first + len(reading.rows))
        pool.register(reading.ids, reading.blocks)
        copies = iter(reading.copies)
        for i, row in enumerate(reading.rows):
            blocks = list(reading.blocks)
            if i > 0:
                for block in blocks:
                    pool.share(block)
                if reading.length % BLOCK_TOKENS:
                    pool.release([blocks[-1]])
                    blocks[-1] = next(copies)
                    cache.copy_block(reading.blocks[-1], blocks[-1])
            row.blocks = blocks
            row.length = reading.length
            table.set(first + i, 0, cache.slots(blocks, len(blocks) * BLOCK_TOKENS))
        reading.blocks, reading.copies = [], []
        self._rows.extend(reading.rows)

    def _retire(self, finished: set[int]) -> None:
        """Drop rows by index, their blocks back to the pool (full ones stay findable in the prefix cache);
        the last rows move into the freed places of the slot table."""
        if not finished:
            return
        rows, pool = self._rows, self.pool
        for i in finished:
            row = rows[i]
            pool.register(row.history()[: row.length], row.blocks)
            pool.release(row.blocks)
            row.blocks = []
        kept = len(rows) - len(finished)
        holes = sorted(i for i in finished if i < kept)
        movers = [i for i in range(kept, len(rows)) if i not in finished]
        if movers:
            self._table_or_fail().move(movers, holes)
            for hole, mover in zip(holes, movers, strict=True):
                rows[hole] = rows[mover]
        del rows[kept:]

    def _advance(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """Choose the next token of `rows` (one logits row each), emit text, retire finished rows."""
        choices = select_tokens(logits, [row.sampler for row in rows])
        now = time.monotonic()
        events: dict[Ticket, list[Event]] = {}
        finished: set[_Row] = set()
        for row, choice in zip(rows, choices, strict=True):
            row.next_token = choice.token
            row.tokens.append(choice.token)
            out = events.setdefault(row.active.ticket, [])
            if self._emit(row, choice, now, out):
                finished.add(row)
        if self._metrics is not None:
            self._metrics.generation_tokens.inc(len(rows))
        for ticket, ticket_events in events.items():
            if ticket_events:
                ticket.sink(ticket_events)
        if finished:
            self._retire({i for i, row in enumerate(self._rows) if row in finished})

    def _emit(self, row: _Row, choice: Choice, now: float, out: list[Event]) -> bool:
        loaded = self.loaded
        active = row.active
        row.generated += 1
        active.completion_tokens += 1
        self._observe_token(row, now)
        reason: FinishReason | None = None
        if choice.token in loaded.eos_token_ids:
            reason = "stop"
            text = row.stopper.push(row.detok.flush()) + row.stopper.finish()
        else:
            text = row.stopper.push(row.detok.add(choice.token))
            if row.stopper.stopped:
                reason = "stop"
            elif row.generated >= row.max_tokens or row.prompt_len + row.generated >= loaded.max_model_len:
                reason = "length"
                text += row.stopper.push(row.detok.flush()) + row.stopper.finish()
        infos = [self._token_info(choice)] if choice.logprob is not None else []
        if text or infos:
            out.append(Delta(row.index, text, infos))
        if reason is None:
            return False
        out.append(Finished(row.index, reason, row.generated))
        active.reasons.add(reason)
        active.rows_left -= 1
        if active.rows_left == 0:
            out.append(Done(active.prompt_tokens, active.completion_tokens, active.cached_tokens))
            if self._metrics is not None:
                self._metrics.finished("length" if "length" in active.reasons else "stop", now - active.ticket.submitted)
        return True

    def _observe_token(self, row: _Row, now: float) -> None:
        metrics = self._metrics
        if metrics is not None:
            if row.active.first_token_at is None:
                metrics.time_to_first_token.observe(now - row.active.ticket.submitted)
            elif row.generated > 1:
                metrics.inter_token_latency.observe(now - row.last_token_at)
        if row.active.first_token_at is None:
            row.active.first_token_at = now
        row.last_token_at = now

    def _token_info(self, choice: Choice) -> TokenInfo:
        tokenizer = self.loaded.tokenizer

        def text(token: int) -> str:
            return str(tokenizer.decode([token]))

        return TokenInfo(
            token=text(choice.token),
            logprob=float(choice.logprob or 0.0),
            top=[(text(token), logprob) for token, logprob in choice.top],
        )

    # --- bookkeeping ---

    def _publish_queue(self) -> None:
        if self._metrics is not None:
            running = {row.active.ticket for row in self._rows} | {reading.ticket for reading in self._reading}
            waiting = {item if isinstance(item, Ticket) else item.ticket for item in self._waiting} - running
            self._metrics.set_queue(running=len(running), waiting=len(waiting) + len(self._inbox))
            if self._pool is not None:
                self._metrics.kv_cache_usage.set(self._pool.usage())

    def _fail_everything(self, kind: FailureKind, message: str) -> None:
        with self._cond:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        self._fail_running(kind, message, waiting_too=True)

    def _fail_running(self, kind: FailureKind, message: str, *, waiting_too: bool = False) -> None:
        """Fail every request in the batch or being read (those not already done), with their preempted
        rows; with `waiting_too`, every waiting request as well. Each is told once."""
        unfinished = dict.fromkeys(row.active.ticket for row in self._rows if row.active.rows_left > 0)
        unfinished.update(dict.fromkeys(reading.ticket for reading in self._reading))
        for item in self._waiting:
            ticket = item if isinstance(item, Ticket) else item.ticket
            if waiting_too or (isinstance(item, _Reading) and ticket in unfinished):
                unfinished[ticket] = None
        if self._pool is not None:
            self._remove(set(unfinished))
        else:
            self._rows, self._reading = [], []
            self._waiting = deque(item for item in self._waiting if not waiting_too and isinstance(item, Ticket))
        self._fail(list(unfinished), kind, message)
        self._publish_queue()

    def _fail(self, tickets: list[Ticket], kind: FailureKind, message: str) -> None:
        now = time.monotonic()
        for ticket in tickets:
            ticket.sink([Failed(kind, message)])
            if self._metrics is not None:
                self._metrics.finished("abort", now - ticket.submitted)
