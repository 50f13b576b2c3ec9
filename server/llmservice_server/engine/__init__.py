"""The engine: one thread owns the model and decodes every running sequence in one batch.

How a request and a step move through its parts:

    submit ──> Ticket ──> scheduler.waiting ──admit (rows, read budget, free K/V blocks)──┐
                               ^                                                        v
                               │ preempted rows and prompts            scheduler.reading (prompt chunks)
                               │ go back to the head                   scheduler.rows    (running rows)
                               │                                                        │
     one step:  scheduler.grow ─┘ (a block for each row's next token; none left: preempt the youngest)
                scheduler.plan_chunks ─> runner.forward (one packed forward: ragged.py, decoder.py)
                                          │  writes every token's K/V into the pool (kv_cache.py)
                                          v
                                        logits ─> sampling.select_tokens ─> detokenize, stop strings
                                                  ─> events to each request's sink ─> HTTP process ─> SSE
                scheduler.join (prompts read to their end become rows) / retire (finished rows)

- `core`: the `Engine` - its thread, loading (and sizing the K/V pool), warm-up, the loop, events
  and failures;
- `scheduler`: admission, preemption, chunk planning, joining and retiring rows, by K/V blocks;
- `kv_blocks`: which block holds what (reference counts, the prefix cache), no tensors;
- `kv_cache`: the pool's tensors, allocated once, and the block table the runner gathers by;
- `runner`: one forward over a step's packed tokens, and torch's threads for it;
- `requests`: the ticket, rows and readings these pass between them;
- the sampler is `sampling.py` (next to the HTTP side's request model, which it shares): the whole
  batch as tensor ops on the logits' device, one copy of the chosen ids to the host per step.

Why one thread: torch and the K/V cache are not shared between threads, and one owner makes
step-level batching simple. Requests arrive through `submit` (any thread), wait in a bounded
deque (admission bounds it), join the batch between steps and leave it when finished, stopped,
cancelled or timed out. Results go back through each request's `sink`, which the async side
points at its `Handoff` (one loop wakeup per step) - the engine never touches the event loop. In
its own process (`engine_process`, the default) the sinks feed the pipe to the HTTP process
instead, flushed once per step through `after_events`.

One step is one forward: the next token of every running row and a chunk of the newcomers'
prompts (at most `prefill_chunk_tokens` of them, so a long prompt never stalls the running streams
for more than one chunk), packed into one sequence with no padding. A prompt whose last chunk went
through joins the batch in the same step, its first token sampled from that forward. Every row has
its own positions and its own K/V slots, so a row computes what it would compute alone: batched
greedy output is the sequential greedy output. For Llama-family models the forward is the
engine's own (`decoder.py`), over the same weights; others run `model(...)`.

K/V live in one pool of fixed size, allocated once when the model is loaded (sized by `memory.py`).
A request is admitted while the pool has the blocks of its prompts; a running row takes one more
block each `BLOCK_TOKENS` tokens. When none is left, the most recently admitted row (or prompt
being read) is preempted: its blocks go back, it returns to the head of the queue, and when
admitted again its prompt and the tokens it already sent are read again (the prefix cache usually
still has most of them) and it goes on from there: its stream sees no gap and no repeat. A full
pool makes requests slower, not failed. The prefix cache is the same pool.

Failures stay as small as they are: a prompt whose reading fails fails its request only; an
out-of-memory step preempts a row and goes on; a step failure leaves the engine serving; an error
that leaves the device unusable (a CUDA error) fails the engine, and the server exits with it.
`step_clock` holds when the running step began (0: none), for `/livez` to see a hung step.
"""

from .core import Engine, poisoned
from .requests import Ticket
from .scheduler import PREFILL_TOKEN_BUDGET

__all__ = ["PREFILL_TOKEN_BUDGET", "Engine", "Ticket", "poisoned"]
