"""Unit tests of the pure parts: sampling, admission, stop strings, protocol, settings."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from llmservice_server.admission import Admission, Admitted, Rejected
from llmservice_server.events import SamplingParams
from llmservice_server.loader import converted_dir
from llmservice_server.protocol import ChatCompletionRequest, CompletionRequest
from llmservice_server.sampling import RowSampler, apply_penalties, select_tokens, top_p_filter
from llmservice_server.settings import Settings, parse_settings
from llmservice_server.source import Source
from llmservice_server.textstream import StopMatcher
from llmservice_server.threads import EXPLORE_EVERY, FIRST_STEPS, MAX_EXPLORE_INTERVAL, ThreadPlan, ThreadTuner, plan_threads

# --- sampling ---


def test_greedy_rows_take_the_argmax_and_report_logprobs() -> None:
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, 0.0, 1.0]])
    samplers = [
        RowSampler.create(SamplingParams(temperature=0.0, logprobs=2), 3, None),
        RowSampler.create(SamplingParams(temperature=0.0), 3, None),
    ]
    first, second = select_tokens(logits, samplers)
    assert (first.token, second.token) == (1, 0)
    assert first.logprob == pytest.approx(float(torch.log_softmax(logits[0], -1)[1]))
    assert [t for t, _ in first.top] == [1, 2]
    assert second.logprob is None


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    assert top_p_filter(probs.clone(), 0.7).tolist() == pytest.approx([0.5, 0.3, 0.0, 0.0])
    assert top_p_filter(probs.clone(), 0.1).tolist() == pytest.approx([0.5, 0.0, 0.0, 0.0])


def test_penalties_follow_openai_definition() -> None:
    counts = torch.tensor([0.0, 2.0, 1.0])
    out = apply_penalties(torch.zeros(3), counts, SamplingParams(presence_penalty=0.5, frequency_penalty=1.0))
    assert out.tolist() == pytest.approx([0.0, -2.5, -1.5])


def test_seeded_sampling_is_reproducible_and_seed_sensitive() -> None:
    logits = torch.zeros((1, 50))
    params = SamplingParams(temperature=1.0)

    def draw(seed: int) -> list[int]:
        sampler = RowSampler.create(params, 50, seed)
        return [select_tokens(logits, [sampler])[0].token for _ in range(20)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


# --- admission ---


@pytest.mark.parametrize("temperature", [5e-324, 1e-30, 1e-6])
def test_a_vanishing_temperature_is_greedy(temperature: float) -> None:
    # 5e-324 once made logits / t overflow to inf, softmax NaN, and multinomial raise on the engine thread.
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    sampler = RowSampler.create(SamplingParams(temperature=temperature), 4, seed=1)
    assert [c.token for c in select_tokens(logits, [sampler])] == [1]


def test_a_small_temperature_samples_without_overflow() -> None:
    logits = torch.tensor([[0.0, 300.0, 1.0, 299.99]])
    sampler = RowSampler.create(SamplingParams(temperature=1e-4), 4, seed=1)
    assert select_tokens(logits, [sampler])[0].token == 1  # (logits - max) / t: no inf, no NaN


def test_a_vanishing_top_p_keeps_the_top_token() -> None:
    # 5e-324 rounds to 0.0 in float32: the old filter then removed every token.
    probs = torch.tensor([0.2, 0.5, 0.3])
    assert top_p_filter(probs.clone(), 5e-324).tolist() == pytest.approx([0.0, 0.5, 0.0])
    sampler = RowSampler.create(SamplingParams(temperature=1.0, top_p=5e-324), 3, seed=3)
    assert select_tokens(torch.log(probs)[None], [sampler])[0].token == 1


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_vanishing_repetition_penalty_samples_without_overflow(temperature: float) -> None:
    # 5e-324 divided a seen token's positive logit to inf: softmax NaN, multinomial raising on the engine thread.
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    params = SamplingParams(temperature=temperature, repetition_penalty=5e-324)
    sampler = RowSampler.create(params, 4, seed=1, prompt=[0, 2])
    assert select_tokens(logits, [sampler])[0].token == 0  # the seen positive logit now outranks every other


def test_admission_bounds_running_plus_waiting() -> None:
    admission = Admission(max_running=2, max_waiting=1)
    grants = [admission.try_acquire(1, ready=True) for _ in range(3)]
    assert all(isinstance(g, Admitted) for g in grants)
    refused = admission.try_acquire(1, ready=True)
    assert isinstance(refused, Rejected) and refused.status == 429 and refused.retry_after >= 1
    assert isinstance(admission.try_acquire(2, ready=True), Rejected)
    admission.release(Admitted(1))
    assert isinstance(admission.try_acquire(1, ready=True), Admitted)


def test_admission_not_ready_and_draining_are_503() -> None:
    admission = Admission(4, 4)
    not_ready = admission.try_acquire(1, ready=False)
    assert isinstance(not_ready, Rejected) and (not_ready.status, not_ready.reason) == (503, "not_ready")
    admission.start_draining()
    draining = admission.try_acquire(1, ready=True)
    assert isinstance(draining, Rejected) and (draining.status, draining.reason) == (503, "draining")
    assert admission.idle


def test_admission_refuses_double_release() -> None:
    admission = Admission(1, 0)
    with pytest.raises(RuntimeError):
        admission.release(Admitted(1))


# --- stop strings ---


@given(st.text(alphabet="abc", max_size=30), st.lists(st.integers(1, 5), max_size=10), st.sampled_from(["ab", "cab", "bb", "c"]))
def test_stop_matcher_equals_cutting_the_whole_text(text: str, cuts: list[int], stop: str) -> None:
    matcher = StopMatcher([stop])
    released, position = "", 0
    for size in [*cuts, len(text)]:
        released += matcher.push(text[position : position + size])
        position += size
        if matcher.stopped:
            break
    released += matcher.finish()
    index = text.find(stop)
    assert released == (text if index < 0 else text[:index])
    assert matcher.stopped == (index >= 0)


def test_stop_matcher_holds_back_a_possible_prefix() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("abcE") == "abc"
    assert matcher.push("N") == ""
    assert matcher.push("x") == "ENx"
    assert matcher.push("yEND tail") == "y"
    assert matcher.stopped


# --- protocol ---


def test_chat_request_rejects_unknown_and_inconsistent_fields() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**base, "functions": []})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({**base, "stream_options": {"include_usage": True}})
    request = ChatCompletionRequest.model_validate({**base, "tool_choice": "none", "response_format": {"type": "text"}, "user": "u"})
    assert request.unsupported_field() is None
    assert ChatCompletionRequest.model_validate({**base, "logit_bias": {"5": 1.0}}).unsupported_field() == "logit_bias"
    with pytest.raises(ValidationError, match="needs tools"):
        ChatCompletionRequest.model_validate({**base, "tool_choice": "required"})
    assert ChatCompletionRequest.model_validate({**base, "max_tokens": 5, "max_completion_tokens": 7}).token_limit() == 7


def test_requests_refuse_what_the_engine_or_encoder_cannot_take() -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    ChatCompletionRequest.model_validate({**chat, "seed": 2**63 - 1})
    ChatCompletionRequest.model_validate({**chat, "seed": -(2**63)})
    for seed in (2**63, -(2**63) - 1, 2**70):  # torch.Generator.manual_seed raises beyond 64 bits
        with pytest.raises(ValidationError, match="seed"):
            ChatCompletionRequest.model_validate({**chat, "seed": seed})
    # JSON can carry lone surrogates; neither the tokenizer nor a UTF-8 response can.
    lone = json.loads('"a\\ud800b"')
    with pytest.raises(ValidationError, match="lone surrogates"):
        ChatCompletionRequest.model_validate({**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": lone}]}]})
    for field in ({"prompt": lone}, {"prompt": ["ok", lone]}, {"prompt": "x", "stop": [lone]}, {"prompt": "x", "user": lone}):
        with pytest.raises(ValidationError, match="lone surrogates"):
            CompletionRequest.model_validate({"model": "m", **field})
    paired = json.loads('"\\ud83d\\ude00"')  # a surrogate pair is one real character
    assert ChatCompletionRequest.model_validate({**chat, "messages": [{"role": "user", "content": paired}]}).messages[0].text() == "😀"


def test_completion_request_prompt_shapes() -> None:
    for prompt in ["x", ["x", "y"], [1, 2], [[1], [2, 3]]]:
        assert CompletionRequest.model_validate({"model": "m", "prompt": prompt}).max_tokens == 16
    for bad in [[], [[]]]:
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate({"model": "m", "prompt": bad})
    assert CompletionRequest.model_validate({"model": "m", "prompt": "x", "best_of": 2}).unsupported_field() == "best_of"


# --- settings ---


def test_settings_from_env_and_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMSERVICE_MAX_QUEUE", "7")
    monkeypatch.setenv("LLMSERVICE_MAX_NUM_SEQS", "3")
    settings = parse_settings(["--model", "/m", "--max-num-seqs", "5", "--trust-remote-code", "--dtype", "float16"])
    assert (settings.model, settings.max_queue, settings.max_num_seqs) == ("/m", 7, 5)
    assert settings.trust_remote_code and settings.dtype == "float16"
    monkeypatch.delenv("LLMSERVICE_MAX_QUEUE")
    monkeypatch.delenv("LLMSERVICE_MAX_NUM_SEQS")
    for key, value in settings.to_env().items():
        monkeypatch.setenv(key, value)
    assert Settings() == settings


def test_a_converted_gguf_is_cached_by_its_content_not_its_path(tmp_path: Path) -> None:
    # The same file installed into two virtualenvs is one cache entry; other bytes are another.
    settings = Settings(model="bundled", cache_dir=tmp_path / "cache")
    first, second, other = tmp_path / "venv1", tmp_path / "venv2", tmp_path / "venv3"
    for folder, content in ((first, b"GGUF weights"), (second, b"GGUF weights"), (other, b"GGUF other weights")):
        folder.mkdir()
        (folder / "m.gguf").write_bytes(content)
    os.utime(second / "m.gguf", ns=(0, 0))  # a reinstall: same bytes, another mtime
    cached = [converted_dir(settings, Source(str(folder), "m.gguf", "m")) for folder in (first, second, other)]
    assert cached[0] == cached[1] != cached[2]
    assert cached[0].parent == tmp_path / "cache" and cached[0].name.startswith("m-")


def test_a_gguf_in_a_hub_repo_is_cached_by_repo_file_and_revision() -> None:
    source = Source("org/model", "m.gguf", "org/model")
    main, pinned = Settings(model="org/model"), Settings(model="org/model", revision="abc123")
    assert converted_dir(main, source) == converted_dir(main, source) != converted_dir(pinned, source)


# --- torch threads per step ---


def test_a_step_gets_every_core_from_the_work_where_a_second_thread_pays() -> None:
    smollm2 = plan_threads(cores=2, hidden_size=576)  # 2.5e6 multiply-adds: 8 tokens of hidden 576
    assert smollm2 == ThreadPlan(small=1, large=2, min_tokens=8)
    assert [smollm2.for_step(tokens) for tokens in (1, 4, 7, 8, 40)] == [1, 1, 1, 2, 2]
    assert plan_threads(cores=2, hidden_size=64).min_tokens == 611  # a tiny model: only a long prompt read at once
    assert plan_threads(cores=8, hidden_size=4096) == ThreadPlan(small=7, large=8, min_tokens=1)


def test_one_core_an_explicit_count_or_an_unknown_width_fix_the_threads() -> None:
    assert {plan_threads(cores=1, hidden_size=576).for_step(t) for t in (1, 100)} == {1}
    assert plan_threads(cores=8, hidden_size=576, explicit=3) == ThreadPlan(3, 3, 1)
    assert plan_threads(cores=4, hidden_size=None) == ThreadPlan(3, 3, 1)


def drive(tuner: ThreadTuner, tokens: int, steps: int, seconds: Callable[[int], float]) -> list[int]:
    """Run `steps` steps of `tokens` through the tuner, each taking `seconds(threads)`; the threads chosen."""
    chosen = []
    for _ in range(steps):
        threads = tuner.choose(tokens)
        tuner.record(tokens, threads, seconds(threads))
        chosen.append(threads)
    return chosen


def test_the_tuner_times_both_counts_from_the_plans_guess_then_runs_the_faster() -> None:
    tuner = ThreadTuner(ThreadPlan(small=1, large=2, min_tokens=8))
    learn = 2 * FIRST_STEPS
    two_threads_faster = drive(tuner, 4, learn + 3 * EXPLORE_EVERY, lambda threads: 1.0 / threads)
    assert two_threads_faster[:learn] == [1] * FIRST_STEPS + [2] * FIRST_STEPS  # the plan's guess for a small step first
    # One thread was twice as slow: it is timed again after twice EXPLORE_EVERY steps.
    assert two_threads_faster[learn:] == [2] * (2 * EXPLORE_EVERY - 1) + [1] + [2] * EXPLORE_EVERY
    # Each size learns on its own: large steps still start from the plan's guess.
    assert tuner.choose(8) == 2 and tuner.choose(100) == 2
    one_thread_faster = drive(tuner, 100, learn + EXPLORE_EVERY, float)
    assert one_thread_faster == [2] * FIRST_STEPS + [1] * (FIRST_STEPS + EXPLORE_EVERY)


def test_a_much_slower_count_is_timed_rarely() -> None:
    tuner = ThreadTuner(ThreadPlan(small=1, large=2, min_tokens=8))
    chosen = drive(tuner, 4, 2 * FIRST_STEPS + MAX_EXPLORE_INTERVAL, lambda threads: 1.0 if threads == 1 else 1000.0)
    assert chosen.count(2) == FIRST_STEPS + 1  # while comparing, then once after the capped interval
    assert chosen[-1] == 2


def test_the_tuner_turns_back_when_the_machine_changes_and_ignores_one_slow_step() -> None:
    tuner = ThreadTuner(ThreadPlan(small=1, large=2, min_tokens=8))
    drive(tuner, 4, 2 * EXPLORE_EVERY, lambda threads: 1.0 / threads)
    assert tuner.choose(4) == 2
    tuner.record(4, 2, 100.0)  # one step preempted: the median of the recent ones holds
    assert tuner.choose(4) == 2
    busy = drive(tuner, 4, 4 * EXPLORE_EVERY, lambda threads: 3.0 if threads == 2 else 1.0)  # a neighbour took the second core
    assert busy[:2] == [2, 2] and busy[-2 * EXPLORE_EVERY :] == [1] * (2 * EXPLORE_EVERY)


def test_a_fixed_count_is_never_tuned() -> None:
    tuner = ThreadTuner(ThreadPlan(3, 3, 1))
    assert set(drive(tuner, 4, 2 * EXPLORE_EVERY, lambda threads: 1.0)) == {3}
