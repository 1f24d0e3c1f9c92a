"""``--plot``: accuracy (or NIAH score) against length, one line per variant, when matplotlib is installed."""

from __future__ import annotations

import importlib.util
from collections import defaultdict
from pathlib import Path

from ..errors import ResonaError


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise ResonaError("--plot needs matplotlib, which is not installed: pip install matplotlib (or drop --plot)")


def plot_results(rows: list[dict], path: str | Path, *, x: str, y: str, series: tuple[str, ...], title: str) -> Path:
    """Write a line plot of ``rows`` (y against x, one line per distinct ``series`` value) to ``path``."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for r in rows:
        lines[" ".join(f"{k}={r[k]}" if k != "variant" else str(r[k]) for k in series)].append((r[x], r[y]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
