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

A newcomer's prompt is looked up in the prefix cache (`prefix_cache.py`) when it is admitted: the
K/V of its longest cached beginning are copied into its buffer and reading starts after them.
Every prompt read to its end leaves its blocks in the cache for the next ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .decoder import FusedDecoder, adopt
from .events import Delta, Done, Event, Failed, FailureKind, Finished, FinishReason, GenerationRequest, SamplingParams, Sink, TokenInfo
from .loader import LoadedModel, load
from .metrics import Metrics
from .placement import Placement, pin_thread
from .prefix_cache import PrefixCache
from .ragged import Chunk, PromptKV, RaggedStep, Slots, UnsupportedModel, install
from .sampling import Choice, RowSampler, select_tokens
from .settings import Settings
from .textstream import IncrementalDetokenizer, StopMatcher
from .threads import ThreadTuner

log = logging.getLogger(__name__)

PREFILL_TOKEN_BUDGET = 8192  # prompt tokens being read at once (bounds their K/V buffers)


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
    prompt_len: int
    max_tokens: int
    sampler: RowSampler
    detok: IncrementalDetokenizer
    stopper: StopMatcher
    length: int = 0  # tokens in its KV slot
    next_token: int = 0  # fed in the next step
    generated: int = 0
    last_token_at: float = 0.0


@dataclass(eq=False)
class _Reading:
    """One prompt of a newcomer, read a chunk per step; its rows join the batch when it is through."""

    ticket: Ticket
    ids: list[int]  # the prompt's tokens: its blocks' keys in the prefix cache
    prompt: PromptKV
    rows: list[_Row]  # n of them: choices of one prompt share its K/V


