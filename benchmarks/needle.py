"""The needle-in-a-video-haystack benchmark (docs/needle.md): build the data, train the host on it with every visual
token (small scenes first, then the full ones), train QTSplus on top (LM frozen: `selector`; jointly: `selector+lm`),
evaluate every method at fixed budgets.

    python -m benchmarks.needle                          # full run: >= 500 held-out questions, budgets 5/10/25/50 %
    python -m benchmarks.needle --seed 1 --out runs/needle-s1   # another data seed (the ranking must not change)
    python -m benchmarks.needle --preset needle-ci --budgets 0.1 --methods uniform_frames random_tokens --no-joint
                                                         # the CI-sized run (tests/test_needle.py)

Every step is a Prefect flow with a content-keyed cache (build-needle x 2, needle-host, cache-features x 2,
train-selector x 5, evaluate x 3), so a rerun only prints. Methods: the unpruned host (`teacher`), the trained QTSplus
at each budget, QTSplus with its time embedding zeroed (the ablation, read on the temporal-order questions), and every other registered selector
(`qtsplus.selectors.SELECTORS`: uniform_frames, random_tokens, FlexSelect, FlexSelect-Lite, VQToken, EVS, VidCom2,
and any method registered later) at the same budgets; FlexSelect-Lite, the comparator with weights to learn, is
trained on the host first (train-selector, preset <preset>-flexselect-lite) and evaluated from its own checkpoint.
The last line is one a script can read:

    needle: base=<acc> qtsplus@10=<acc> uniform@10=<acc> random@10=<acc> recall@10=<recall>

`--compare RUN_A RUN_B` ranks the methods of two finished runs (two data seeds) instead, and lists the pairs whose
order differs (a tie within two standard errors, or significant); last line
`seeds: kendall_tau=<t> swaps=<n> significant_swaps=<n>`.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "600")

HOST = "tiny/qwen2.5-vl-needle"
BUDGETS = (0.05, 0.1, 0.25, 0.5)
NOT_COMPARED = ("none", "qtsplus")  # `none` is the teacher's input; `qtsplus` is the checkpoint's own selector
# comparators with weights, trained on the host by train-selector before they are compared (preset <preset>-<run>);
# VQToken's VQ-Attention passes its codebook through untrained, as the public code feeds it, so it is compared as is
TRAINED_COMPARATORS = {"flexselect_lite": "flexselect-lite"}


def comparators() -> list[str]:
    """Every registered selector except the unpruned one and QTSplus itself, so methods added later show up."""
    from qtsplus.selectors import SELECTORS

    return [name for name in SELECTORS if name not in NOT_COMPARED]


def run(out: Path, preset: str, seed: int, budgets: tuple[float, ...], progress: bool,
        compared: list[str] | None = None, joint: bool = True) -> dict:
    """All stages (cached); returns the evaluations' metrics and the stage timings. `compared`: the comparators
    (default: every registered one); `joint`: also train and evaluate QTSplus with the LM (selector+lm)."""
    from flows.cache_features import cache_features
    from flows.evaluate import evaluate
    from flows.needle import build_needle, needle_host
    from flows.train_selector import train_selector
    from qtsplus.evaluation.config import QTSPLUS, QTSPLUS_NO_TIME, TEACHER, EvalConfig
    from qtsplus.features.config import FeatureConfig
    from qtsplus.needle import NeedleConfig
    from qtsplus.needle.vision import VisionTeaching
    from qtsplus.training.config import TrainConfig

    data_cfg = NeedleConfig.preset(preset, out=str(out / "data"), seed=seed)
    warm_cfg = NeedleConfig.preset(f"{preset}-warmup", out=str(out / "warmup-data"), seed=seed)
    data = data_cfg.out
    timings: dict[str, float] = {}

    def stage(name, fn, *args, **kwargs):
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[name] = time.perf_counter() - start
        print(f"[{name}] {timings[name]:.0f} s", flush=True)
        return result

    stage("data", build_needle, data_cfg, progress=progress)
    stage("warm-up data", build_needle, warm_cfg, progress=progress)
    # the host's vision tower learns to see the training scenes, then is frozen: its features, computed once per
    # dataset, feed every training and evaluation
    host = stage("host", needle_host, data_cfg, str(out / "host"), VisionTeaching(host=HOST), progress=progress)
    for name, cfg in (("features", data_cfg), ("warm-up features", warm_cfg)):
        stage(name, cache_features, FeatureConfig(data=cfg.out, model_id=host, video=cfg.sampling(),
                                                  storage_dtype="fp32", compute_dtype="fp32"), progress=progress)
    # the host learns: small scenes first (warm-up), then the full ones; QTSplus learns on top of the result
    train = {}
    plan = [("warmup-base", warm_cfg, host), ("base", data_cfg, "warmup-base"), ("selector", data_cfg, "base")]
    compared = comparators() if compared is None else list(compared)
    trained = [m for m in compared if m in TRAINED_COMPARATORS]
    if joint:
        plan.append(("selector-lm", data_cfg, "base"))
    plan += [(TRAINED_COMPARATORS[m], data_cfg, "base") for m in trained]
    for variant, cfg, start_from in plan:
        base_model = train[start_from].final if start_from in train else start_from
        fields = {"data": cfg.out, "out": str(out / variant), "base_model": base_model, "video": cfg.sampling()}
        train[variant] = stage(f"train {variant}", train_selector, TrainConfig.preset(f"{preset}-{variant}", **fields))
    # a trained comparator is evaluated from its own checkpoint (the method it holds), the others on QTSplus's host
    methods = [TEACHER, QTSPLUS, QTSPLUS_NO_TIME, *(m for m in compared if m not in trained)]
    runs = [("selector", methods)] + [("selector-lm", [QTSPLUS])] * joint
    runs += [(TRAINED_COMPARATORS[m], [m]) for m in trained]
    evals = {}
    for variant, names in runs:
        cfg = EvalConfig.preset("needle", data=data, checkpoint=train[variant].final, out=str(out / f"eval-{variant}"),
                                methods=names, budgets=list(budgets))
        evals[variant] = stage(f"evaluate {variant}", evaluate, cfg)
    metrics = merge_trained({v: json.loads((Path(e.out) / "metrics.json").read_text()) for v, e in evals.items()})
    return {"metrics": metrics, "timings": timings, "reports": {v: f"{e.out}/report.md" for v, e in evals.items()}}


def merge_trained(metrics: dict[str, dict]) -> dict[str, dict]:
    """One table: each trained comparator's rows (from its own evaluation) beside the others' in `selector`."""
    for method, run_name in TRAINED_COMPARATORS.items():
        rows = metrics.get(run_name, {})
        metrics["selector"].update({k: v for k, v in rows.items() if k.startswith(f"{method}@")})
    return metrics


def load_metrics(out: Path) -> dict[str, dict]:
    """The evaluations a finished run left under `out` (eval-<run>/metrics.json), merged as `run` returns them."""
    found = {p.parent.name.removeprefix("eval-"): json.loads(p.read_text()) for p in out.glob("eval-*/metrics.json")}
    if "selector" not in found:
        raise FileNotFoundError(f"{out}: no eval-selector/metrics.json (run `python -m benchmarks.needle --out {out}`)")
    return merge_trained(found)


def compare_seeds(a: Path, b: Path, budgets: tuple[float, ...]) -> dict[str, float]:
    """Rank every method at each budget in two finished runs (two data seeds) and print where the order differs.
    A swap is significant when both runs separate the pair by more than two standard errors of the difference of
    two accuracies (sqrt(p1 q1 / n + p2 q2 / n)); a swap inside that is a tie. Returns the summary at 10%."""
    from itertools import combinations

    runs = [load_metrics(p)["selector"] for p in (a, b)]
    summary = {}
    for budget in budgets:
        suffix = f"@{label(budget)}"
        names = sorted(k.removesuffix(suffix) for k in runs[0] if k.endswith(suffix) and k in runs[1])
        acc = [{n: r[n + suffix]["accuracy"] for n in names} for r in runs]
        size = [r["teacher"]["mcq_samples"] for r in runs]
        print(f"\n{label(budget)}: " + " | ".join(f"{p.name}: " + " > ".join(ranking(r, budget))
                                                for p, r in zip((a, b), runs, strict=True)))
        pairs = swaps = significant = 0
        for x, y in combinations(names, 2):
            gaps = [run[x] - run[y] for run in acc]
            se = [((run[x] * (1 - run[x]) + run[y] * (1 - run[y])) / n) ** 0.5 for run, n in zip(acc, size, strict=True)]
            pairs += 1
            if gaps[0] * gaps[1] < 0:
                swaps += 1
                clear = all(abs(g) > 2 * s for g, s in zip(gaps, se, strict=True))
                significant += clear
                print(f"  {x} vs {y}: {gaps[0]:+.3f} / {gaps[1]:+.3f} (2 SE {2 * se[0]:.3f} / {2 * se[1]:.3f})"
                      f" {'SIGNIFICANT' if clear else 'tie'}")
        tau = (pairs - 2 * swaps) / pairs if pairs else float("nan")  # Kendall's tau without ties
        if budget == 0.1 or not summary:
            summary = {"kendall_tau": tau, "swaps": swaps, "significant_swaps": significant}
    return summary


def label(b: float) -> str:
    from qtsplus.evaluation.harness import budget_label

    return budget_label(b)


def table(result: dict, budgets: tuple[float, ...]) -> tuple[list[str], dict]:
    """The printed table (markdown) and the summary numbers."""
    sel, ft = result["metrics"]["selector"], result["metrics"].get("selector-lm", {})
    rows = [("teacher (all tokens)", {None: sel["teacher"]})]
    rows.append(("qtsplus (selector)", {b: sel.get(f"qtsplus@{label(b)}") for b in budgets}))
    rows.append(("qtsplus (selector+lm)", {b: ft.get(f"qtsplus@{label(b)}") for b in budgets}))
    rows.append(("qtsplus, time zeroed", {b: sel.get(f"qtsplus_no_time@{label(b)}") for b in budgets}))
    rows += [(f"{m} (trained)" if m in TRAINED_COMPARATORS else m, {b: sel.get(f"{m}@{label(b)}") for b in budgets})
             for m in comparators() if any(f"{m}@{label(b)}" in sel for b in budgets)]
    lines = ["| method | budget | accuracy | needle recall | temporal-order acc | tokens kept | LM tokens | ms / question |",
             "|---|---|---|---|---|---|---|---|"]
    for name, per in rows:
        for b, m in per.items():
            if m is None:
                continue
            lines.append(f"| {name} | {'all' if b is None else label(b)} | {m['accuracy']:.3f} | "
                         f"{m.get('target_recall', float('nan')):.3f} | "
                         f"{m['accuracy_by_type'].get('temporal_order', float('nan')):.3f} | "
                         f"{m['video_tokens_kept']:.1f} | {m['lm_tokens']:.1f} | {1000 * m['latency_mean_s']:.1f} |")
    ten = label(0.1)
    summary = {"base": sel["teacher"]["accuracy"], "qtsplus@10": sel[f"qtsplus@{ten}"]["accuracy"],
               "uniform@10": sel[f"uniform_frames@{ten}"]["accuracy"],
               "random@10": sel[f"random_tokens@{ten}"]["accuracy"],
               "recall@10": sel[f"qtsplus@{ten}"]["target_recall"]}
    return lines, summary


def plot_all(result: dict, dest: Path) -> Path | None:
    """Accuracy against budget, one line per method: every evaluation's (QTSplus trained jointly as `qtsplus+lm`)."""
    from qtsplus.evaluation.report import plot_accuracy_vs_budget

    metrics = dict(result["metrics"]["selector"])
    joint = result["metrics"].get("selector-lm", {})
    metrics.update({k.replace("qtsplus@", "qtsplus+lm@"): v for k, v in joint.items() if k.startswith("qtsplus@")})
    return plot_accuracy_vs_budget(metrics, dest)


