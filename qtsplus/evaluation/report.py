"""Plots and the markdown report of an evaluate run."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_accuracy_vs_tokens(metrics: dict[str, dict], dest: Path) -> Path:
    """MCQ accuracy against mean visual tokens reaching the LM, one point per method (log x)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5), constrained_layout=True)
    for method, m in metrics.items():
        if "accuracy" not in m:
            continue
        ax.scatter(m["video_tokens_kept"], m["accuracy"], s=60)
        ax.annotate(f"{method}\nTokDense {m['tokdense']:.3g}", (m["video_tokens_kept"], m["accuracy"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("visual tokens reaching the LM (mean per question)")
    ax.set_ylabel("MCQ accuracy (held-out VSCQ2)")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


def split_budget(name: str) -> tuple[str, str | None]:
    """'uniform_frames@10%' -> ('uniform_frames', '10%'); a name without a budget -> (name, None)."""
    method, sep, budget = name.rpartition("@")
    return (method, budget) if sep else (name, None)


def budget_value(label: str) -> float:
    """'10%' -> 0.1 (a ratio of M); '64' -> 64.0 (tokens)."""
    return float(label[:-1]) / 100 if label.endswith("%") else float(label)


def budget_table(metrics: dict[str, dict]) -> list[dict]:
    """One row per method run at fixed budgets (EvalConfig.budgets): accuracy and needle recall per budget."""
    runs: dict[str, dict[str, dict]] = {}
    for name, m in metrics.items():
        method, budget = split_budget(name)
        if budget is not None and "accuracy" in m:
            runs.setdefault(method, {})[budget] = m
    budgets = sorted({b for per in runs.values() for b in per}, key=budget_value)
    rows = []
    for method, per in runs.items():
        row: dict = {"method": method}
        for b in budgets:
            m = per.get(b, {})
            row[f"acc@{b}"] = m.get("accuracy", float("nan"))
            if any("target_recall" in x for x in per.values()):
                row[f"recall@{b}"] = m.get("target_recall", float("nan"))
        rows.append(row)
    return rows


def plot_accuracy_vs_budget(metrics: dict[str, dict], dest: Path) -> Path | None:
    """MCQ accuracy against the budget, one line per method run at fixed budgets; methods without a budget
    (teacher, no_selection) as horizontal lines. None when no method ran at fixed budgets."""
    runs: dict[str, list[tuple[float, float]]] = {}
    flat = {}
    for name, m in metrics.items():
        if "accuracy" not in m:
            continue
        method, budget = split_budget(name)
        if budget is None:
            flat[name] = m["accuracy"]
        else:
            runs.setdefault(method, []).append((budget_value(budget), m["accuracy"]))
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    for method, points in runs.items():
        xs, ys = zip(*sorted(points), strict=True)
        ax.plot(xs, ys, marker="o", label=method)
    for i, (name, acc) in enumerate(flat.items()):
        ax.axhline(acc, color="grey", linestyle=("--", ":", "-.")[i % 3], linewidth=1, label=f"{name} (all tokens)"
                   if name in ("teacher", "no_selection") else f"{name} (own budget)")
    ratios = all(split_budget(n)[1].endswith("%") for n in metrics if split_budget(n)[1] is not None)
    ax.set_xscale("log")
    ticks = sorted({x for points in runs.values() for x, _ in points})  # the budgets run, labelled as given
    ax.set_xticks(ticks, [f"{x:.0%}" if ratios else f"{x:g}" for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel("budget (share of the visual tokens)" if ratios else "budget (visual tokens)")
    ax.set_ylabel("MCQ accuracy")
    ax.set_ylim(-0.05, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


def plot_latency_sweep(rows: list[dict], dest: Path) -> Path:
    """Fig. 4 of the paper: visual tokens into the LM and time to the full answer against frame count."""
    fig, (ax_tok, ax_lat) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for method in sorted({r["method"] for r in rows}):
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["frames"])
        frames = [r["frames"] for r in mine]
        ax_tok.plot(frames, [r["video_tokens_kept"] for r in mine], marker="o", label=method)
        ax_lat.plot(frames, [r["seconds"] for r in mine], marker="o", label=method)
    ax_tok.set_xlabel("frames")
    ax_tok.set_ylabel("visual tokens into the LM")
    ax_lat.set_xlabel("frames")
    ax_lat.set_ylabel("time to full answer (s)")
    for ax in (ax_tok, ax_lat):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(dest, dpi=110)
    plt.close(fig)
    return dest


def _table(rows: list[dict]) -> str:
    if not rows:
        return "_(none)_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _fmt(v: object) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_report(metrics: dict[str, dict], sweep: list[dict], plots: dict[str, str], info: dict) -> str:
    """report.md: a table per method, accuracy by type and difficulty, the budget, and the plots."""
    own = info.get("selector", "qtsplus")  # the checkpoint's own selector: qtsplus, or the method it was trained with
    budgets = (f"the token count {own} (the checkpoint's selector) kept for each question" if own in metrics
               else f"the budget {info.get('budget')} (a token count, or a ratio of each video's tokens)")
    parts = [f"# Evaluation of a {own} checkpoint\n\n",
             f"Checkpoint `{info['checkpoint']}` on `{info['data']}` ({info['mcq_split']} / {info['vqa_split']}). "
             "MCQ accuracy reads the option-letter logits at the last position; VQA is ROUGE-L F1 (lower-cased "
             f"whitespace tokens) against the teacher's answer; comparators get {budgets}. "
             "TokDense = accuracy / mean visual tokens kept.\n\n"]
    rows = []
    for method, m in metrics.items():
        rows.append({"method": method, "mcq": m.get("mcq_samples", 0), "accuracy": m.get("accuracy", float("nan")),
                     "visual tokens in": m.get("video_tokens_in", float("nan")),
                     "kept": m.get("video_tokens_kept", float("nan")), "LM tokens": m.get("lm_tokens", float("nan")),
                     "TokDense": m.get("tokdense", float("nan")), "latency s": m.get("latency_mean_s", float("nan")),
                     "recall": m.get("target_recall", float("nan")),
                     "vqa": m.get("vqa_samples", 0), "ROUGE-L": m.get("rouge_l", float("nan")),
                     "peak MiB": m.get("peak_memory_mib", float("nan"))})
    parts.append("## Methods\n\n" + _table(rows))
    fresh = info.get("fresh_weights") or []
    if fresh:
        parts.append(f"\nRun with freshly initialised weights (not trained in this checkpoint): {', '.join(fresh)}. "
                     "An untrained VQ-Attention passes VQToken's codebook through (what the public VQToken code "
                     "feeds); an untrained FlexSelect-Lite ranker or QTSplus selector ranks at random. Train one "
                     "with `qtsplus train-selector --set method=...` (docs/selectors.md) and evaluate that "
                     "checkpoint to compare trained weights.\n")
    for title, key in (("type", "accuracy_by_type"), ("difficulty", "accuracy_by_difficulty")):
        groups = sorted({g for m in metrics.values() for g in m.get(key, {})})
        if groups:
            parts.append(f"\n## Accuracy by question {title}\n\n")
            parts.append(_table([{"method": method} | {g: m.get(key, {}).get(g, float("nan")) for g in groups}
                                 for method, m in metrics.items()]))
    qts = metrics.get("qtsplus", {})
    if "rho" in qts:
        parts.append(f"\n## QTSplus budget\n\nrho mean {qts['rho']['mean']:.3f} (min {qts['rho']['min']:.3f}, "
                     f"max {qts['rho']['max']:.3f}); kept tokens n mean {qts['n']['mean']:.1f} "
                     f"(min {qts['n']['min']}, max {qts['n']['max']}).\n")
    if plots.get("budget"):
        parts.append(f"\n## Accuracy against budget\n\nEvery selecting method at each fixed budget "
                     f"(recall: the share of the question's target tokens that reached the LM, where known)."
                     f"\n\n![accuracy vs budget]({plots['budget']})\n\n")
        parts.append(_table(budget_table(metrics)))
    parts.append(f"\n## Accuracy against tokens\n\n![accuracy vs tokens]({plots['accuracy']})\n")
    if sweep:
        parts.append(f"\n## Tokens and latency against frames (Fig. 4)\n\n![latency sweep]({plots['latency']})\n\n")
        parts.append(_table([{k: r[k] for k in ("frames", "method", "video_tokens_in", "video_tokens_kept",
                                                "lm_tokens", "seconds")} for r in sweep]))
    return "".join(parts)
