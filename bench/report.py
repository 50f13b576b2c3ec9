"""What a server benchmark's results say: ratios against the baselines and ceilings, tables, a plot."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from bench.ceilings import roofline_at
from bench.plots import pyplot
from bench.systems import SERVER_SYSTEMS

TARGETS = {
    "ours_over_seed_at_16": 15.0,
    "ours_over_tserve_at_16": 1.4,
    "ours_fraction_of_static_at_16": 0.80,
    "ours_fraction_of_bare_at_1": 0.90,
    "livez_p99_ms_saturated": 20.0,
}


def _get(d: dict[str, Any] | None, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _fmt(value: float | None, spec: str = ".0f", suffix: str = "") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def analyse(results: dict[str, Any]) -> dict[str, Any]:
    """Per concurrency: the ratios and fractions the issue asks for.

    Two readings: each system as shipped (default threads), and each system at its best thread
    setting ("best": the fastest of X, X-omp1 and X-allcores at that level, of those that were run).
    """
    systems = results["systems"]
    inproc = systems.get("inprocess") or {}
    roof = _get(inproc, "default", "roofline")
    rows = []
    for c in results["config"]["concurrency"]:
        key = str(c)

        def tput(system: str, key: str = key) -> float | None:
            level = _get(systems.get(system), "levels", key)
            return float(level["output_throughput"]) if level and level.get("completed") else None

        def best(base: str) -> float | None:
            values = [v for v in (tput(base), tput(base + "-omp1"), tput(base + "-allcores")) if v is not None]
            return max(values) if values else None

        ceilings = []
        for label in ("default", "omp1"):
            value = _get(inproc, label, "bare", "tok_s") if c == 1 else _get(inproc, label, "static", key, "tok_s")
            if value is not None:
                ceilings.append(float(value))
        ceiling = max(ceilings) if ceilings else None
        engines = [float(v) for label in ("default", "omp1") if (v := _get(inproc, label, "engine", key, "tok_s")) is not None]
        engine = max(engines) if engines else None
        ours = tput("ours")
        roof_c = roofline_at(roof, c)
        paired = {s: _paired(systems.get(s), key, "repeats_paired_fraction") for s in SERVER_SYSTEMS}
        row: dict[str, Any] = {
            "concurrency": c,
            "tok_s": {s: tput(s) for s in SERVER_SYSTEMS},
            "best_tok_s": {base: best(base) for base in ("ours", "seed", "tserve")},
            "inprocess_ceiling_tok_s": ceiling,
            "engine_tok_s": engine,
            "engine_fraction_of_inprocess": _ratio(engine, ceiling),
            "best_ours_fraction_of_engine": _ratio(best("ours"), engine),
            "ours_over_seed": _ratio(ours, tput("seed")),
            "ours_over_seed_locked": _ratio(ours, tput("seed-locked")),
            "ours_over_tserve": _ratio(ours, tput("tserve")),
            "best_ours_over_best_seed": _ratio(best("ours"), best("seed")),
            "best_ours_over_best_tserve": _ratio(best("ours"), best("tserve")),
            "ours_fraction_of_inprocess": _ratio(ours, ceiling),
            "best_ours_fraction_of_inprocess": _ratio(best("ours"), ceiling),
            "roofline_tok_s": roof_c,
            # Each run against the static batch timed right before and after it (bench/paired_ceiling.py), median over repeats.
            "paired_fraction": paired,
            "paired_ceiling_tok_s": {s: _paired(systems.get(s), key, "repeats_paired_ceiling_tok_s") for s in SERVER_SYSTEMS},
            "best_ours_paired_fraction": max((v for s in ("ours", "ours-omp1", "ours-allcores") if (v := paired[s])), default=None),
            "ours_fraction_of_roofline": _ratio(ours, roof_c),
            "best_ours_fraction_of_roofline": _ratio(best("ours"), roof_c),
            "ttft_ms": {s: _get(systems.get(s), "levels", key, "ttft_ms") for s in SERVER_SYSTEMS},
            "tpot_p50_ms": {s: _get(systems.get(s), "levels", key, "tpot_ms", "p50") for s in SERVER_SYSTEMS},
            "livez_p99_ms": {s: _get(systems.get(s), "levels", key, "livez_ms", "p99") for s in SERVER_SYSTEMS},
            "goodput": {s: _get(systems.get(s), "levels", key, "goodput") for s in SERVER_SYSTEMS},
            "completed": {s: _get(systems.get(s), "levels", key, "completed") for s in SERVER_SYSTEMS},
            "other_cores": {s: _get(systems.get(s), "levels", key, "cpu", "other_cores") for s in SERVER_SYSTEMS},
            "server_us_per_token": {s: _server_cpu_per_token(systems.get(s), key) for s in SERVER_SYSTEMS},
            "client_us_per_token": {s: _client_cpu_per_token(systems.get(s), key) for s in SERVER_SYSTEMS},
        }
        rows.append(row)
    return {"rows": rows, "targets": TARGETS}


def _paired(system: dict[str, Any] | None, key: str, field: str) -> float | None:
    """The median over repeats of a level's paired-ceiling numbers (None without them)."""
    values = _get(system, "levels", key, field)
    return float(statistics.median(values)) if values else None


