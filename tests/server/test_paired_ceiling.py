"""The benchmark's ceiling beside each server run: its burst rule, and its workers over the tiny model."""

from __future__ import annotations

from pathlib import Path

from bench.paired_ceiling import PairedCeiling, burst, fraction


def _items(*max_tokens: int) -> list[dict[str, object]]:
    return [{"prompt": f"prompt {i}", "max_tokens": m} for i, m in enumerate(max_tokens)]


def test_a_burst_times_whole_batches_until_its_seconds_are_spent() -> None:
    calls: list[tuple[int, int]] = []

    def generate(prompts: list[list[int]], new_tokens: int) -> float:
        calls.append((len(prompts), new_tokens))
        return 0.4

    measured = burst(generate, lambda prompt: [len(prompt)], 2, _items(10, 20, 30, 50, 7, 7), min_seconds=0.7)
    assert calls == [(2, 15), (2, 40)]  # each batch its requests' mean output length; the third is not needed
    assert measured["batches"] == 2 and measured["tokens"] == 2 * 15 + 2 * 40
    assert measured["tok_s"] == measured["tokens"] / 0.8


def test_a_burst_runs_one_batch_at_least_and_every_item_at_most() -> None:
    def generate(prompts: list[list[int]], new_tokens: int) -> float:
        return 0.1

    assert burst(generate, lambda prompt: [1], 4, _items(8, 8, 8, 8, 8), min_seconds=0.0)["batches"] == 1
    everything = burst(generate, lambda prompt: [1], 4, _items(8, 8, 8, 8, 2), min_seconds=60.0)
    assert everything["batches"] == 2 and everything["tokens"] == 4 * 8 + 1 * 2  # a short last batch


def test_a_run_is_set_against_the_mean_of_the_ceilings_either_side() -> None:
    measured = fraction(600.0, {"tok_s": 1000.0}, {"tok_s": 500.0})
    assert measured["ceiling_tok_s"] == 750.0 and measured["fraction"] == 0.8


def test_the_workers_time_static_batches_of_the_model_under_both_thread_settings(tiny_model_dir: Path, tmp_path: Path) -> None:
    paired = PairedCeiling(tiny_model_dir, "cpu", "float32", tmp_path, min_seconds=0.0)
    try:
        first = paired.measure(2, _items(6, 10, 4, 4))
        second = paired.measure(1, _items(5))
    finally:
        codes = paired.close()
    assert set(first["by_setting"]) == {"default", "omp1"}
    for setting in first["by_setting"].values():  # one batch of two rows, 8 new tokens each
        assert setting["batches"] == 1 and setting["tokens"] == 16 and setting["seconds"] > 0
    assert first["tok_s"] == max(s["tok_s"] for s in first["by_setting"].values())
    assert all(s["tokens"] == 5 for s in second["by_setting"].values())  # the workers stay up between requests
    assert codes == {"default": 0, "omp1": 0}  # both ended on their own at EOF, not killed
