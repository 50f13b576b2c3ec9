"""The engine in a child process: the event loop and the model each get a GIL of their own.

In one process the engine thread and the event loop take turns on one GIL. On CPU most of a small
model's decode step is Python (transformers' forward, sampling, detokenization) and so is
streaming (SSE chunks, HTTP writes), so the server topped out near one core however many the pod
had (docs/benchmarks.md). `EngineProcess` runs the same `Engine` in a child process started with
`spawn` and is, to serving, the same `Backend`; this process never imports torch:

- submits, cancels, aborts and stop go down one pipe, written by a thread (never the event loop);
- events come up batched, one message per engine step, with stage changes in the order the
  engine made them;
- when the model is ready the child sends the tokenizer and the context length, which request
  validation reads on this side;
- the child ignores SIGINT and SIGTERM (the parent drains, then sends `Stop`) and stops by itself
  when the pipe closes, so it never outlives its parent;
- both processes write metrics to prometheus-client's multiprocess directory (`main` sets it up),
  so `/metrics` reads as before;
- a child that dies (OOM-killed, crashed) fails every request in flight with a 500 and fails the
  backend: the server writes why to its termination log and exits non-zero (`app`, `main`), so
  the kubelet restarts the container;
- the child writes when its running step began into shared memory (`step_clock`): a step longer
  than `--step-timeout-seconds` turns `/livez` to 503 here without a message from the child.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import queue
import signal
import threading
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection

from prometheus_client import CollectorRegistry, multiprocess
from transformers import PreTrainedTokenizerBase

from .backend import Cancellable, StepClock
from .events import Done, Event, Failed, FailureKind, GenerationRequest, Sink
from .logs import configure_logging
from .metrics import Metrics, multiprocess_dir
from .placement import Placement, pin_process
from .settings import Settings
from .startup import StageClock

log = logging.getLogger(__name__)

_SETTLED = frozenset({"ready", "failed", "stopped"})
_KILL_GRACE_SECONDS = 5.0


# --- what crosses the pipe ------------------------------------------------------------------------


@dataclass(frozen=True)
class Facts:
    """What request validation needs of the model, sent up once it is loaded."""

    tokenizer: PreTrainedTokenizerBase
    max_model_len: int
    http_cores: frozenset[int] | None = None  # where the HTTP process is to run (`placement`); None: anywhere


@dataclass(frozen=True)
class Submit:
    rid: int
    request: GenerationRequest


@dataclass(frozen=True)
class Cancel:
    rid: int


@dataclass(frozen=True)
class Abort:
    message: str


@dataclass(frozen=True)
class Stop:
    pass


@dataclass(frozen=True)
class Stage:
    stage: str
    error: str | None
    load_seconds: float | None
    facts: Facts | None


Command = Submit | Cancel | Abort | Stop
Upward = Stage | tuple[int, list[Event]]  # a stage change, or one request's events


# --- the child ------------------------------------------------------------------------------------


class _Uplink:
    """Child side: what the engine thread produces, sent up in one message per engine step.

    Only the engine thread puts and flushes (sinks, stage changes and `after_events` all run on
    it), so this needs no lock and no thread of its own: one pickle and one write per step.
    """

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._items: list[Upward] = []

    def put(self, item: Upward) -> None:
        self._items.append(item)

    def flush(self) -> None:
        if not self._items:
            return
        items, self._items = self._items, []
        with contextlib.suppress(OSError):  # the parent is gone: the main loop sees EOF and stops
            self._conn.send(items)


def serve_child(
    settings: Settings, model_name: str, conn: Connection, placement: Placement | None = None, step_clock: StepClock | None = None
) -> None:
    """The child process: an `Engine` fed from `conn`, its events and stages sent back on it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C reaches the whole group:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the parent drains first, then sends Stop
    configure_logging(settings.log_level)
    uplink = _Uplink(conn)
    from .engine import Engine  # noqa: PLC0415  # torch and the model: in this process only

    tickets: dict[int, Cancellable] = {}  # for Cancel; a request's entry goes with its last event
    filing = threading.Lock()  # a request can end before `submit` has returned its ticket

    def on_stage(stage: str) -> None:
        facts = None
        if stage == "ready":
            placed = engine.placement
            facts = Facts(engine.loaded.tokenizer, engine.loaded.max_model_len, placed.http if placed is not None else None)
        uplink.put(Stage(stage, engine.error, engine.load_seconds, facts))
        uplink.flush()  # stages change outside steps too (loading, stopping): send them now

    def sink_for(rid: int) -> Sink:
        def sink(events: list[Event]) -> None:
            if isinstance(events[-1], Done | Failed):  # a request's last batch ends with one of them
                with filing:
                    tickets.pop(rid, None)
            uplink.put((rid, events))

        return sink

    metrics = Metrics(CollectorRegistry(), model_name)
    engine = Engine(settings, metrics, on_stage=on_stage, after_events=uplink.flush, placement=placement, step_clock=step_clock)
    engine.start()
    try:
        while True:
            try:
                command: Command = conn.recv()
            except (EOFError, OSError):
                log.warning("The server process is gone: stopping the engine")
                return
            if isinstance(command, Submit):
                with filing:
                    tickets[command.rid] = engine.submit(command.request, sink_for(command.rid))
            elif isinstance(command, Cancel):
                cancelled = tickets.pop(command.rid, None)
                if cancelled is not None:
                    cancelled.cancel()
            elif isinstance(command, Abort):
                engine.abort_all(command.message)
            else:
                return
    finally:
        engine.stop()  # fails whatever is still in the engine, then reports "stopped" (flushed)


