"""PNG plots of benchmark results (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from headrace.client.optional import require
from headrace.cluster.bench.stats import LoadPoint


def load_of(point: LoadPoint) -> float:
    """The x value of a point: the offered rate in open loop, the delivered throughput in
    closed loop (where the load is whatever the system sustains)."""
    if point.mode == "open" and point.offered_rps is not None:
        return float(point.offered_rps)
    return float(point.throughput_rps)


def plot_latency_vs_load(series: Mapping[str, Sequence[LoadPoint]], path: str | Path, *, title: str,
                         limit_rps: float | None = None) -> Path:
    """End-to-end p50 (solid) and p99 (dashed) latency against offered load, one colour per
    series; closed-loop (saturation) points as x (p50) and ^ (p99) at their throughput; a
    vertical line at ``limit_rps`` (the raw model's throughput) when given.

    Returns the written path.
    """
    matplotlib = require("matplotlib", "plot", purpose="benchmark plots")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (name, points) in enumerate(series.items()):
        pts = sorted((p for p in points if p.e2e.p50 is not None and p.e2e.p99 is not None), key=load_of)
        if not pts:
            continue
        c = colours[k % len(colours)]
        # Open-loop levels form the curve; a closed-loop point (the system saturated by a
        # fixed number of outstanding requests) is drawn apart: its latency is set by
        # that number, not by an offered rate.
        curve = [p for p in pts if p.mode == "open"]
        if curve:
            xs = [load_of(p) for p in curve]
            ax.plot(xs, [float(p.e2e.p50 or 0.0) for p in curve], "-o", color=c, label=f"{name} p50", markersize=4)
            ax.plot(xs, [float(p.e2e.p99 or 0.0) for p in curve], "--", color=c, label=f"{name} p99", alpha=0.8)
        for i, p in enumerate(p for p in pts if p.mode != "open"):
            label = None if curve or i else f"{name} (saturated only)"
            ax.plot([load_of(p)], [float(p.e2e.p50 or 0.0)], "x", color=c, markersize=7, label=label)
            ax.plot([load_of(p)], [float(p.e2e.p99 or 0.0)], "^", color=c, markersize=5, alpha=0.8)
    if limit_rps:
        ax.axvline(limit_rps, color="grey", linestyle=":", label=f"raw limit {limit_rps:.0f}/s")
    ax.set_xlabel("offered load, requests/s (x, ^: closed-loop saturation at its throughput)")
    ax.set_ylabel("end-to-end latency (ms)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def plot_throughput_bars(values: Mapping[str, float], path: str | Path, *, title: str,
                         limit_rps: float | None = None) -> Path:
    """Horizontal bars of throughput per system, with the raw limit as a line."""
    matplotlib = require("matplotlib", "plot", purpose="benchmark plots")

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(values)
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(names) + 1.5))
    ax.barh(names, [values[n] for n in names], color="tab:blue")
    if limit_rps:
        ax.axvline(limit_rps, color="grey", linestyle=":", label=f"raw limit {limit_rps:.0f}/s")
        ax.legend(fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("requests/s")
    ax.set_title(title)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
