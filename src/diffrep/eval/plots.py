"""Figures the stages write: bar charts of accuracies with their 95% intervals."""
from __future__ import annotations

from pathlib import Path


def bar_chart(path: Path, rows: list[tuple[str, float, float, float, str]], title: str) -> None:
    """Horizontal bars (name, value, ci_low, ci_high, group); trained encoders and baselines in two colours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = rows[::-1]
    names = [r[0] for r in rows]
    acc = [100 * r[1] for r in rows]
    err = [[100 * (r[1] - r[2]) for r in rows], [100 * (r[3] - r[1]) for r in rows]]  # below, above
    colours = ["tab:blue" if r[4] == "diffusion" else "tab:gray" for r in rows]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(rows) + 1.2))
    ax.barh(names, acc, xerr=err, color=colours, capsize=3)
    for y, r in enumerate(rows):
        ax.text(100 * r[3] + 0.4, y, f"{100 * r[1]:.1f}", va="center", fontsize=8)
    ax.set_xlim(max(0.0, min(100 * r[2] for r in rows) - 10), 100)
    ax.set_xlabel("test top-1 (%), 95% interval")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
