"""The plots of `python -m bench.load`: latency per step, requests/s over time, pool levels per node."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.axes import Axes

from bench.harness import percentile  # noqa: E402


class Step(Protocol):
    """What the plots read of a ghz step of bench.load."""

    profile: str
    name: str
    details: list[tuple[float, float, str]]  # (end time, latency ms, status) per call

    @property
    def label(self) -> str: ...


Span = tuple[str, float, float]  # profile, start, end (epoch seconds)
Sample = tuple[float, str, str, str, float]  # t, node, family, state, value
RPS_BINS = 60  # bins per profile panel
LABEL_CHARS_ACROSS = 110  # characters of a band label that fit across a plot
POOL_LINES = (  # (family, state, style)
    ("ipv4", "available", {"color": "tab:blue", "lw": 2}),
    ("ipv4", "used", {"color": "tab:red", "lw": 2}),
    ("ipv4", "cooling", {"color": "tab:orange", "lw": 1.5}),
    ("ipv4", "needed", {"color": "tab:gray", "lw": 1, "ls": ":"}),
    ("ipv6", "available", {"color": "tab:cyan", "lw": 1.5, "ls": "--"}),
    ("ipv6", "used", {"color": "tab:purple", "lw": 1.5, "ls": "--"}),
)


def _shade(ax: Axes, spans: Sequence[Span], t0: float, *, labels: bool) -> None:
    """Profile windows (while ghz ran) as bands, named along the top, a name on the first row where it
    does not run into the previous one."""
    left, right = ax.get_xlim()  # call once the data is drawn
    char = max(right - left, 1.0) / LABEL_CHARS_ACROSS  # a label character's width in data units
    row_ends: list[float] = []
    for index, (name, start, end) in enumerate(spans):
        ax.axvspan(start - t0, end - t0, color="tab:green" if index % 2 else "tab:olive", alpha=0.12, lw=0)
        if labels:
            x = start - t0
            row = next((i for i, taken in enumerate(row_ends) if taken <= x), len(row_ends))
            row_ends[row : row + 1] = [x + (len(name) + 2) * char]
            ax.text(x, 1.02 + 0.08 * row, name, transform=ax.get_xaxis_transform(), ha="left", va="bottom", fontsize=7)


def latency(steps: Sequence[Step], path: Path) -> None:
    """One box per step (p25-p75, p50, whiskers at p1 and p99, as the summary table computes them; log
    scale); failed calls of a step get their own box."""
    rows: list[tuple[str, list[float]]] = []
    for step in steps:
        by_status: dict[str, list[float]] = defaultdict(list)
        for _, latency_ms, status in step.details:
            by_status[status].append(latency_ms)
        for status in sorted(by_status, key=lambda s: (s != "OK", s)):
            suffix = "" if status == "OK" else f" [{status}]"
            rows.append((f"{step.label}{suffix}  n={len(by_status[status])}", sorted(by_status[status])))
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 1.5))
    boxes = [
        {
            "label": label,
            "q1": percentile(v, 25),
            "med": percentile(v, 50),
            "q3": percentile(v, 75),
            "whislo": percentile(v, 1),
            "whishi": percentile(v, 99),
        }
        for label, v in rows
    ]
    if boxes:
        ax.bxp(boxes, orientation="horizontal", showfliers=False, medianprops={"color": "tab:red"})
        for y, box in enumerate(boxes, start=1):
            ax.annotate(
                f"p99 {box['whishi']:.1f}",
                (box["whishi"], y),
                xytext=(4, 0),
                textcoords="offset points",
                va="center",
                fontsize=7,
            )
    ax.set_xscale("log")
    ax.invert_yaxis()
    ax.set_xlabel("latency (ms, log scale); box p25-p75, red line p50, whiskers p1-p99")
    ax.set_title("Latency per profile step")
    ax.grid(axis="x", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def rps(steps: Sequence[Step], path: Path) -> None:
    """Completed calls per second of every step, one panel per profile (its own time scale and bins);
    failed calls dashed."""
    profiles: dict[str, list[Step]] = defaultdict(list)
    for step in steps:
        if step.details:
            profiles[step.profile].append(step)
    fig, axes = plt.subplots(max(len(profiles), 1), 1, figsize=(12, 2.4 * max(len(profiles), 1) + 0.6), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, (profile, group) in zip(axes[:, 0], profiles.items(), strict=False):
        start = min(end - latency / 1000 for s in group for end, latency, _ in s.details)
        window = max(end for s in group for end, _, _ in s.details) - start
        width = max(window / RPS_BINS, 0.01)
        for index, step in enumerate(group):
            for ok, style in ((True, "-"), (False, "--")):
                bins: dict[int, int] = defaultdict(int)
                for end, _, status in step.details:
                    if (status == "OK") == ok:
                        bins[int((end - start) / width)] += 1
                if bins:
                    xs = range(min(bins) - 1, max(bins) + 2)
                    ax.plot(
                        [x * width for x in xs],
                        [bins.get(x, 0) / width for x in xs],
                        style,
                        color=colors[index % len(colors)],
                        drawstyle="steps-post",
                        lw=1.5,
                        label=step.name if ok else f"{step.name} (errors)",
                    )
        ax.set_title(f"{profile}  ({width * 1000:.0f} ms bins)", fontsize=9, loc="left")
        ax.set_ylabel("calls/s")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[-1, 0].set_xlabel("seconds since the profile's first call")
    fig.suptitle("Requests per second over time (completed calls)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pools(
    samples: Sequence[Sample],
    spans: Sequence[Span],
    t0: float,
    path: Path,
    capacities: dict[str, int | None] | None = None,
    source: str = "",
) -> None:
    """Pool levels per node (one panel each) over the run, profile windows shaded."""
    series: dict[str, dict[tuple[str, str], list[tuple[float, float]]]] = defaultdict(lambda: defaultdict(list))
    for t, node, family, state, value in samples:
        series[node][(family, state)].append((t - t0, value))
    nodes = sorted(series)
    fig, axes = plt.subplots(
        max(len(nodes), 1), 1, figsize=(12, 2.8 * max(len(nodes), 1) + 0.8), sharex=True, squeeze=False
    )
    for ax, node in zip(axes[:, 0], nodes, strict=False):
        for family, state, style in POOL_LINES:
            points = series[node].get((family, state))
            if points and any(v for _, v in points):
                ax.plot(*zip(*points, strict=True), label=f"{family} {state}", drawstyle="steps-post", **style)
        capacity = (capacities or {}).get(node)
        if capacity:
            ax.axhline(capacity, color="black", lw=0.8, ls="-.", label="IPv4 capacity")
        _shade(ax, spans, t0, labels=ax is axes[0, 0])
        ax.set_ylabel("addresses")
        ax.text(
            0.005,
            0.96,
            node,
            transform=ax.transAxes,
            fontsize=9,
            va="top",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8},
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    axes[-1, 0].set_xlabel("seconds since the run started")
    fig.suptitle(
        "Pool levels per node (default pool); bands: profiles while ghz ran"
        + (f"\nsampled from {source}" if source else "")
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
