"""The tiny model's tokenizer: a byte-level BPE trained here on a fixed text, with a chat template.

Apart from `tiny_model` so that tests needing only a tokenizer (the in-process server tier) do not
import torch: building it takes a fraction of a second, importing torch several.
"""

from __future__ import annotations

import itertools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

VOCAB_SIZE = 512
EOS = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [EOS, PAD, "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# A deliberately simple template: role marker, content, end marker. The server applies it with
# `apply_chat_template`, so prompt token counts in tests come from the same template. Tools are
# written the Hermes/Qwen2.5 way (a `<tools>` list first, calls as `<tool_call>` JSON, results as
# `<tool_response>`), so the server finds the tool-call format from the template as it does for real
# models; without tools the rendering is the plain one. `enable_thinking=False` (Qwen3's switch,
# passed as vLLM's `chat_template_kwargs`) closes an empty think block, as Qwen3's template does.
CHAT_TEMPLATE = (
    "{% if tools %}<|system|>You may call these tools; answer a call as "
    '<tool_call>{"name": ..., "arguments": ...}</tool_call>.<tools>'
    "{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools><|end|>{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' and message['tool_calls'] %}<|assistant|>{{ message['content'] or '' }}"
    "{% for call in message['tool_calls'] %}<tool_call>"
    '{"name": {{ call.function.name | tojson }}, "arguments": {{ call.function.arguments | tojson }}}'
    "</tool_call>{% endfor %}<|end|>"
    "{% elif message['role'] == 'tool' %}<|user|><tool_response>{{ message['content'] }}</tool_response><|end|>"
    "{% else %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>"
    "{% if enable_thinking is defined and not enable_thinking %}<think></think>{% endif %}{% endif %}"
)

_CORPUS = """\
The operator turns one LLMService object into the workload that serves a language model.
A Deployment runs the inference server, a Service sits in front of it, and a HorizontalPodAutoscaler
scales it on queue depth. The server speaks the OpenAI API: chat completions, completions and models.
Requests join the running batch between decode steps and leave when they are finished.
What is the capital of France? The capital of France is Paris. Paris is a city on the Seine.
Hello! How are you today? I am fine, thank you. Tell me a story about a cat and a dog.
Once upon a time there was a small robot who liked to count numbers: one, two, three, four, five.
Readiness is true only after the model is loaded and warmed, and false again while draining.
"""


def _corpus_lines() -> list[str]:
    # Repeat and recombine the lines so BPE sees enough pairs to learn ~250 merges.
    lines = [line for line in _CORPUS.splitlines() if line]
    mixed = [" ".join(pair) for pair in itertools.permutations(lines, 2)]
    return lines * 20 + mixed


def build_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD)  # type: ignore[no-untyped-call]  # untyped in transformers
    fast.chat_template = CHAT_TEMPLATE
    return fast
