"""What every efficacy benchmark shares: the seed loop, mean and 95% interval, and the JSON / markdown / PNG writers.

Interval: for n seeds with values x_1..x_n, mean ± t_{0.975, n-1} · s / √n (s the sample standard deviation), the
Student-t interval over seeds. It treats seeds as independent draws of the whole run (init, data order, sampling);
with 3 seeds t = 4.30, so an interval is wide unless the runs agree. A paired difference (method − baseline with
the same seed, hence the same initial weights and prompt order) uses the same formula on the per-seed differences.

An efficacy script builds `runs[method][setting] = [curve per seed]`, each curve a list of `{"step": s, metric: v}`
rows, and hands it to `aggregate_curves`; the result, chosen settings included, goes to `write_outputs`.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # benchmarks/ for `_report`
from _report import write_report  # noqa: E402

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, for df = 1..30 (no scipy in the environment).
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}; beyond df = 30, the normal approximation with the first Cornish-Fisher correction."""
    if df < 1:
        raise ValueError(f"a t-interval needs at least 2 values (df >= 1), got df = {df}.")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df)


def mean_interval(values: Iterable[float]) -> dict:
    """{"mean", "lo", "hi", "n", "values"}: the 95% t-interval over the given per-seed values.

    A single value has no interval (lo = hi = None); a non-finite value makes every field NaN (a diverged run is
    reported, not dropped).
    """
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("mean_interval needs at least one value.")
    if not all(math.isfinite(x) for x in xs):
        return {"mean": float("nan"), "lo": float("nan"), "hi": float("nan"), "n": n, "values": xs}
    mean = sum(xs) / n
    if n == 1:
        return {"mean": mean, "lo": None, "hi": None, "n": 1, "values": xs}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": n, "values": xs}


def run_seeds(seeds: Iterable[int], run_one: Callable[[int], list[dict]], log: Callable[[str], None] = print,
              label: str = "") -> list[list[dict]]:
    """`run_one(seed)` for every seed, in order; returns the curves. Each run's wall time goes to `log`."""
    import time

    curves = []
    for seed in seeds:
        started = time.perf_counter()
        curves.append(run_one(seed))
        log(f"[efficacy] {label} seed {seed}: {time.perf_counter() - started:.0f} s")
    return curves


def aggregate_curves(curves: list[list[dict]], metrics: Iterable[str]) -> list[dict]:
    """Per evaluated step, `mean_interval` of each metric over the seeds' curves (all evaluated at the same steps)."""
    steps = [row["step"] for row in curves[0]]
    for curve in curves[1:]:
        if [row["step"] for row in curve] != steps:
            raise ValueError("every seed must be evaluated at the same steps to aggregate curves.")
    return [{"step": step, **{m: mean_interval(curve[i][m] for curve in curves) for m in metrics}}
            for i, step in enumerate(steps)]


def paired_difference(curves_a: list[list[dict]], curves_b: list[list[dict]], metric: str, index: int = -1) -> dict:
    """`mean_interval` of a − b at evaluation `index` (default: the last), pairing the i-th seed of each."""
    if len(curves_a) != len(curves_b):
        raise ValueError("a paired difference needs the same seeds for both methods.")
    return mean_interval(a[index][metric] - b[index][metric] for a, b in zip(curves_a, curves_b))


def best_setting(values_by_setting: dict[str, list[float]], higher_is_better: bool) -> str | None:
    """The setting (e.g. a learning rate, as its string) with the best seed-mean value, the benchmarks' lr rule.

    Settings are visited in increasing numeric order and a later one must beat the best by more than 1e-6, so ties go
    to the smaller setting; a setting with no values or a non-finite one is never chosen. None when nothing qualifies.
    """
    best = None
    for setting, values in sorted(values_by_setting.items(), key=lambda kv: float(kv[0])):
        if not values or not all(math.isfinite(v) for v in values):
            continue
        mean = sum(values) / len(values)
        if best is None or (mean > best[1] + 1e-6 if higher_is_better else mean < best[1] - 1e-6):
            best = (setting, mean)
    return None if best is None else best[0]


def verdict(diff: dict, names: tuple[str, str], higher_is_better: bool = True) -> str:
    """A paired difference a − b in the pre-registered words: "<a> better" / "<b> better" only when its 95% interval
    excludes 0 that way, else the null "no difference detected at this size"."""
    if diff["lo"] is None or not math.isfinite(diff["mean"]):
        return "no interval (fewer than 2 finite seeds)"
    better = diff["lo"] > 0 if higher_is_better else diff["hi"] < 0
    worse = diff["hi"] < 0 if higher_is_better else diff["lo"] > 0
    if better:
        return f"{names[0]} better"
    return f"{names[1]} better" if worse else "no difference detected at this size"


def format_interval(stat: dict, digits: int = 3) -> str:
    """"m [lo, hi]" for the markdown tables; "m" alone for a single seed."""
    if stat["lo"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{stat['lo']:.{digits}f}, {stat['hi']:.{digits}f}]"


