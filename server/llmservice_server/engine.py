"""The engine: one thread owns the model and decodes every running sequence in one batch.

Why one thread: torch and the KV cache are not shared between threads, and one owner makes
step-level batching simple. Requests arrive through `submit` (any thread), wait in a bounded
deque (admission bounds it), join the batch between decode steps and leave it when finished,
stopped, cancelled or timed out. Results go back through each request's `sink`, which the async
side points at its `Handoff` (one loop wakeup per step) - the engine never touches the event loop.
In its own process (`engine_process`, the default) the sinks feed the pipe to the HTTP process
instead, flushed once per step through `after_events`.

The batch is one left-padded KV cache (transformers `DynamicCache`, one `[rows, heads, len, dim]`
tensor pair per layer). Newcomers are prefilled together on their own, a chunk of their prompts
per engine step between decode steps (so a long prompt never stalls the running streams for more
than one chunk's forward), then their cache rows are spliced in (both sides padded on the left
to a common length); finished rows are dropped by index and fully padded leading columns trimmed.
Padding lives in the attention mask and every row has its own position ids, so a row computes
what it would compute alone: batched greedy output is the sequential greedy output.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from .events import Delta, Done, Event, Failed, FailureKind, Finished, FinishReason, GenerationRequest, SamplingParams, Sink, TokenInfo
from .loader import LoadedModel, load
from .metrics import Metrics
from .sampling import Choice, RowSampler, select_tokens
from .settings import Settings
from .textstream import IncrementalDetokenizer, StopMatcher

log = logging.getLogger(__name__)

PREFILL_TOKEN_BUDGET = 8192  # padded prompt tokens of one newcomer group (bounds its KV cache)


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
    generated: int = 0
    last_token_at: float = 0.0


@dataclass(eq=False)
class _Prefill:
    """Newcomers whose prompts are read a chunk per engine step, before they join the batch."""

    tickets: list[Ticket]
    rows: list[_Row]
    group_of_row: list[int]  # prompt index of each row (n > 1: rows share their prompt's cache)
    ids: torch.Tensor  # [prompts, longest] left-padded
    mask: torch.Tensor  # [prompts, longest] 1 = real token
    positions: torch.Tensor  # [prompts, longest]
    cache: DynamicCache
    read: int = 0  # columns already through the model


@dataclass
class _Batch:
    cache: DynamicCache
    mask: torch.Tensor  # [rows, len] 1 = real token, 0 = left padding
    positions: torch.Tensor  # [rows] position id of the next input token
    next_tokens: torch.Tensor  # [rows] the token each row feeds next
    rows: list[_Row]


def _layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers as plain DynamicLayers (checked after the first prefill)."""
    layers = [layer for layer in cache.layers if type(layer) is DynamicLayer]
    if len(layers) != len(cache.layers):
        raise RuntimeError("this model's KV cache layout (sliding window / hybrid) is not supported by the batching engine")
    return layers


def _kv(layer: DynamicLayer) -> tuple[torch.Tensor, torch.Tensor]:
    assert layer.keys is not None and layer.values is not None
    return layer.keys, layer.values