def ranking(metrics: dict, budget: float) -> list[str]:
    """Methods at one budget, best accuracy first (what must not change with the data seed)."""
    suffix = f"@{label(budget)}"
    scores = {k.removesuffix(suffix): m["accuracy"] for k, m in metrics.items() if k.endswith(suffix)}
    return sorted(scores, key=lambda k: -scores[k])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/needle"), help="work folder (cached stages live here)")
    parser.add_argument("--preset", default="needle", help="needle (full) | needle-ci")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    parser.add_argument("--threads", type=int, default=None, help="torch threads here and in the training ranks "
                        "(OMP_NUM_THREADS); on a CPU shared with other jobs 1 is often fastest")
    parser.add_argument("--methods", nargs="+", default=None, help="comparators to evaluate (default: every "
                        "registered selector but QTSplus)")
    parser.add_argument("--no-joint", action="store_true", help="skip QTSplus trained jointly with the LM")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("RUN_A", "RUN_B"), help="compare the rankings of "
                        "two finished runs (e.g. two data seeds) instead of running; last line: seeds: kendall_tau=... "
                        "swaps=... significant_swaps=...")
    args = parser.parse_args()
    if args.compare:
        s = compare_seeds(*args.compare, tuple(args.budgets))
        print("\nseeds: " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()))
        return
    if args.threads:
        import torch

        os.environ["OMP_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    budgets = tuple(args.budgets)
    result = run(args.out.resolve(), args.preset, args.seed, budgets, not args.no_progress, args.methods,
                 not args.no_joint)
    wall = time.perf_counter() - start
    lines, summary = table(result, budgets)
    sel = result["metrics"]["selector"]
    print(f"\nneedle benchmark: preset {args.preset}, data seed {args.seed}, {sel['teacher']['mcq_samples']} held-out "
          f"questions, wall time {wall / 60:.1f} min (stages: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in result["timings"].items()) + ")\n")
    print("\n".join(lines))
    print("\nAblation (QTSplus, LM frozen, time embedding zeroed), temporal-order questions:")
    for b in budgets:
        on, off = sel.get(f"qtsplus@{label(b)}"), sel.get(f"qtsplus_no_time@{label(b)}")
        if on and off:
            t_on = on["accuracy_by_type"].get("temporal_order", float("nan"))
            t_off = off["accuracy_by_type"].get("temporal_order", float("nan"))
            print(f"  @{label(b)}: with time {t_on:.3f}, zeroed {t_off:.3f} ({t_off - t_on:+.3f})")
    print(f"\nranking at {label(0.1)}: " + " > ".join(ranking(sel, 0.1)))
    plot = plot_all(result, args.out.resolve() / "accuracy_vs_budget.png")
    print("reports: " + ", ".join([*result["reports"].values(), str(plot)]))
    print("needle: " + " ".join(f"{k}={v:.3f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