def apply_overrides(sizes: dict, overrides: Iterable[str]) -> dict:
    """The benchmarks' `--set key=json` overrides applied to a size's settings, in place; an unknown key is an error
    naming the known ones (a typo must not silently run the planned protocol)."""
    import json

    for item in overrides:
        key, _, value = item.partition("=")
        if key not in sizes:
            raise ValueError(f"--set {item}: unknown key {key!r}; the keys are {sorted(sizes)}.")
        sizes[key] = json.loads(value)
    return sizes


def run_status(result: dict) -> str:
    """The markdown's status word: a partial run (stopped before every planned setting finished) says so."""
    if result["complete"]:
        return "complete"
    return "PARTIAL — the run stopped before every planned seed/setting finished"


def header_lines(result: dict, title: str, pairing: str, threads: str = "threads", seeds: str = "seeds",
                 wall_note: str = "") -> list[str]:
    """The markdown's opening lines: title, status, the command, threads, wall time, and how to read the intervals
    (`pairing` says what the paired differences hold equal)."""
    return [f"# {title}", "",
            f"Status: **{run_status(result)}**. Command: `{result['command']}`; {result['threads']} {threads}; wall "
            f"time {result['seconds']:.0f} s{wall_note}. Means over {seeds} with 95% t-intervals `mean [lo, hi]` "
            f"(benchmarks/efficacy/common.py); {pairing}", ""]


def reading_and_plot_lines(result: dict, plot_note: str) -> list[str]:
    """The markdown's closing lines: the reading (when written) and where the plot is."""
    lines = ["## Reading", "", result["reading"].strip(), ""] if result.get("reading") else []
    return lines + [f"Plot: the PNG of the same name next to this file ({plot_note}).", ""]


def plot_curves(path: str, panels: list[dict]) -> None:
    """One PNG: a row of panels, each {"title", "ylabel", "series": [{"label", "curve", "metric"}], "hline"?}, or a bar
    panel {"title", "ylabel", "bars": [{"label", "stat"}]} (final values with their 95% intervals).

    `curve` is an `aggregate_curves` result; each series is its mean line with the 95% interval shaded.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = sorted({p.get("row", 0) for p in panels})
    cols = max(sum(1 for p in panels if p.get("row", 0) == r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(4.2 * cols, 3.3 * len(rows)), squeeze=False)
    used = set()
    for r, row in enumerate(rows):  # row keys need not be contiguous
        for c, panel in enumerate(p for p in panels if p.get("row", 0) == row):
            ax = axes[r][c]
            used.add((r, c))
            if panel.get("bars"):  # one bar per {"label", "stat"} (a `mean_interval`), 95% interval as the error bar
                _bar_panel(ax, panel)
                continue
            for series in panel["series"]:
                steps = [row["step"] for row in series["curve"]]
                stats = [row[series["metric"]] for row in series["curve"]]
                line, = ax.plot(steps, [s["mean"] for s in stats], marker="o", ms=3, label=series["label"])
                if all(s["lo"] is not None for s in stats):
                    ax.fill_between(steps, [s["lo"] for s in stats], [s["hi"] for s in stats],
                                    color=line.get_color(), alpha=0.2)
            if panel.get("hline") is not None:
                ax.axhline(panel["hline"]["y"], color="gray", ls="--", lw=1, label=panel["hline"]["label"])
            ax.set_title(panel["title"], fontsize=9)
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(panel["ylabel"], fontsize=8)
            ax.legend(fontsize=7)
    for r in range(len(rows)):
        for c in range(cols):
            if (r, c) not in used:
                axes[r][c].set_visible(False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bar_panel(ax, panel: dict) -> None:
    bars = panel["bars"]
    means = [b["stat"]["mean"] for b in bars]
    errors = [[m - (b["stat"]["lo"] if b["stat"]["lo"] is not None else m) for m, b in zip(means, bars)],
              [(b["stat"]["hi"] if b["stat"]["hi"] is not None else m) - m for m, b in zip(means, bars)]]
    ax.bar(range(len(bars)), means, yerr=errors, capsize=4, color=[f"C{i}" for i in range(len(bars))])
    ax.set_xticks(range(len(bars)), [b["label"] for b in bars], fontsize=7)
    ax.set_title(panel["title"], fontsize=9)
    ax.set_ylabel(panel["ylabel"], fontsize=8)


def write_outputs(result: dict, out_prefix: str | None, to_markdown: Callable[[dict], str],
                  panels: list[dict] | None) -> None:
    """`<prefix>.json`, `<prefix>.md` (through `_report.write_report`) and `<prefix>.png` (when panels are given)."""
    if not out_prefix:
        return
    write_report(result, out_prefix + ".json", out_prefix + ".md", to_markdown)
    if panels:
        plot_curves(out_prefix + ".png", panels)