def _left_pad(t: torch.Tensor, extra: int, dim: int) -> torch.Tensor:
    if extra == 0:
        return t
    shape = list(t.shape)
    shape[dim] = extra
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class Engine:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics | None = None,
        loader: Callable[[Settings, Callable[[str], None]], LoadedModel] = load,
        on_stage: Callable[[str], None] | None = None,
        after_events: Callable[[], None] | None = None,
    ) -> None:
        self._settings = settings
        self._on_stage = on_stage  # told every stage change, after `error` / `load_seconds` are set
        self._after_events = after_events  # on this thread, once the sinks of a step (or of the final failures) were fed
        self._metrics = metrics
        self._loader = loader
        self._cond = threading.Condition()
        self._inbox: deque[Ticket] = deque()
        self._waiting: deque[Ticket] = deque()
        self._batch: _Batch | None = None
        self._prefilling: _Prefill | None = None
        self._stopping = False
        self._abort_message: str | None = None
        self._model: LoadedModel | None = None
        self._sdpa = False
        self.stage = "starting"
        self.error: str | None = None
        self.load_seconds: float | None = None
        self._settled = threading.Event()  # the model loaded, failed to load, or the engine stopped
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

    def alive(self) -> bool:
        return self._thread.is_alive() or self.stage == "stopped"

    def start(self) -> None:
        self._thread.start()

    def wait_settled(self, timeout: float | None = None) -> bool:
        """Block until loading is over (ready or failed) or the engine stopped; never on the event loop."""
        return self._settled.wait(timeout)

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
        config = getattr(self._model.model, "config", None)
        self._sdpa = getattr(config, "_attn_implementation", None) == "sdpa"
        self._set_stage("warming")
        self._warm_up()
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

    def _warm_up(self) -> None:
        # One real generation through the batching path: first-call overheads are paid here,
        # and a model whose cache layout we cannot splice fails now instead of on a request.
        tokenizer = self.loaded.tokenizer
        ids = tokenizer("Hello", add_special_tokens=False).input_ids or [0]
        warm = GenerationRequest(prompts=[list(ids)], max_tokens=[2], params=SamplingParams(temperature=0.0))
        self._waiting.append(Ticket(warm, lambda events: None, self._wake))
        metrics, self._metrics = self._metrics, None  # warm-up traffic is not user traffic
        try:
            while self._waiting or self._prefilling is not None or self._batch is not None:
                self._admit()
                if self._batch is not None:
                    self._decode_step()
        finally:
            self._metrics = metrics

    def _serve(self) -> None:
        while True:
            with self._cond:
                if self._batch is None and self._prefilling is None and not self._waiting:
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
                if self._batch is not None:
                    self._decode_step()
                    self._publish_queue()
            except Exception:
                # One bad step (a kernel error, out of memory) fails the requests it involved,
                # not the server: the engine thread goes on with an empty batch.
                log.exception("Decode step failed: failing the running requests")
                self._fail_running("internal", "internal error while generating")
            self._events_fed()

    # --- scheduling ---

    def _running_rows(self) -> int:
        return len(self._batch.rows) if self._batch is not None else 0

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket in [t for t in self._waiting if t.cancelled or now > t.deadline]:
            self._waiting.remove(ticket)
            self._close(ticket, now, cancelled=ticket.cancelled)
        if self._batch is None:
            return
        gone = {row.active for row in self._batch.rows if row.active.ticket.cancelled or now > row.active.ticket.deadline}
        for active in gone:
            self._close(active.ticket, now, cancelled=active.ticket.cancelled)
        if gone:
            self._drop([i for i, row in enumerate(self._batch.rows) if row.active not in gone])

    def _close(self, ticket: Ticket, now: float, *, cancelled: bool) -> None:
        if not cancelled:
            ticket.sink([Failed("timeout", f"request timed out after {ticket.request.timeout:g} s")])
        if self._metrics is not None:
            self._metrics.finished("abort", now - ticket.submitted)

    def _admit(self) -> None:
        """Read the next prompt chunk of the newcomers, choosing them first if there are none."""
        if self._prefilling is None:
            room = self._settings.max_num_seqs - self._running_rows()
            budget = PREFILL_TOKEN_BUDGET
            chosen: list[Ticket] = []
            while self._waiting and self._waiting[0].request.rows <= room:
                ticket = self._waiting[0]
                cost = max(len(p) for p in ticket.request.prompts) * len(ticket.request.prompts)
                if chosen and cost > budget:
                    break
                self._waiting.popleft()
                chosen.append(ticket)
                room -= ticket.request.rows
                budget -= cost
            if not chosen:
                return
            self._prefilling = self._start_prefill(chosen)
        group = self._prefilling
        running = self._batch
        try:
            self._prefill_chunk(group)
        except Exception:
            if self._batch is not running:
                raise  # the newcomers already joined the batch: the step handler fails it
            self._prefilling = None
            log.exception("Prefill failed: failing the new requests", extra={"requests": len(group.tickets)})
            self._fail(group.tickets, "internal", "internal error while reading the prompt")

    def _start_prefill(self, tickets: list[Ticket]) -> _Prefill:
        loaded = self.loaded
        now = time.monotonic()
        prompts: list[list[int]] = []
        rows: list[_Row] = []
        group_of_row: list[int] = []
        for ticket in tickets:
            request = ticket.request
            active = _Active(ticket, rows_left=request.rows, prompt_tokens=sum(len(p) for p in request.prompts))
            if self._metrics is not None:
                self._metrics.scheduled(now - ticket.submitted, active.prompt_tokens)
            for p_index, prompt in enumerate(request.prompts):
                prompts.append(prompt)
                for i in range(request.n):
                    index = p_index * request.n + i
                    # torch takes seeds in [-2**63, 2**64); wrapping keeps seed + index in range.
                    seed = None if request.params.seed is None else (request.params.seed + index) % 2**64
                    sampler = RowSampler.create(request.params, loaded.vocab_size, seed)
                    detok = IncrementalDetokenizer(loaded.tokenizer, prompt)
                    rows.append(_Row(active, index, len(prompt), request.max_tokens[p_index], sampler, detok, StopMatcher(request.stop)))
                    group_of_row.append(len(prompts) - 1)
        longest = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), longest), dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for g, prompt in enumerate(prompts):
            ids[g, longest - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[g, longest - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = loaded.device  # moved once: every chunk slices these
        return _Prefill(tickets, rows, group_of_row, ids.to(device), mask.to(device), positions.to(device), DynamicCache())

    def _prefill_chunk(self, group: _Prefill) -> None:
        """One forward over the next columns of the group's prompts; the last one joins the batch."""
        loaded = self.loaded
        device = loaded.device
        prompts, longest = group.ids.shape
        end = min(longest, group.read + max(1, self._settings.prefill_chunk_tokens // prompts))
        with torch.inference_mode():
            out = loaded.model(
                input_ids=group.ids[:, group.read : end],
                attention_mask=group.mask[:, :end],
                position_ids=group.positions[:, group.read : end],
                past_key_values=group.cache,
                use_cache=True,
                logits_to_keep=1,
            )
        group.read = end
        if end < longest:
            return
        self._prefilling = None
        layers = _layers(group.cache)
        expand = torch.tensor(group.group_of_row, dtype=torch.long, device=device)
        if group.group_of_row != list(range(prompts)):  # n > 1: rows share their prompt's cache
            for layer in layers:
                layer.batch_select_indices(expand)
        logits = out.logits[:, -1, :][expand]
        newcomer = _Batch(
            cache=group.cache,
            mask=group.mask[expand],
            positions=group.mask[expand].sum(-1),
            next_tokens=torch.zeros(len(group.rows), dtype=torch.long, device=device),
            rows=group.rows,
        )
        self._batch = newcomer if self._batch is None else self._merge(self._batch, newcomer)
        start = len(self._batch.rows) - len(group.rows)
        self._advance(logits, list(range(start, len(self._batch.rows))))

    @staticmethod
    def _merge(old: _Batch, new: _Batch) -> _Batch:
        length = max(old.mask.shape[1], new.mask.shape[1])
        pad_old, pad_new = length - old.mask.shape[1], length - new.mask.shape[1]
        for old_layer, new_layer in zip(_layers(old.cache), _layers(new.cache), strict=True):
            (old_k, old_v), (new_k, new_v) = _kv(old_layer), _kv(new_layer)
            old_layer.keys = torch.cat([_left_pad(old_k, pad_old, 2), _left_pad(new_k, pad_new, 2)])
            old_layer.values = torch.cat([_left_pad(old_v, pad_old, 2), _left_pad(new_v, pad_new, 2)])
        return _Batch(
            cache=old.cache,
            mask=torch.cat([_left_pad(old.mask, pad_old, 1), _left_pad(new.mask, pad_new, 1)]),
            positions=torch.cat([old.positions, new.positions]),
            next_tokens=torch.cat([old.next_tokens, new.next_tokens]),
            rows=old.rows + new.rows,
        )

    def _drop(self, keep: list[int]) -> None:
        batch = self._batch
        assert batch is not None
        if not keep:
            self._batch = None
            return
        index = torch.tensor(keep, dtype=torch.long, device=batch.mask.device)
        mask = batch.mask[index]
        trim = mask.shape[1] - int(mask.sum(-1).max().item())  # leading columns that are padding in every row
        for layer in _layers(batch.cache):
            keys, values = _kv(layer)
            layer.keys = keys[index, :, trim:]
            layer.values = values[index, :, trim:]
        self._batch = _Batch(batch.cache, mask[:, trim:], batch.positions[index], batch.next_tokens[index], [batch.rows[i] for i in keep])

    # --- decoding ---

    def _decode_step(self) -> None:
        batch = self._batch
        assert batch is not None
        batch.mask = torch.cat([batch.mask, batch.mask.new_ones((batch.mask.shape[0], 1))], dim=1)
        attention_mask = batch.mask
        if self._sdpa:
            # One query per row attends to every real token before it: the padding mask is the
            # whole mask. Handing it over as SDPA's 4-D boolean mask skips transformers' mask
            # construction, a tenth of a small model's decode step.
            attention_mask = batch.mask[:, None, None, :].bool()
        with torch.inference_mode():
            out = self.loaded.model(
                input_ids=batch.next_tokens[:, None],
                attention_mask=attention_mask,
                position_ids=batch.positions[:, None],
                past_key_values=batch.cache,
                use_cache=True,
            )
        batch.positions = batch.positions + 1
        self._advance(out.logits[:, -1, :], list(range(len(batch.rows))))

    def _advance(self, logits: torch.Tensor, row_ids: list[int]) -> None:
        """Choose the next token for `row_ids` of the batch, emit text, retire finished rows."""
        batch = self._batch
        assert batch is not None
        rows = [batch.rows[i] for i in row_ids]
        choices = select_tokens(logits, [row.sampler for row in rows])
        tokens = torch.tensor([c.token for c in choices], dtype=torch.long, device=batch.next_tokens.device)
        if len(row_ids) == len(batch.rows):  # a decode step: every row, in order
            batch.next_tokens = tokens
        else:
            batch.next_tokens[row_ids] = tokens
        now = time.monotonic()
        events: dict[Ticket, list[Event]] = {}
        finished: set[int] = set()
        for row_id, row, choice in zip(row_ids, rows, choices, strict=True):
            out = events.setdefault(row.active.ticket, [])
            if self._emit(row, choice, now, out):
                finished.add(row_id)
        if self._metrics is not None:
            self._metrics.generation_tokens.inc(len(rows))
        for ticket, ticket_events in events.items():
            if ticket_events:
                ticket.sink(ticket_events)
        if finished:
            self._drop([i for i in range(len(batch.rows)) if i not in finished])

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
            out.append(Done(active.prompt_tokens, active.completion_tokens))
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
            running = len({row.active for row in self._batch.rows}) if self._batch is not None else 0
            running += len(self._prefilling.tickets) if self._prefilling is not None else 0
            self._metrics.set_queue(running=running, waiting=len(self._waiting) + len(self._inbox))

    def _fail_everything(self, kind: FailureKind, message: str) -> None:
        with self._cond:
            self._waiting.extend(self._inbox)
            self._inbox.clear()
        waiting = list(self._waiting)
        self._waiting.clear()
        if self._prefilling is not None:
            waiting += self._prefilling.tickets
            self._prefilling = None
        self._fail(waiting, kind, message)
        self._fail_running(kind, message)

    def _fail_running(self, kind: FailureKind, message: str) -> None:
        """Fail every request with a row in the batch (those not already done) and drop the batch."""
        if self._batch is not None:
            unfinished = dict.fromkeys(row.active.ticket for row in self._batch.rows if row.active.rows_left > 0)
            self._batch = None
            self._fail(list(unfinished), kind, message)
        self._publish_queue()

    def _fail(self, tickets: list[Ticket], kind: FailureKind, message: str) -> None:
        now = time.monotonic()
        for ticket in tickets:
            ticket.sink([Failed(kind, message)])
            if self._metrics is not None:
                self._metrics.finished("abort", now - ticket.submitted)
