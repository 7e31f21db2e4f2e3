"""The report's figures: one forest plot per table (ours against the paper, claim by claim) and Figure 1's
training-error curves."""

from __future__ import annotations

import textwrap
from pathlib import Path

from alexnet.report.figure1 import Curves
from alexnet.report.rows import Row


def plot(out: Path, sections: dict[str, list[Row]], curves: list[Curves]) -> dict[str, str]:
    """Section title -> the PNG files drawn for it, written into ``out``."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    files: dict[str, list[str]] = {}
    for i, (text, group) in enumerate(sections.items()):
        deltas = [r for r in group if r.unit == "pp" and r.estimate.n > 0]
        if not deltas:
            continue
        fig, ax = plt.subplots(figsize=(9, 0.5 * len(deltas) + 1.8))
        for y, row in enumerate(deltas):
            e = row.estimate
            if e.ok:
                ax.plot([e.low, e.high], [y, y], color="C0")
            ax.plot([e.mean], [y], "o", color="C0", label="ours: mean, 95% CI (seeds x images)")
            ax.plot(list(row.per_seed.values()), [y] * len(row.per_seed), "|", color="C0", alpha=0.5)
            if row.reported is not None:
                ax.plot([row.reported], [y], "D", color="C3", label="paper")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(deltas)), [textwrap.fill(r.label, 60) for r in deltas], fontsize=6)
        ax.invert_yaxis()
        ax.set_xlabel("paper's choice minus ablated: points of error (< 0: the paper's choice is better)")
        ax.set_title(textwrap.fill(text, 110), fontsize=7)
        handles, labels = ax.get_legend_handles_labels()
        unique = dict(zip(labels, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7)
        fig.tight_layout()
        name = f"effects_{i}.png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.setdefault(text, []).append(name)
    for i, c in enumerate(curves):
        text = next(
            (t for t, group in sections.items() if any(r.context == c.context for r in group)), c.context
        )
        fig, ax = plt.subplots(figsize=(6, 4))
        for colour, (arm, runs) in zip(("C0", "C1"), c.curves.items(), strict=False):
            for j, curve in enumerate(runs):
                xs, ys = zip(*curve, strict=True)
                ax.plot(xs, ys, color=colour, alpha=0.8, label=arm if j == 0 else None)
        ax.axhline(c.target, color="grey", ls="--", lw=0.8, label=f"target {c.target:.0%}")
        ax.set_xlabel("epochs")
        ax.set_ylabel("training error rate (top-1)")
        ax.set_title("Figure 1 protocol: each arm at its fastest learning rate", fontsize=9)
        ax.legend()
        fig.tight_layout()
        name = f"figure1_{i}.png"
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        files.setdefault(text, []).append(name)
    return files
