"""The picture of one ``bench/wan.py`` scenario: every host's upload over time, one panel per tool.

The seeder is the thick black line, fetchers thin coloured ones (their upload: what they
pass on to the others); a triangle on the time axis marks each fetcher's finish, the dashed
line T_min. A seeder line that drops below its rate, or fetcher lines near zero, is time
the swarm wastes. Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bench.wan import Scenario, ToolRun

RATE_WINDOW = 0.5  # seconds per plotted point, whatever the sampling period: smooths htb's bursts, keeps the shape


def plot_scenario(path: Path, sc: Scenario, size: int, runs: list[ToolRun]) -> None:
    """Write ``path`` (SVG): one panel per run in ``runs`` (one per tool). Raises OSError."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams["svg.fonttype"] = "none"  # text stays text: smaller, searchable
    plt.rcParams["svg.hashsalt"] = "cascade-wan"  # stable ids: a re-run changes only what changed
    t_min = sc.t_min(size)
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.3 * len(runs) + 0.6), sharex=True, squeeze=False)
    cmap = plt.get_cmap("viridis")
    longest = max([r.seconds or 0.0 for r in runs] + [t_min])
    for ax, run in zip(axes[:, 0], runs, strict=True):
        hosts = run.hosts
        for k, name in enumerate(hosts):
            ts, rates = _rates(run, k)
            seed = name == "seed"
            color = "black" if seed else cmap(k / max(1, len(hosts) - 1))
            ax.plot(
                ts,
                rates,
                color=color,
                lw=2.0 if seed else 0.8,
                alpha=1.0 if seed else 0.8,
                label=name if seed else None,
            )
        for i, f in enumerate(run.finish):
            if f is not None:
                ax.plot([f], [0], marker="^", color=cmap((i + 1) / max(1, len(hosts) - 1)), ms=7, clip_on=False)
        ax.axvline(t_min, color="grey", ls="--", lw=1)
        if run.tool == "http":  # plain HTTP's own bound: every copy from the seeder
            ax.axvline(sc.http_bound(size), color="grey", ls="-.", lw=1)
        ax.axhline(sc.seeder_mbit, color="black", ls=":", lw=0.6)
        if run.seconds is not None:
            copies = run.sent.get("seed", 0) / size
            what = f"{run.seconds:.1f} s = {run.seconds / t_min:.2f} x T_min, seeder sent {copies:.2f} copies"
        else:
            what = run.error or "did not finish"
        ax.set_title(f"{run.tool}: {what}", fontsize=9, loc="left")
        ax.set_ylabel("upload Mbit/s", fontsize=8)
        ax.set_ylim(bottom=0)
        ax.tick_params(labelsize=8)
    axes[-1, 0].set_xlabel(
        "seconds since the fetchers started (triangles: a fetcher done; dashed: T_min; dash-dot: N x F/S)", fontsize=8
    )
    axes[-1, 0].set_xlim(0, longest * 1.05)
    fig.suptitle(f"{sc.title}, {size >> 20} MiB: each host's upload (seeder black)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, metadata={"Date": None} if path.suffix == ".svg" else None)
    plt.close(fig)


def _rates(run: ToolRun, k: int) -> tuple[list[float], list[float]]:
    """Host ``k``'s upload in Mbit/s over back-to-back windows of at least RATE_WINDOW s, at each window's middle."""
    ts: list[float] = []
    rates: list[float] = []
    s = run.samples
    if not s:
        return ts, rates
    t_a, a = s[0]
    for t_b, b in s[1:]:
        if t_b - t_a >= RATE_WINDOW:
            ts.append((t_a + t_b) / 2 - run.t0)
            rates.append((b[k] - a[k]) * 8 / (t_b - t_a) / 1e6)
            t_a, a = t_b, b
    return ts, rates
