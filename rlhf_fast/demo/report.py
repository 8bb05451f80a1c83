"""The demo's report: PNG plots and a Markdown page that state what was measured."""

from __future__ import annotations

import json
import os
from typing import Dict, List, Tuple


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}"
    return "—" if v is None else str(v)


def curve_points(history: List[Dict], key: str) -> List[Tuple[int, float]]:
    """``(step, value)`` of ``key`` in the metrics log: the logged step (a resumed run's log
    starts past 1, and not every line is a step's), the line number only where a line has none."""
    pts = []
    for i, h in enumerate(history):
        v, step = h.get(key), h.get("step")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            pts.append((step if isinstance(step, int) and not isinstance(step, bool) else i + 1, v))
    return pts


def _curve_png(history: List[Dict], keys: List[str], path: str, title: str, xlabel: str = "RL step") -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = curve_points(history, k)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
            drawn = True
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    if drawn:
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
    plt.close(fig)
    return drawn


def write_report(cfg, report: Dict, run_path: str) -> str:
    """Write plots (the curves of the tuning run in ``run_path`` — RL or DPO — via
    :func:`rlhf_fast.trainers.plot.plot_run`, and the demo's own summary figures) and
    ``report.md`` into ``cfg.out_dir``; returns the report's path."""
    from rlhf_fast.trainers.plot import plot_run

    out = cfg.out_dir
    plots = os.path.join(out, "plots")
    os.makedirs(plots, exist_ok=True)
    images = []
    try:
        images += plot_run(run_path, plots)
    except Exception as e:  # plots must not lose the run's numbers
        report.setdefault("warnings", []).append(f"plot_run failed: {e}")
    from rlhf_fast.trainers.common import read_metrics

    history = read_metrics(run_path)
    if cfg.algo == "dpo" and cfg.task == "preference":
        p = os.path.join(plots, "demo_dpo.png")
        if _curve_png(history, ["loss", "rewards/accuracy", "rewards/margin"], p, "DPO on the annotators' pairs",
                      xlabel="DPO step"):
            images.append(p)
    else:
        p = os.path.join(plots, "demo_reward_kl.png")
        if _curve_png(history, [k for k in ("reward/total", "kl/seq") if any(k in h for h in history)], p,
                      "reward and KL during RL"):
            images.append(p)
        ens = report["stages"].get("reward_ensemble")
        if ens:
            p = os.path.join(plots, "demo_rm_ensemble.png")
            keys = [f"reward/rm{k}" for k in range(ens["members"])] + ["reward/reward_model", "reward/rm_std"]
            if _curve_png(history, keys, p, f"ensemble members, their {ens['mode']} and disagreement (rm_std)"):
                images.append(p)

    ev = report["stages"].get("evaluation", {})
    lines = [f"# rlhf_fast demo — {cfg.task}", ""]
    lines.append(f"Run folder: `{out}` · algorithm: {cfg.algo} · "
                 f"wall time: {report.get('wall_seconds', 0):.0f} s on the CPU · seed {cfg.seed}"
                 + (" · QUICK (tiny sizes)" if cfg.quick else ""))
    lines += ["", "## Results", "", "| measure | value |", "|---|---|"]
    for k, v in ev.items():
        lines.append(f"| {k} | {_fmt(v)} |")
    if cfg.task == "arithmetic":
        lines += ["", f"How it is measured: `accuracy_*_greedy` is the accuracy of the greedy answer to each of "
                  f"the {cfg.eval_prompts} evaluation sums, `accuracy_*_sampled` that of 8 answers per sum sampled at "
                  "temperature 1 (the same sampling seed for both policies); an answer is right when its first "
                  "word is the exact sum; `accuracy_ratio`: tuned / SFT, greedy. The evaluation sums (two "
                  "operands 0–9) come from the same 100 sums the SFT and GRPO prompts cover: this measures "
                  "learning them, not generalising to unseen sums."]
    if cfg.task == "preference":
        rm = report["stages"].get("reward_model", {})
        lines += ["", "## Reward model", "", "| measure | value |", "|---|---|"]
        for k, v in rm.items():
            lines.append(f"| {k} | {_fmt(v)} |")
        lines += ["", "How to read this: the true win-rate is judged by the hidden preference the simulated "
                  "annotators follow (warm adjectives good, cold ones bad), not by the reward model. "
                  "`rm_minus_true_win_rate` > 0 means the reward model believes in more progress than there "
                  "is (reward over-optimisation; here partly the annotators' length bias, "
                  f"{cfg.length_bias} utility per word, and their {cfg.annotator_noise:.0%} label noise). "
                  "The hidden utility itself can be gamed too: `on_topic_rate` (the response names the "
                  "prompt's subject and no other) and the samples below show what neither the annotators "
                  "nor the reward model check.",
                  "", f"How it is measured: each policy answers each of the {cfg.eval_prompts} evaluation prompts "
                  "once, sampled at temperature 1 (independent draws: a sampling seed each); "
                  "`true_win_rate_tuned_vs_sft` is the fraction of prompts whose tuned answer has the higher "
                  "hidden utility, ties count half (`rm_win_rate_tuned_vs_sft` the same by the reward model's score). "
                  "`kl_tuned_vs_sft_per_sequence`: the mean over the tuned policy's answers of Σ_t (log π_tuned − "
                  "log π_SFT) over the tokens it generated (the k1 estimate of KL(tuned ‖ SFT), in nats). "
                  "`length_words_*`: words split at whitespace. `rm_heldout_agreement_vs_hidden`: on the held-out "
                  "labelled pairs (a fifth, at least 8, not trained on) that the hidden utility strictly "
                  "orders (`rm_heldout_pairs_strict`), the fraction the reward model orders the same way."]
    ens = report["stages"].get("reward_ensemble", {})
    if ens:
        coef = f", λ = {ens['coef']}" if ens.get("coef") is not None else ""
        lines += ["", "## Reward-model ensemble", "",
                  f"{ens['members']} reward models trained on the same labelled pairs and held-out split, with "
                  f"different seeds (initialisation and batch order; no bootstrap resampling, as Coste et al. 2023); "
                  f"RL optimised their `{ens['mode']}`{coef} per answer (reward model 0 is the one the "
                  "single-model demo trains). In the results above, `rm_score_*` and `rm_win_rate_tuned_vs_sft` "
                  "are that combined score; `rm_std_sft` / `rm_std_tuned` the members' population std on the "
                  "evaluation answers of the SFT and the tuned policy. `rl_rm_std_first_steps` / "
                  "`rl_rm_std_last_steps`: `reward/rm_std` (their std on the policy's samples) averaged over the "
                  "first and the last fifth of the RL steps; it grows when the policy finds answers the members "
                  "disagree on. `rmK_score_gain`: each member's mean score gain, tuned vs SFT.",
                  "", "| measure | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in ens.items() if k != "training"]
    dpo = report["stages"].get("dpo", {})
    if dpo:
        lines += ["", "## DPO (held-out pairs, labels of the annotators)", "", "| measure | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in dpo.items()]
    sft = report["stages"].get("sft", {})
    lines += ["", "## SFT", "", "| measure | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in sft.items()]
    if report.get("examples"):
        lines += ["", "## Samples (same prompt, SFT vs tuned)", ""]
        for ex in report["examples"]:
            lines += [f"- **{ex['prompt']}**", f"  - SFT: {ex['sft']!r}", f"  - tuned: {ex['tuned']!r}"]
    if images:
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(i)}](plots/{os.path.basename(i)})" for i in images]
    for w in report.get("warnings", []):
        lines += ["", f"> warning: {w}"]
    path = os.path.join(out, "report.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str)
    return path
