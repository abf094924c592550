"""PNG figures of benchmark results (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path

from longdoc.errors import LongDocError


def check_plotting() -> None:
    """Refuse before a benchmark runs, not after it, when its figures cannot be drawn."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LongDocError("the benchmarks draw their figures with matplotlib: pip install 'longdoc[bench]'") from None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(path: Path, title: str, lengths: list[int], depths: list[float], accuracy: dict) -> None:
    """Accuracy per (depth, length) cell; `accuracy[(length, depth)]` in 0..1."""
    plt = _pyplot()
    grid = [[accuracy.get((length, depth), float("nan")) for length in lengths] for depth in depths]
    fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2, 0.5 * len(depths) + 2))
    image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [f"{length // 1024}K" if length >= 1024 else str(length) for length in lengths])
    ax.set_yticks(range(len(depths)), [f"{depth:.0%}" for depth in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for y, row in enumerate(grid):
        for x, value in enumerate(row):
            ax.text(x, y, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="exact answers")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def lines(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, dict], logy: bool = False) -> None:
    """One line per series name; `series[name][x] = y`."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in series.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
