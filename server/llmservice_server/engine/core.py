"""The engine's core: the thread that owns the model, its loop, and what it tells each request.

It loads the model, sizes and allocates the K/V pool, warms up, then loops: take new requests,
expire the cancelled and timed out, let the scheduler admit work, run one step (scheduler, then
runner, then sampling), and feed each request's sink its events. Failures are placed here: a
newcomer's failing prompt fails that request, an out-of-memory step preempts, a poisoned device
fails the engine (see the package doc for the picture).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..backend import StepClock
from ..constraints import Constraint, Grammars, InvalidGrammar
from ..decoder import adopt
from ..events import Delta, Done, Event, Failed, FailureKind, Finished, FinishReason, GenerationRequest, SamplingParams, Sink, TokenInfo
from ..loader import LoadedModel, kv_shape, load
from ..memory import MIB, available_memory, check_context_fits, container_memory, cpu_kv_budget, cuda_budget, pool_blocks
from ..metrics import Metrics
from ..placement import Placement
from ..ragged import UnsupportedModel, install
from ..sampling import Choice, RowSampler, select_tokens
from ..settings import Settings
from ..startup import StageClock
from ..textstream import IncrementalDetokenizer, StopMatcher
from ..threads import ThreadTuner
from .kv_blocks import BLOCK_TOKENS, BlockPool
from .kv_cache import BlockTable, KVCache
from .requests import Active, Reading, Row, Ticket
from .runner import Runner
from .scheduler import Scheduler

log = logging.getLogger(__name__)

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
        self._placement = placement  # the cores the runner may keep to (None: the kernel's choice)
        self._on_stage = on_stage  # told every stage change, after `error` / `load_seconds` are set
        self._after_events = after_events  # on this thread, once the sinks of a step (or of the final failures) were fed
        self._metrics = metrics
        self._loader = loader
        self._cond = threading.Condition()
        self._inbox: deque[Ticket] = deque()
        self._scheduler: Scheduler | None = None  # with the K/V pool, once the model is loaded
        self._runner: Runner | None = None
        self.step_clock: StepClock = step_clock if step_clock is not None else _Clock()
        self._stopping = False
        self._abort_message: str | None = None
        self._model: LoadedModel | None = None
        self.stage = "starting"
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.stages = StageClock()  # seconds per start-up phase, for /startupz
        self._grammars: Grammars | None = None  # from the first constrained request (response_format, tool_choice)
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
        return self._runner.placement if self._runner is not None else self._placement

    @property
    def scheduler(self) -> Scheduler:
        if self._scheduler is None:
            raise RuntimeError("model not loaded")
        return self._scheduler

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            raise RuntimeError("model not loaded")
        return self._runner

    @property
    def pool(self) -> BlockPool:
        return self.scheduler.pool

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
        decoder = adopt(self._model.model) if self._settings.fused_forward else None
        log.info("Decoder forward", extra={"forward": "fused" if decoder is not None else "transformers"})
        plan = self._model.threads
        placement = self._placement
        if plan is None or (placement is not None and not placement.suits(plan, self._settings.max_num_seqs)):
            placement = None  # a GPU, or decode steps on every core: the kernel places the threads
        self._runner = Runner(self._model, decoder, placement)
        self._set_stage("warming")
        self._allocate_kv()
        self._warm_up()
        if plan is not None:
            self._runner.tuner = ThreadTuner(plan)
        self.load_seconds = time.monotonic() - started
        if self._metrics is not None:
            self._metrics.model_load_seconds.set(self.load_seconds)
        log.info("Model ready", extra={"load_seconds": round(self.load_seconds, 3)})
        self._set_stage("ready")

    def _events_fed(self) -> None:
        if self._after_events is not None:
            self._after_events()

    def _set_stage(self, stage: str) -> None:
        self.stages.mark(stage)
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
            extra={"blocks": blocks, "tokens": blocks * BLOCK_TOKENS, "mib": round(self.scheduler.cache.nbytes / MIB, 1)},
        )

    def _install_pool(self, blocks: int, dtype: torch.dtype) -> None:
        loaded, settings = self.loaded, self._settings
        shape = kv_shape(loaded.model.config, dtype)
        cache_blocks = min(blocks, settings.prefix_cache_mib * MIB // shape.block_bytes(BLOCK_TOKENS))
        self._scheduler = None  # the old pool goes before the new one is allocated
        cache = KVCache.allocate(shape, blocks, BLOCK_TOKENS, dtype, loaded.device)
        table = BlockTable.create(settings.max_num_seqs, -(-loaded.max_model_len // BLOCK_TOKENS), loaded.device)
        self._scheduler = Scheduler(settings, BlockPool(blocks, BLOCK_TOKENS, cache_blocks), cache, table, self._metrics)

    def _cuda_kv_budget(self, block_bytes: int, dtype: torch.dtype) -> int:
        """--gpu-memory-utilization of the GPU less the weights and the peak of the largest prompt step, measured."""
        device = self.loaded.device
        tokens = max(1, min(self._settings.prefill_chunk_tokens, self.loaded.max_model_len - 1))
        self._install_pool(-(-(tokens + 2) // BLOCK_TOKENS) + 1, dtype)  # just what the profiling step needs
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        self._generate([0] * tokens, 1)
        torch.cuda.synchronize(device)
        profiled = self.scheduler.cache.nbytes
        peak = torch.cuda.max_memory_allocated(device) - profiled
        self._scheduler = None
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(device)
        others = max(0, total - free - torch.cuda.memory_reserved(device))  # the CUDA context, other processes
        budget = cuda_budget(total, peak + others, self._settings.gpu_memory_utilization)
        log.info("K/V cache budget measured", extra={"peak_mib": peak // MIB, "others_mib": others // MIB, "kv_mib": budget // MIB})
        return budget - budget % block_bytes

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
        scheduler = self.scheduler
        scheduler.waiting.append(Ticket(warm, lambda events: failures.extend(e for e in events if isinstance(e, Failed)), self._wake))
        metrics, self._metrics = self._metrics, None  # warm-up traffic is not user traffic
        scheduler.metrics = None
        try:
            while scheduler.busy():
                self._admit()
                self._step()
        finally:
            self._metrics = scheduler.metrics = metrics
        if failures:
            raise RuntimeError(f"the warm-up generation failed: {failures[0].message}")

    def _serve(self) -> None:
        scheduler = self.scheduler
        while True:
            with self._cond:
                if not scheduler.busy():
                    self._cond.wait_for(lambda: self._inbox or self._stopping or self._abort_message, timeout=1.0)
                if self._stopping:
                    return
                scheduler.waiting.extend(self._inbox)
                self._inbox.clear()
                abort, self._abort_message = self._abort_message, None
            if abort is not None:
                self._fail_everything("shutdown", abort)
            try:
                self._expire()
                self._admit()
                self._publish_queue()
                if scheduler.rows or scheduler.reading:
                    self.step_clock.value = time.monotonic()
                    try:
                        self._step()
                    finally:
                        self.step_clock.value = 0.0
                    self._publish_queue()
            except Exception as exc:
                if poisoned(exc):
                    raise  # the device cannot be trusted any more: the engine fails, the server exits
                if isinstance(exc, torch.OutOfMemoryError) and scheduler.rows_taken() > 1:
                    # Slower, not failed: fewer rows make the next step smaller.
                    log.warning("Out of memory in a step: preempting the youngest row")
                    scheduler.preempt(scheduler.youngest())
                else:
                    # One bad step fails the requests it involved, not the server: the engine
                    # thread goes on with an empty batch.
                    log.exception("Engine step failed: failing the running requests")
                    self._fail_running("internal", "internal error while generating")
            self._events_fed()

    # --- scheduling ---

    def _expire(self) -> None:
        now = time.monotonic()
        scheduler = self.scheduler
        involved = [row.active.ticket for row in scheduler.rows] + [reading.ticket for reading in scheduler.reading]
        involved += [item if isinstance(item, Ticket) else item.ticket for item in scheduler.waiting]
        gone = {ticket for ticket in involved if ticket.cancelled or now > ticket.deadline}
        for ticket in gone:
            self._close(ticket, now, cancelled=ticket.cancelled)
        scheduler.remove(gone)

    def _admit(self) -> None:
        for ticket, message in self.scheduler.admit(self._readings_of):
            self._fail([ticket], "internal", message)

    def _close(self, ticket: Ticket, now: float, *, cancelled: bool) -> None:
        if not cancelled:
            ticket.sink([Failed("timeout", f"request timed out after {ticket.request.timeout:g} s")])
        if self._metrics is not None:
            self._metrics.finished("abort", now - ticket.submitted)

    def _readings_of(self, ticket: Ticket) -> list[Reading]:
        """A newcomer's prompts, each with its n rows; none when the newcomer itself fails (it is told)."""
        try:
            constraints = self._constraints(ticket.request)
            return self._rows_of(ticket, constraints)
        except InvalidGrammar as exc:
            self._fail([ticket], "invalid", f"the schema cannot be used for constrained decoding: {exc}")
        except Exception:  # the grammar library, the tokenizer: this request fails, not the batch
            log.exception("Setting up a new request failed: failing it")
            self._fail([ticket], "internal", "internal error while setting up the request")
        return []

    def _rows_of(self, ticket: Ticket, constraints: list[Constraint | None]) -> list[Reading]:
        request, loaded = ticket.request, self.loaded
        cost = sum(len(p) for p in request.prompts)
        active = Active(ticket, rows_left=request.rows, prompt_tokens=cost)
        if self._metrics is not None:
            self._metrics.scheduled(time.monotonic() - ticket.submitted, cost)
        params = request.params
        readings = []
        for p_index, prompt in enumerate(request.prompts):
            rows = []
            for i in range(request.n):
                index = p_index * request.n + i
                # torch takes seeds in [-2**63, 2**64); wrapping keeps seed + index in range.
                seed = None if params.seed is None else (params.seed + index) % 2**64
                sampler = RowSampler.create(
                    params, loaded.vocab_size, seed, prompt=prompt, stop_tokens=loaded.eos_token_ids, constraint=constraints[index]
                )
                detok = IncrementalDetokenizer(loaded.tokenizer, prompt, skip_special_tokens=params.skip_special_tokens)
                stopper = StopMatcher(request.stop, include_stop=params.include_stop_str_in_output)
                rows.append(Row(active, index, prompt, request.max_tokens[p_index], sampler, detok, stopper))
            readings.append(Reading(ticket, prompt, rows))
        return readings

    def _constraints(self, request: GenerationRequest) -> list[Constraint | None]:
        """Each row's grammar state (None for every row of an unconstrained request)."""
        grammar = request.params.grammar
        if grammar is None:
            return [None] * request.rows
        if self._grammars is None:
            loaded = self.loaded
            self._grammars = Grammars(loaded.tokenizer, loaded.vocab_size, loaded.eos_token_ids)
        grammars = self._grammars
        return [grammars.constraint(grammar) for _ in range(request.rows)]

    # --- one engine step ---

    def _step(self) -> None:
        """One forward: every running row's next token and the next prompt chunks; then sample."""
        scheduler, runner = self.scheduler, self.runner
        scheduler.grow()
        plan = scheduler.plan_chunks()
        if not scheduler.rows and not plan:
            return
        try:
            logits = runner.forward(scheduler, plan)
        except UnsupportedModel:
            raise  # not this request's fault: the model cannot be served (found at warm-up)
        except Exception as exc:
            if not plan or poisoned(exc) or isinstance(exc, torch.OutOfMemoryError):
                raise  # the running rows' step itself failed, or the device did: the caller decides
            # Fail only the newcomers whose prompts were in it: the running rows' K/V writes go to
            # fixed slots, so their part of the step can be run again on its own.
            log.exception("Reading a prompt failed: failing the new requests", extra={"requests": len(plan)})
            failed = {reading.ticket for reading, _, _ in plan}
            scheduler.remove(failed)
            self._fail(list(failed), "internal", "internal error while reading the prompt")
            if not scheduler.rows:
                return
            plan = []
            logits = runner.forward(scheduler, plan)
        running = len(scheduler.rows)
        for row in scheduler.rows:
            row.length += 1
        joining: list[Row] = []
        picks = list(range(running))  # logits row of each row that samples this step
        logit_row = running
        for reading, _, end in plan:
            reading.read = end
            if end == reading.length:
                scheduler.join(reading)
                joining += reading.rows
                picks += [logit_row] * len(reading.rows)
                logit_row += 1
        scheduler.reading = [reading for reading in scheduler.reading if reading.read < reading.length]
        if picks:
            index = torch.tensor(picks, dtype=torch.long, device=logits.device)
            self._advance(logits[index], scheduler.rows[:running] + joining)

    def _advance(self, logits: torch.Tensor, rows: list[Row]) -> None:
        """Choose the next token of `rows` (one logits row each), emit text, retire finished rows."""
        choices = select_tokens(logits, [row.sampler for row in rows])
        now = time.monotonic()
        events: dict[Ticket, list[Event]] = {}
        finished: set[Row] = set()
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
            scheduler = self.scheduler
            scheduler.retire({i for i, row in enumerate(scheduler.rows) if row in finished})

    def _emit(self, row: Row, choice: Choice, now: float, out: list[Event]) -> bool:
        loaded = self.loaded
        active = row.active
        row.generated += 1
        active.completion_tokens += 1
        self._observe_token(row, now)
        reason: FinishReason | None = None
        params = row.sampler.params
        token = choice.token
        # min_tokens: the sampler held the stop tokens back; stop strings are not looked for yet either.
        matching = row.generated >= params.min_tokens
        grammar_done = row.sampler.constraint is not None and row.sampler.constraint.terminated
        if (token in loaded.eos_token_ids and not params.ignore_eos) or grammar_done:
            reason = "stop"
            text = row.stopper.push(row.detok.flush()) + row.stopper.finish()
        elif token in params.stop_token_ids:
            reason = "stop"
            added = row.detok.add(token) if params.include_stop_str_in_output else ""
            text = row.stopper.push(added + row.detok.flush()) + row.stopper.finish()
        else:
            text = row.stopper.push(row.detok.add(token), match=matching)
            if row.stopper.stopped:
                reason = "stop"
            elif row.generated >= row.max_tokens or row.prompt_len + row.generated >= loaded.max_model_len:
                reason = "length"
                text += row.stopper.push(row.detok.flush(), match=matching) + row.stopper.finish()
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

    def _observe_token(self, row: Row, now: float) -> None:
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
        scheduler = self._scheduler
        if self._metrics is not None and scheduler is not None:
            running = {row.active.ticket for row in scheduler.rows} | {reading.ticket for reading in scheduler.reading}
            waiting = {item if isinstance(item, Ticket) else item.ticket for item in scheduler.waiting} - running
            self._metrics.set_queue(running=len(running), waiting=len(waiting) + len(self._inbox))
            self._metrics.kv_cache_usage.set(scheduler.pool.usage())

    def _fail_everything(self, kind: FailureKind, message: str) -> None:
        with self._cond:
            inbox = list(self._inbox)
            self._inbox.clear()
        if self._scheduler is None:  # the model never loaded: nothing was admitted
            self._fail(inbox, kind, message)
            return
        self._scheduler.waiting.extend(inbox)
        self._fail_running(kind, message, waiting_too=True)

    def _fail_running(self, kind: FailureKind, message: str, *, waiting_too: bool = False) -> None:
        """Fail every request in the batch or being read (those not already done), with their preempted
        rows; with `waiting_too`, every waiting request as well. Each is told once."""
        scheduler = self.scheduler
        unfinished = dict.fromkeys(row.active.ticket for row in scheduler.rows if row.active.rows_left > 0)
        unfinished.update(dict.fromkeys(reading.ticket for reading in scheduler.reading))
        for item in scheduler.waiting:
            ticket = item if isinstance(item, Ticket) else item.ticket
            if waiting_too or (isinstance(item, Reading) and ticket in unfinished):
                unfinished[ticket] = None
        scheduler.remove(set(unfinished))
        self._fail(list(unfinished), kind, message)
        self._publish_queue()

    def _fail(self, tickets: list[Ticket], kind: FailureKind, message: str) -> None:
        now = time.monotonic()
        for ticket in tickets:
            ticket.sink([Failed(kind, message)])
            if self._metrics is not None:
                self._metrics.finished("abort", now - ticket.submitted)