def _server_cpu_per_token(system: dict[str, Any] | None, key: str) -> float | None:
    """CPU microseconds per output token of a level used by the server (its whole session)."""
    level = _get(system, "levels", key)
    cores, wall = _get(level, "cpu", "server_cores"), _get(level, "cpu", "wall_s")
    if not level or cores is None or wall is None or not level.get("total_output_tokens"):
        return None
    return float(cores) * float(wall) / float(level["total_output_tokens"]) * 1e6


def _client_cpu_per_token(system: dict[str, Any] | None, key: str) -> float | None:
    """... and by the load generator's own process (its /livez poller, a process of its own, left out)."""
    level = _get(system, "levels", key)
    if not level or level.get("client_cpu_s") is None or not level.get("total_output_tokens"):
        return None
    return float(level["client_cpu_s"]) / float(level["total_output_tokens"]) * 1e6


def markdown(results: dict[str, Any]) -> str:
    rows = results["analysis"]["rows"]
    present = [s for s in SERVER_SYSTEMS if s in results["systems"]]
    lines = ["Output-token throughput (tok/s):", ""]
    head = ["streams", *present, "in-process ceiling", "engine (no HTTP)", "roofline"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["concurrency"]), *[_fmt(r["tok_s"][s], ".1f") for s in present]]
        cells += [_fmt(r["inprocess_ceiling_tok_s"], ".1f"), _fmt(r.get("engine_tok_s"), ".1f"), _fmt(r["roofline_tok_s"], ".0f")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Ratios - as shipped (default threads) | each at its best thread setting (best of X, X-omp1, X-allcores):", ""]
    head = ["streams", "ours/seed", "ours/seed-locked", "ours/tserve", "ours / ceiling", "ours / ceiling beside it", "ours % roofline"]
    head += ["best ours / best seed", "best ours / best tserve", "best ours / ceiling", "best ours / ceiling beside it"]
    head += ["best ours % roofline", "best ours / engine"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [str(r["concurrency"]), _fmt(r["ours_over_seed"], ".2f", "x"), _fmt(r.get("ours_over_seed_locked"), ".2f", "x")]
        cells += [_fmt(r["ours_over_tserve"], ".2f", "x")]
        cells += [_fmt(_pct(r["ours_fraction_of_inprocess"]), ".0f", " %")]
        cells += [_fmt(_pct(r.get("paired_fraction", {}).get("ours")), ".0f", " %")]
        cells += [_fmt(_pct(r["ours_fraction_of_roofline"]), ".1f", " %")]
        cells += [_fmt(r["best_ours_over_best_seed"], ".2f", "x"), _fmt(r["best_ours_over_best_tserve"], ".2f", "x")]
        cells += [
            _fmt(_pct(r["best_ours_fraction_of_inprocess"]), ".0f", " %"),
            _fmt(_pct(r.get("best_ours_paired_fraction")), ".0f", " %"),
            _fmt(_pct(r["best_ours_fraction_of_roofline"]), ".1f", " %"),
            _fmt(_pct(r.get("best_ours_fraction_of_engine")), ".0f", " %"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    title = (
        "Latency (TTFT p50 / p99, TPOT p50: ms), goodput, /livez p99 (ms), CPU per output token (us; the server"
        " is all its processes, the client the load generator's own process), CPU used by other processes (cores),"
        " and the run against the static batch timed right before and after it (its tok/s; median over repeats):"
    )
    lines += ["", title, ""]
    head = ["streams", "system", "done", "TTFT p50", "TTFT p99", "TPOT p50", "goodput req/s", "/livez p99", "server CPU/token"]
    head += ["client CPU/token", "other load", "of the ceiling beside it", "ceiling beside it"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for s in present:
            ttft = r["ttft_ms"][s] or {}
            cells = [str(r["concurrency"]), s, _fmt(r["completed"][s], "d"), _fmt(ttft.get("p50")), _fmt(ttft.get("p99"))]
            cells += [_fmt(r["tpot_p50_ms"][s], ".1f"), _fmt(r["goodput"][s], ".2f"), _fmt(r["livez_p99_ms"][s], ".1f")]
            cells += [_fmt(r.get("server_us_per_token", {}).get(s), ".0f"), _fmt(r.get("client_us_per_token", {}).get(s), ".0f")]
            cells += [_fmt(r["other_cores"][s], ".2f")]
            cells += [_fmt(_pct(r.get("paired_fraction", {}).get(s)), ".0f", " %"), _fmt(r.get("paired_ceiling_tok_s", {}).get(s), ".0f")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _x_axis(ax: Any, xs: list[int]) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.xaxis.set_minor_formatter(NullFormatter())
    if ax.get_yscale() == "log":
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())


def plot(results: dict[str, Any], path: Path) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    rows = results["analysis"]["rows"]
    xs = [r["concurrency"] for r in rows]
    present = [s for s in SERVER_SYSTEMS if any(r["tok_s"][s] is not None for r in rows)]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    for s in present:
        ax.plot(xs, [r["tok_s"][s] for r in rows], marker="o", label=s)
    ax.plot(xs, [r["inprocess_ceiling_tok_s"] for r in rows], "k--", marker="x", label="in-process (bare / static batch)")
    if any(r.get("engine_tok_s") for r in rows):
        ax.plot(xs, [r.get("engine_tok_s") for r in rows], "k:", marker="+", label="our engine, no HTTP")
    ax.set(yscale="log", xlabel="concurrent streams", ylabel="output tokens/s", title="Throughput")
    _x_axis(ax, xs)
    ax.legend(fontsize=8)
    ax = axes[1]
    for i, s in enumerate(present):
        color = f"C{i}"
        ax.plot(xs, [_get(r["ttft_ms"][s], "p50") for r in rows], marker="o", color=color, label=f"{s} p50")
        ax.plot(xs, [_get(r["ttft_ms"][s], "p99") for r in rows], marker="^", linestyle=":", color=color, label=f"{s} p99")
    ax.set(yscale="log", xlabel="concurrent streams", ylabel="ms", title="Time to first token")
    _x_axis(ax, xs)
    ax.legend(fontsize=7)
    ax = axes[2]
    for s in present:
        ax.plot(xs, [r["livez_p99_ms"][s] for r in rows], marker="o", label=s)
    ax.axhline(TARGETS["livez_p99_ms_saturated"], color="red", linestyle="--", linewidth=1, label="target 20 ms")
    ax.set(xlabel="concurrent streams", ylabel="ms", title="/livez (tserve: /health) p99 during the run")
    _x_axis(ax, xs)
    ax.legend(fontsize=8)
    fig.suptitle(f"server benchmark - model {results['config']['model']} - {results['machine']['nproc']} CPUs, shared machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def replot(saved: Path) -> None:
    results = json.loads(saved.read_text())
    results["analysis"] = analyse(results)
    results["markdown"] = markdown(results)
    saved.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, saved.with_suffix(".png"))
    print(results["markdown"])
