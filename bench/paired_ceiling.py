"""The static-batch ceiling measured right beside each server run, so a ratio to it compares like with like.

Why: the 2-core machines here change speed by half within seconds (a busy Python loop counted 8.9 to
13.9 million iterations in consecutive 2 s windows, docs/benchmarks.md), and the in-process round
before each repeat of the servers is minutes away from most of their runs. So, besides that round,
two long-lived workers (torch's default threads and `OMP_NUM_THREADS=1`, as the ceiling is the
better of the two) keep the model loaded and, with every server paused, time a short burst of the
level's own static batches (of N rows; at one stream, its requests one at a time: bare `generate`)
before a level's first server and after each server. A run's ceiling is the mean of the probes on
either side of it; its fraction of that ceiling is what `bench.report.analyse` reports per system.

    python bench/paired_ceiling.py <model_dir> <device> <dtype>   # a worker: JSON lines in, JSON lines out
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
SETTINGS = {"default": {}, "omp1": {"OMP_NUM_THREADS": "1"}}


def burst(
    generate: Callable[[list[list[int]], int], float],
    encode: Callable[[str], list[int]],
    batch: int,
    items: list[dict[str, Any]],
    min_seconds: float,
) -> dict[str, Any]:
    """Static batches of `batch` rows over `items`, in order, until `min_seconds` have been timed
    (at least one batch, at most every item once); each generates its requests' mean output length."""
    tokens, seconds, batches = 0, 0.0, 0
    for first in range(0, len(items), batch):
        rows = items[first : first + batch]
        new_tokens = round(sum(item["max_tokens"] for item in rows) / len(rows))
        seconds += generate([encode(item["prompt"]) for item in rows], new_tokens)
        tokens += len(rows) * new_tokens
        batches += 1
        if seconds >= min_seconds:
            break
    return {"batch": batch, "batches": batches, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds}


def worker(model_dir: str, device: str, dtype: str, requests: IO[str], answers: IO[str]) -> None:
    """One model, one thread setting: answers each request line with one burst's timing."""
    from bench.padded import PaddedModel

    padded = PaddedModel(model_dir, device, dtype)
    padded.generate([padded.encode("warm up")], 4)
    answers.write(json.dumps({"ready": True}) + "\n")
    answers.flush()
    for line in requests:
        asked = json.loads(line)
        answer = burst(padded.generate, padded.encode, asked["batch"], asked["items"], asked["min_seconds"])
        answers.write(json.dumps(answer) + "\n")
        answers.flush()


class PairedCeiling:
    """The parent's side: the two workers, started once, asked between server runs."""

    def __init__(self, model_dir: Path, device: str, dtype: str, work: Path, min_seconds: float = 1.0) -> None:
        self.min_seconds = min_seconds
        self._workers: dict[str, subprocess.Popen[str]] = {}
        script = str(Path(__file__).resolve())
        for label, env in SETTINGS.items():
            log_file = (work / f"paired-ceiling-{label}.log").open("w")
            self._workers[label] = subprocess.Popen(
                [sys.executable, script, str(model_dir), device, dtype],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log_file,
                text=True,
                env={**os.environ, **env},
                cwd=REPO,
            )
        for label in self._workers:
            self._read(label)  # the ready line: both loaded before the first server run

    def measure(self, batch: int, items: list[dict[str, Any]]) -> dict[str, Any]:
        """One burst per thread setting, one after the other; the ceiling is the faster."""
        by_setting: dict[str, Any] = {}
        for label, proc in self._workers.items():
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({"batch": batch, "items": items, "min_seconds": self.min_seconds}) + "\n")
            proc.stdin.flush()
            by_setting[label] = self._read(label)
        return {"tok_s": max(float(m["tok_s"]) for m in by_setting.values()), "by_setting": by_setting, "at": time.time()}

    def close(self) -> dict[str, int]:
        """Ends both workers (killed if they do not end within 30 s); their exit codes."""
        for proc in self._workers.values():
            if proc.stdin is not None:
                proc.stdin.close()  # the worker's loop ends at EOF
        codes: dict[str, int] = {}
        for label, proc in self._workers.items():
            try:
                codes[label] = proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                codes[label] = proc.wait()
        return codes

    def _read(self, label: str) -> dict[str, Any]:
        proc = self._workers[label]
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the {label} ceiling worker exited (code {proc.poll()}); see paired-ceiling-{label}.log")
        answer: dict[str, Any] = json.loads(line)
        return answer


def fraction(tok_s: float, before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """A run's throughput against the mean of the ceilings measured just before and just after it."""
    ceiling = (float(before["tok_s"]) + float(after["tok_s"])) / 2
    return {"before_tok_s": before["tok_s"], "after_tok_s": after["tok_s"], "ceiling_tok_s": ceiling, "fraction": tok_s / ceiling}


if __name__ == "__main__":
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    worker(sys.argv[1], sys.argv[2], sys.argv[3], sys.stdin, sys.stdout)