# --- the parent -----------------------------------------------------------------------------------


class RemoteTicket:
    def __init__(self, owner: EngineProcess, rid: int) -> None:
        self._owner = owner
        self._rid = rid

    def cancel(self) -> None:
        self._owner.cancel(self._rid)


class EngineProcess:
    """A `Backend` whose engine runs in a child process; a reader thread delivers its events."""

    def __init__(self, settings: Settings, model_name: str, placement: Placement | None = None) -> None:
        """`placement`: the cores to keep the two processes on, if the model suits it (the engine decides);
        only a server process passes one - this process pins itself to its HTTP core."""
        context = multiprocessing.get_context("spawn")  # never fork a process that has torch threads
        self._conn, child_conn = context.Pipe(duplex=True)
        self._child_conn: Connection | None = child_conn
        # When the engine's running step began (0.0: none), shared memory the child writes every step: a
        # hung step (a stuck device) turns /livez to 503 here without a message from the child.
        self._step_clock: StepClock = context.RawValue("d", 0.0)
        self._step_timeout = settings.step_timeout_seconds
        args = (settings, model_name, child_conn, placement, self._step_clock)
        self._process = context.Process(target=serve_child, args=args, name="llmservice-engine")
        self._reader = threading.Thread(target=self._read, name="llmservice-engine-reader", daemon=True)
        # Commands are written by a thread of their own: a pipe write can block (a full buffer, the
        # GIL taken back after the syscall), and the event loop must not.
        self._commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._writer = threading.Thread(target=self._write, name="llmservice-engine-writer", daemon=True)
        self._sinks: dict[int, Sink] = {}
        self._sinks_lock = threading.Lock()  # orders `submit` against the child's death
        self._gone: tuple[FailureKind, str] | None = None
        self._ids = itertools.count()
        self._facts: Facts | None = None
        self._settled = threading.Event()
        self._ended = threading.Event()  # the engine failed (in the child, or the child died), or stop() was called
        self._stopping = False
        self.stage = "starting"
        self.error: str | None = None
        self.load_seconds: float | None = None
        self.stages = StageClock()  # seconds per start-up phase, from the child's stage changes as they arrive

    @property
    def ready(self) -> bool:
        return self.stage == "ready"

    @property
    def loaded(self) -> Facts:
        if self._facts is None:
            raise RuntimeError("model not loaded")
        return self._facts

    def alive(self) -> bool:
        # As `Engine.alive`: an engine that failed is dead even if its process idles on, and so is one
        # stuck in a step for longer than --step-timeout-seconds.
        began = self._step_clock.value
        if began > 0 and time.monotonic() - began > self._step_timeout:
            return False
        return self.stage == "stopped" or (self.stage != "failed" and self._process.is_alive())

    def start(self) -> None:
        self._process.start()
        if self._child_conn is not None:
            self._child_conn.close()  # only the child holds its end now: its exit reads as EOF here
            self._child_conn = None
        self._reader.start()
        self._writer.start()

    def wait_settled(self, timeout: float | None = None) -> bool:
        return self._settled.wait(timeout)

    def wait_ended(self, timeout: float | None = None) -> bool:
        return self._ended.wait(timeout)

    def submit(self, request: GenerationRequest, sink: Sink) -> RemoteTicket:
        rid = next(self._ids)
        with self._sinks_lock:
            gone = self._gone
            if gone is None:
                self._sinks[rid] = sink
        if gone is not None:
            sink([Failed(*gone)])
        else:  # filed before it is sent: if the child is gone by then, the reader fails it
            self._commands.put(Submit(rid, request))
        return RemoteTicket(self, rid)

    def cancel(self, rid: int) -> None:
        if self._sinks.pop(rid, None) is not None:
            self._commands.put(Cancel(rid))

    def abort_all(self, message: str) -> None:
        self._commands.put(Abort(message))

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping = True
        self._commands.put(Stop())
        self._settled.set()
        self._ended.set()
        if self._process.pid is None:
            return  # never started
        # The reader ends once the child has exited and reaps it; only one thread may wait for it.
        self._reader.join(timeout)
        if self._reader.is_alive():  # still loading, or stuck in a step: do not wait for it
            log.warning("Engine process did not stop in %.0f s: killing it", timeout)
            self._process.kill()
            self._reader.join(_KILL_GRACE_SECONDS)

    def _write(self) -> None:
        while True:
            command = self._commands.get()
            try:
                self._conn.send(command)
            except (OSError, ValueError):  # the child is gone: the reader fails what was filed
                return
            if isinstance(command, Stop):
                return

    def _read(self) -> None:
        while True:
            try:
                items: list[Upward] = self._conn.recv()
            except (EOFError, OSError):
                break
            for item in items:
                if isinstance(item, Stage):
                    self._on_stage(item)
                    continue
                rid, events = item
                sink = self._sinks.pop(rid, None) if isinstance(events[-1], Done | Failed) else self._sinks.get(rid)
                if sink is not None:  # None: cancelled here while the child was still sending
                    sink(events)
        self._child_gone()

    def _on_stage(self, stage: Stage) -> None:
        if stage.facts is not None:
            self._facts = stage.facts
            if stage.facts.http_cores is not None and pin_process(stage.facts.http_cores):
                log.info("CPU placement", extra={"http_cores": sorted(stage.facts.http_cores)})
        self.error = stage.error
        self.load_seconds = stage.load_seconds
        self.stages.mark(stage.stage)
        self.stage = stage.stage  # last: "ready" is seen only with the facts in place
        if stage.stage in _SETTLED:
            self._settled.set()
        if stage.stage == "failed":
            self._ended.set()

    def _child_gone(self) -> None:
        self._process.join(_KILL_GRACE_SECONDS)
        code = self._process.exitcode
        if self._stopping:
            gone: tuple[FailureKind, str] = ("shutdown", "server is shutting down")
            if self.stage != "failed":
                self.stage = "stopped"
        else:
            gone = ("internal", f"the engine process exited unexpectedly (exit code {code})")
            log.error("Engine process exited unexpectedly", extra={"exit_code": code})
            self.error = gone[1]
            self.stage = "failed"
        with self._sinks_lock:
            self._gone = gone
            sinks, self._sinks = list(self._sinks.values()), {}
        for sink in sinks:
            sink([Failed(*gone)])
        self._settled.set()
        self._ended.set()
        if multiprocess_dir() is not None and self._process.pid is not None:
            # Drop the child's live gauges (running / waiting), as a stopped worker does.
            multiprocess.mark_process_dead(self._process.pid)  # type: ignore[no-untyped-call]
