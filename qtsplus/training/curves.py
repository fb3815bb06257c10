"""Training curves: loss terms and the budget (rho, kept fraction) against the step, as one PNG."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(metrics: list[dict], dest: Path, title: str = "") -> Path:
    """Two panels: the loss terms (total, LM, budget, a method's own: rank ...); rho, rho_bar, kept fraction and a
    method's Spearman correlation with its teacher. Missing series are skipped. Returns `dest`."""
    rows = [m for m in metrics if "step" in m]
    if not rows:
        raise ValueError("no step metrics to plot")
    steps = [m["step"] for m in rows]
    fig, (ax_loss, ax_rho) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for key in ("loss", "lm_loss", "budget_loss", "rank_loss"):
        values = [m.get(key, math.nan) for m in rows]
        if any(math.isfinite(v) for v in values):
            ax_loss.plot(steps, values, label=key)
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss")
    ax_loss.set_yscale("log")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    shown = []
    for key in ("rho", "rho_bar", "kept_fraction", "spearman"):
        values = [m.get(key, math.nan) for m in rows]
        if any(math.isfinite(v) for v in values):
            ax_rho.plot(steps, values, label=key)
            shown.append(key)
    ax_rho.set_xlabel("step")
    ax_rho.set_ylabel("fraction of visual tokens" + (" / correlation" if "spearman" in shown else ""))
    ax_rho.set_ylim(-1 if "spearman" in shown else 0, 1)
    ax_rho.legend()
    ax_rho.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest
