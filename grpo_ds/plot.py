"""`grpo-ds plot RUN_DIR [--out FILE.png]`: one PNG of a run's main curves.

Reads RUN_DIR/metrics.jsonl (one JSON object per logged step) and, if present, RUN_DIR/summary.json
for the supervised warm-up's accuracy curve. Panels: reward (mean and +-1 std over the step's
samples), KL to the reference, completion length (mean, min..max), the warm-up's held-out accuracy,
GRPO's held-out greedy accuracy (with, for a multi-turn run, the share of sampled episodes that
call a tool), and the time per step by phase. matplotlib is an optional extra:
`pip install -e .[plot]`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_series(metrics_jsonl: Path) -> dict[str, dict[int, float]]:
    """{tag: {step: value}}; a step logged twice (a resumed run) keeps its last value."""
    series: dict[str, dict[int, float]] = {}
    for line in metrics_jsonl.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        step = int(row.pop("step"))
        for tag, value in row.items():
            series.setdefault(tag, {})[step] = value
    return series


def points(series: dict[str, dict[int, float]], tag: str) -> tuple[list[int], list[float]]:
    steps = sorted(series.get(tag, {}))
    return steps, [series[tag][s] for s in steps]


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values: [1, 2, 3, 4], 2 -> [1, 1.5, 2.5, 3.5]."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw_line(ax, steps, values, label=None, color=None):
    """The raw curve, plus a trailing mean when there are enough points to be noisy."""
    if len(values) >= 20:
        ax.plot(steps, values, color=color, alpha=0.3, linewidth=1)
        window = max(2, len(values) // 20)
        ax.plot(steps, moving_average(values, window), color=color, linewidth=2,
                label=f"{label or 'mean'} ({window}-step mean)")
    else:
        ax.plot(steps, values, color=color, marker="o", markersize=3, label=label)


TOOL_RATE = "tools/episodes_with_call"  # multi-turn runs: share of episodes with a tool call


def draw_reward(ax, series):
    steps, reward = points(series, "reward")
    _, reward_std = points(series, "reward_std")
    if reward_std:
        ax.fill_between(steps, [m - s for m, s in zip(reward, reward_std)],
                        [m + s for m, s in zip(reward, reward_std)],
                        color="tab:blue", alpha=0.15, label="+-1 std")
    draw_line(ax, steps, reward, "reward", "tab:blue")
    ax.set_title("reward")


def draw_kl(ax, series):
    draw_line(ax, *points(series, "kl"), "kl", "tab:red")
    ax.set_title("KL(policy || reference), per token")


def draw_length(ax, series):
    steps, length = points(series, "completions/mean_length")
    _, low = points(series, "completions/min_length")
    _, high = points(series, "completions/max_length")
    if low and high:
        ax.fill_between(steps, low, high, color="tab:green", alpha=0.15, label="min..max")
    draw_line(ax, steps, length, "mean", "tab:green")
    ax.set_title("completion length (tokens)")


def draw_warmup(ax, curve: list[dict]):
    if curve:
        ax.plot([p["step"] for p in curve], [p["accuracy"] for p in curve],
                color="tab:gray", marker="o", markersize=3)
        ax.set_xlabel("supervised warm-up step")
    else:
        ax.text(0.5, 0.5, "no warm-up in this run", ha="center", va="center",
                transform=ax.transAxes, color="gray")
    ax.set_title("warm-up: held-out greedy accuracy")


def draw_eval(ax, series, curve: list[dict]):
    steps, accuracy = points(series, "eval/accuracy")
    ax.plot(steps, accuracy, color="tab:purple", marker="o", markersize=4,
            label="held-out greedy accuracy")
    if curve:
        ax.axhline(curve[-1]["accuracy"], color="tab:gray", linestyle="--",
                   label="end of warm-up")
    ax.set_title("GRPO: held-out greedy accuracy")
    if series.get(TOOL_RATE):  # a multi-turn run: how often the sampled episodes call a tool
        draw_line(ax, *points(series, TOOL_RATE), "sampled episodes calling a tool", "tab:orange")
        ax.set_title("GRPO: held-out accuracy and tool-call rate")


def draw_time(ax, series):
    """Seconds per step, stacked by phase (a phase missing at some step is left out)."""
    steps, _ = points(series, "time/step")
    bottom = [0.0] * len(steps)
    for tag, label in [("time/generation", "generation"), ("time/reference", "reference"),
                       ("time/update", "update")]:
        _, seconds = points(series, tag)
        if len(seconds) == len(steps):
            ax.bar(steps, seconds, bottom=bottom, label=label, width=1.0)
            bottom = [b + s for b, s in zip(bottom, seconds)]
    ax.set_title("seconds per step")


def draw(series: dict, summary: dict | None, run_name: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(15, 8.5), constrained_layout=True)
    title = f"grpo-ds run: {run_name}"
    if summary and summary.get("accuracy_after") is not None:
        title += (f"   (held-out accuracy {summary['accuracy_before']:.3f} -> "
                  f"{summary['accuracy_after']:.3f} in {summary.get('steps', '?')} GRPO steps)")
    fig.suptitle(title, fontsize=14)
    (reward_ax, kl_ax, length_ax), (warm_ax, eval_ax, time_ax) = axes
    curve = (summary or {}).get("warmup_curve") or []
    draw_reward(reward_ax, series)
    draw_kl(kl_ax, series)
    draw_length(length_ax, series)
    draw_warmup(warm_ax, curve)
    draw_eval(eval_ax, series, curve)
    draw_time(time_ax, series)
    for ax in (warm_ax, eval_ax):  # one scale, so the two phases compare at a glance
        ax.set_ylim(-0.02, 1.02)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if ax is not warm_ax:
            ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="grpo-ds plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory (holds metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="PNG to write (default RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    metrics = args.run_dir / "metrics.jsonl"
    if not metrics.is_file():
        print(f"grpo-ds plot: no metrics.jsonl in {args.run_dir}", file=sys.stderr)
        return 2
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("grpo-ds plot needs matplotlib, an optional extra: pip install -e .[plot] "
              "(or pip install matplotlib)", file=sys.stderr)
        return 2
    summary_file = args.run_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else None
    fig = draw(read_series(metrics), summary, args.run_dir.resolve().name)
    out = args.out or args.run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
