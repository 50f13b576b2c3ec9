"""Bare `model.generate` over left-padded batches: the in-process ceilings' one way to run the model.

Imported only in the ceiling subprocesses (`ceilings.inprocess_worker`, `paired_ceiling`), so the
benchmark process itself never imports torch.
"""

from __future__ import annotations

import threading
import time
from typing import Any


class PaddedModel:
    """One model loaded for greedy `generate` calls, each timed; `tokens` new tokens for every row."""

    def __init__(self, model_dir: str, device: str, dtype: str) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()  # type: ignore[no-untyped-call]  # untyped in transformers
        self.model.to(self.device)
        tokenizer = self.tokenizer
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def synchronize(self) -> None:
        """A CUDA call returns before the GPU is done: time what it did."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def encode(self, prompt: str) -> list[int]:
        """The prompt as the servers get it: one user message through the chat template."""
        text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(str(text), add_special_tokens=False).input_ids)

    def generate(self, prompts: list[list[int]], new_tokens: int) -> float:
        """Seconds for one left-padded batch generating exactly `new_tokens` per row."""
        torch = self.torch
        longest = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), longest), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, longest - len(prompt) :] = torch.tensor(prompt)
            mask[row, longest - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        self.synchronize()
        started = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=self.pad
            )
        self.synchronize()
        elapsed = time.perf_counter() - started
        assert out.shape[1] - longest == new_tokens
        return elapsed

    def generate_in_thread(self, prompts: list[list[int]], new_tokens: int) -> float:
        """The same call on a fresh worker thread (the seed server's situation: see docs/benchmarks.md)."""
        elapsed: list[float] = []
        worker = threading.Thread(target=lambda: elapsed.append(self.generate(prompts, new_tokens)))
        worker.start()
        worker.join()
        return elapsed[0]