class Engine:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        loader: Callable[[Settings, Callable[[str], None]], LoadedModel] = load,
        on_stage: Callable[[str], None] | None = None,
        after_events: Callable[[], None] | None = None,
        placement: Placement | None = None,
    ) -> None:
        self._settings = settings
        self._placement = placement  # the engine thread's cores per step's threads; None: the kernel's choice
        self._on_stage = on_stage  # told every stage change, after `error` / `load_seconds` are set
        self._after_events = after_events  # on this thread, once the sinks of a step (or of the final failures) were fed
        self._metrics = metrics
        self._loader = loader
        self._cond = threading.Condition()
        self._inbox: deque[Ticket] = deque()
        self._waiting: deque[Ticket] = deque()
        self._rows: list[_Row] = []  # the running batch: row i's K/V is in slot i
        self._reading: list[_Reading] = []  # newcomers' prompts, oldest first
        self._slots: Slots | None = None
        self._decoder: FusedDecoder | None = None  # the engine's own forward, for the architectures it knows
        self._threads = 0  # torch's CPU threads as last set by a step (0: not yet)
        self._tuner: ThreadTuner | None = None  # from the first served step: warm-up times are not representative
        self._prefix_cache: PrefixCache | None = None  # from the first served request: warm-up prompts are not traffic
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

    def alive(self) -> bool:
        return self._thread.is_alive() or self.stage == "stopped"

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
        self._slots = Slots(layers=self._model.model.config.num_hidden_layers, max_rows=self._settings.max_num_seqs)
        plan = self._model.threads
        if plan is None or (self._placement is not None and not self._placement.suits(plan, self._settings.max_num_seqs)):
            self._placement = None  # a GPU, or decode steps on every core: the kernel places the threads
        self._set_stage("warming")
        self._warm_up()
        if plan is not None:
            self._tuner = ThreadTuner(plan)
        if self._settings.prefix_cache_mib > 0:
            self._prefix_cache = PrefixCache(self._settings.prefix_cache_mib * 2**20)
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

    def _warm_up(self) -> None:
        # One real generation through the batching path: first-call overheads are paid here,
        # and a model whose attention we cannot batch fails now instead of on a request.
        tokenizer = self.loaded.tokenizer
        ids = tokenizer("Hello", add_special_tokens=False).input_ids or [0]
        warm = GenerationRequest(prompts=[list(ids)], max_tokens=[2], params=SamplingParams(temperature=0.0))
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
                    self._step()
                    self._publish_queue()
            except Exception:
                # One bad step (a kernel error, out of memory) fails the requests it involved,
                # not the server: the engine thread goes on with an empty batch.
                log.exception("Engine step failed: failing the running requests")
                self._fail_running("internal", "internal error while generating")
            self._events_fed()

    # --- scheduling ---

    def _rows_taken(self) -> int:
        return len(self._rows) + sum(len(reading.rows) for reading in self._reading)

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket in [t for t in self._waiting if t.cancelled or now > t.deadline]:
            self._waiting.remove(ticket)
            self._close(ticket, now, cancelled=ticket.cancelled)
        involved = [row.active.ticket for row in self._rows] + [reading.ticket for reading in self._reading]
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
        """Take these requests out of the engine: their prompts being read and their running rows."""
        if not tickets:
            return
        self._reading = [reading for reading in self._reading if reading.ticket not in tickets]
        self._retire({i for i, row in enumerate(self._rows) if row.active.ticket in tickets})

    def _admit(self) -> None:
        """Start reading the prompts of waiting requests while rows and the read budget allow."""
        room = self._settings.max_num_seqs - self._rows_taken()
        budget = PREFILL_TOKEN_BUDGET - sum(reading.prompt.length for reading in self._reading)
        loaded = self.loaded
        while self._waiting and self._waiting[0].request.rows <= room:
            ticket = self._waiting[0]
            request = ticket.request
            cost = sum(len(p) for p in request.prompts)
            if self._reading and cost > budget:
                break
            self._waiting.popleft()
            room -= request.rows
            budget -= cost
            active = _Active(ticket, rows_left=request.rows, prompt_tokens=cost)
            if self._metrics is not None:
                self._metrics.scheduled(time.monotonic() - ticket.submitted, cost)
            for p_index, prompt in enumerate(request.prompts):
                rows = []
                for i in range(request.n):
                    index = p_index * request.n + i
                    # torch takes seeds in [-2**63, 2**64); wrapping keeps seed + index in range.
                    seed = None if request.params.seed is None else (request.params.seed + index) % 2**64
                    sampler = RowSampler.create(request.params, loaded.vocab_size, seed)
                    detok = IncrementalDetokenizer(loaded.tokenizer, prompt)
                    rows.append(_Row(active, index, len(prompt), request.max_tokens[p_index], sampler, detok, StopMatcher(request.stop)))
                prompt_kv = PromptKV.create(prompt, self._slots_or_fail().layers)
                active.cached_tokens += self._reuse_prefix(prompt, prompt_kv)
                self._reading.append(_Reading(ticket, prompt, prompt_kv, rows))

    def _reuse_prefix(self, ids: list[int], prompt: PromptKV) -> int:
        """Start reading `prompt` after its longest cached prefix; the tokens it skips."""
        cache = self._prefix_cache
        if cache is None:
            return 0
        prefix = cache.lookup(ids)
        if prefix is not None:
            prompt.begin_with(prefix)
        if self._metrics is not None:
            self._metrics.prefix_cache_lookup(len(ids), prompt.read)
        return prompt.read

    def _slots_or_fail(self) -> Slots:
        if self._slots is None:
            raise RuntimeError("model not loaded")
        return self._slots

    def _plan_chunks(self) -> list[tuple[_Reading, int, int]]:
        """The prompt tokens this step reads: oldest prompts first, `prefill_chunk_tokens` in all."""
        budget = max(1, self._settings.prefill_chunk_tokens)
        plan: list[tuple[_Reading, int, int]] = []
        for reading in self._reading:
            if budget <= 0:
                break
            start = reading.prompt.read
            end = min(reading.prompt.length, start + budget)
            plan.append((reading, start, end))
            budget -= end - start
        return plan

    # --- one engine step ---

    def _step(self) -> None:
        """One forward: every running row's next token and the next prompt chunks; then sample."""
        plan = self._plan_chunks()
        if not self._rows and not plan:
            return
        try:
            logits = self._forward(plan)
        except UnsupportedModel:
            raise  # not this request's fault: the model cannot be served (found at warm-up)
        except Exception:
            if not plan:
                raise  # the running rows' step itself failed: the caller fails them
            # Fail only the newcomers whose prompts were in it: the running rows' K/V writes go to
            # fixed columns, so their part of the step can be run again on its own.
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
            reading.prompt.read = end
            if end == reading.prompt.length:
                self._join(reading)
                joining += reading.rows
                picks += [logit_row] * len(reading.rows)
                logit_row += 1
        self._reading = [reading for reading in self._reading if reading.prompt.read < reading.prompt.length]
        if picks:
            index = torch.tensor(picks, dtype=torch.long, device=logits.device)
            self._advance(logits[index], self._rows[:running] + joining)

    def _forward(self, plan: list[tuple[_Reading, int, int]]) -> torch.Tensor:
        """Run the model over the packed step; the logits of each running row, then of each prompt read to its end."""
        loaded = self.loaded
        device = loaded.device
        slots = self._slots_or_fail()
        rows = self._rows
        lengths = torch.tensor([row.length for row in rows], dtype=torch.long)
        ids = [torch.tensor([row.next_token for row in rows], dtype=torch.long)]
        positions = [lengths]
        kv_len = max((row.length for row in rows), default=0) + 1
        if rows:
            slots.reserve(len(rows), kv_len, slots.keys[0])
        chunks: list[Chunk] = []
        offset = len(rows)
        keep = list(range(len(rows)))
        for reading, start, end in plan:
            chunks.append(Chunk(reading.prompt, start, end, offset))
            ids.append(reading.prompt.tokens[start:end])
            positions.append(torch.arange(start, end, dtype=torch.long))
            offset += end - start
            if end == reading.prompt.length:
                keep.append(offset - 1)
        lengths = lengths.to(device)
        uniform = all(row.length == kv_len - 1 for row in rows)
        step = RaggedStep(slots, len(rows), lengths, kv_len, uniform, chunks)
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
        if step.calls != slots.layers:
            raise UnsupportedModel(f"the model made {step.calls} attention calls for {slots.layers} layers: not all of it is batched")
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
        """Copy a fully read prompt's K/V into a slot per row; its rows run from the next step."""
        slots = self._slots_or_fail()
        first = len(self._rows)
        like = reading.prompt.keys[0]
        assert like is not None
        slots.reserve(first + len(reading.rows), reading.prompt.length + 1, like)
        for i, row in enumerate(reading.rows):
            slots.fill(first + i, reading.prompt)
            row.length = reading.prompt.length
        self._rows.extend(reading.rows)
        if self._prefix_cache is not None:
            self._prefix_cache.insert(reading.ids, reading.prompt.stacked)

    def _retire(self, finished: set[int]) -> None:
        """Drop rows by index; the last rows move into the freed slots (only moved rows are copied)."""
        if not finished:
            return
        rows = self._rows
        kept = len(rows) - len(finished)
        holes = sorted(i for i in finished if i < kept)
        movers = [i for i in range(kept, len(rows)) if i not in finished]
        if movers:
            self._slots_or_fail().move(movers, holes, max(rows[i].length for i in movers))
            for hole, mover in zip(holes, movers, strict=True):
                rows[hole] = rows[mover]
        del rows[kept:]
        if not rows and not self._reading:
            self._slots_or_fail().release()  # an idle server holds no cache

    def _advance(self, logits: torch.Tensor, rows: list[_Row]) -> None:
        """Choose the next token of `rows` (one logits row each), emit text, retire finished rows."""
        choices = select_tokens(logits, [row.sampler for row in rows])
        now = time.monotonic()
        events: dict[Ticket, list[Event]] = {}
        finished: set[_Row] = set()
        for row, choice in zip(rows, choices, strict=True):
            row.next_token = choice.token
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
            self._metrics.set_queue(running=len(running), waiting=len(self._waiting) + len(self._inbox))

    def _fail_everything(self, kind: FailureKind, message: str) -> None:
        with self._cond:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        waiting = list(self._waiting)
        self._waiting.clear()
        self._fail(waiting, kind, message)
        self._fail_running(kind, message)

    def _fail_running(self, kind: FailureKind, message: str) -> None:
        """Fail every request in the batch or being read (those not already done) and drop them all."""
        unfinished = dict.fromkeys(row.active.ticket for row in self._rows if row.active.rows_left > 0)
        unfinished.update(dict.fromkeys(reading.ticket for reading in self._reading))
        self._rows, self._reading = [], []
        if self._slots is not None:
            self._slots.release()
        self._fail(list(unfinished), kind, message)
        self._publish_queue()

    def _fail(self, tickets: list[Ticket], kind: FailureKind, message: str) -> None:
        now = time.monotonic()
        for ticket in tickets:
            ticket.sink([Failed(kind, message)])
            if self._metrics is not None:
                self._metrics.finished("abort", now - ticket.submitted)
