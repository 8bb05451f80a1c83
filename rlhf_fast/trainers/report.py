"""``rlhf-fast report RUN_DIR [--out REPORT.md]``: one Markdown page that says what a run did.

The page (``RUN_DIR/report.md`` by default, written atomically) holds: the kind of run, read
from its config.yaml (:func:`run_kind`), its model and data, a short table of the settings
that matter for that kind (the whole config is linked), steps done against those planned,
the wall time and throughput where the run logged them, and whether it finished (``final/``)
or stopped (its latest checkpoint); then, for the metrics that matter for the kind, the first,
last and best logged values with their steps (:func:`summarize_metric`), the PNG curves of
``rlhf-fast plot`` (written to ``RUN_DIR/plots``) linked relative to the page, and for RL
runs a few completions of the first and the last step of samples.jsonl.

A run that stopped early, never evaluated, logged nothing or logged NaNs still gets its page:
what is missing is said, not guessed. Bad input (no such folder, a folder that is not a run,
an ``--out`` that is a folder) exits with code 2 and one line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple

# the CLI commands whose run folders this reads; each RL one covers these estimators
RL_FAMILIES = {"ppo": ("gae", "reinforce++", "reinforce++_baseline"), "grpo": ("grpo", "dr_grpo"), "rloo": ("rloo",),
               "distill": ("distill",), "online-dpo": ("online_dpo",), "a2po": ("a2po",), "sdpo": ("sdpo",),
               "sdft": ("sdft",)}

# Keys that only one offline trainer's config holds (checked in this order: KTO and DPO both have
# beta / loss_type / ref_model, the reward and DPO configs both use_margin). Several per kind, so
# a config written by an older version that lacked one is still recognised.
KIND_MARKERS = (
    ("prm", ("step_separator", "train_on_last_step_only")),  # before dpo: a PRM config has max_prompt_length too
    ("kto", ("desirable_weight", "undesirable_weight", "score_threshold")),
    ("dpo", ("rpo_alpha", "f_divergence_type", "simpo_gamma", "max_prompt_length")),
    ("reward", ("center_rewards_coefficient", "rankings_as_pairs")),
    ("sft", ("completion_only_loss", "assistant_only_loss", "packing")),
)

_OFFLINE_COMMON = ("batch_size", "grad_accum", "lr", "lr_schedule", "warmup_steps", "max_steps", "num_train_epochs",
                   "max_len", "lora", "seed")
# the settings shown in the page's table, per kind (dotted keys into config.yaml)
KEY_SETTINGS = {
    "sft": _OFFLINE_COMMON + ("packing", "loss_type", "completion_only_loss", "assistant_only_loss"),
    "reward": _OFFLINE_COMMON + ("data_kind", "label_smoothing", "use_margin", "center_rewards_coefficient"),
    "dpo": ("ref_model",) + _OFFLINE_COMMON + ("beta", "loss_type", "label_smoothing", "rpo_alpha",
                                               "precompute_ref_logps"),
    "kto": ("ref_model",) + _OFFLINE_COMMON + ("beta", "loss_type", "desirable_weight", "undesirable_weight"),
    "prm": _OFFLINE_COMMON + ("max_prompt_length", "max_completion_length", "step_separator",
                              "train_on_last_step_only"),
}
_RL_COMMON = ("estimator", "steps", "num_train_epochs", "model.reference", "model.lora", "rollout.prompts_per_step",
              "rollout.group_size", "rollout.max_new_tokens", "rollout.temperature", "reward.functions",
              "reward.reward_model", "reward.process_model", "kl.coef", "kl.placement", "kl.reward_kind", "kl.kind", "ppo.epochs",
              "ppo.mini_batch_size", "ppo.clip_low", "ppo.clip_high", "optim.lr", "seed")
KEY_SETTINGS.update({
    "ppo": _RL_COMMON + ("model.critic", "ppo.gamma", "ppo.lam", "ppo.value_coef", "optim.critic_lr"),
    "grpo": _RL_COMMON + ("scale_rewards", "ppo.importance_sampling_level", "ppo.policy_loss"),
    "rloo": _RL_COMMON,
    "distill": ("estimator", "steps", "num_train_epochs", "model.lora", "distill.teacher", "distill.beta",
                "distill.lmbda", "distill.seq_kd", "rollout.prompts_per_step", "rollout.group_size",
                "rollout.max_new_tokens", "rollout.temperature", "ppo.epochs", "ppo.mini_batch_size", "optim.lr", "seed"),
    "online-dpo": ("estimator", "steps", "num_train_epochs", "model.reference", "model.lora", "online_dpo.beta",
                   "online_dpo.loss_type", "online_dpo.missing_eos_penalty", "online_dpo.judge",
                   "rollout.prompts_per_step", "rollout.max_new_tokens", "rollout.temperature", "reward.functions",
                   "reward.reward_model", "reward.process_model", "ppo.epochs", "ppo.mini_batch_size", "optim.lr",
                   "seed"),
    "a2po": ("estimator", "steps", "num_train_epochs", "model.lora", "a2po.num_value_samples", "a2po.beta1",
             "a2po.beta2", "a2po.filter_all_incorrect", "rollout.prompts_per_step", "rollout.max_new_tokens",
             "rollout.temperature", "reward.functions", "reward.reward_model",
             "reward.process_model", "optim.lr", "seed"),
    "sdpo": ("estimator", "steps", "num_train_epochs", "model.lora", "sdpo.distillation_weight",
             "sdpo.distillation_mode", "sdpo.teacher_model_kind", "sdpo.success_reward_threshold",
             "rollout.prompts_per_step", "rollout.group_size", "rollout.max_new_tokens", "rollout.temperature",
             "reward.functions", "reward.reward_model", "reward.process_model", "optim.lr", "seed"),
    "sdft": ("estimator", "steps", "num_train_epochs", "model.lora", "sdft.teacher_model_kind",
             "sdft.distillation_mode", "sdft.distillation_alpha", "sdft.distillation_topk",
             "rollout.prompts_per_step", "rollout.group_size", "rollout.max_new_tokens", "rollout.temperature",
             "ppo.epochs", "ppo.mini_batch_size", "optim.lr", "seed"),
})

# The metrics tabulated, per kind, in this order; "x*" takes every logged key starting with "x".
_OFFLINE_TAIL = ("eval_*", "grad_norm", "lr")
KEY_METRICS = {
    "sft": ("loss", "eval_loss", "eval_ppl", "entropy", "mean_token_accuracy", "tokens", "num_tokens",
            "train_tokens_per_second") + _OFFLINE_TAIL,
    "reward": ("loss", "accuracy", "margin", "mean_reward", "eval_loss", "eval_accuracy", "num_tokens",
               "train_tokens_per_second") + _OFFLINE_TAIL,
    "dpo": ("loss", "rewards/accuracy", "rewards/margin", "rewards/chosen", "rewards/rejected", "entropy",
            "mean_token_accuracy", "logits/*", "eval_loss", "eval_rewards/accuracy", "eval_rewards/margin",
            "num_tokens", "train_tokens_per_second") + _OFFLINE_TAIL,
    "kto": ("loss", "kl", "rewards/margin", "rewards/chosen", "rewards/rejected", "entropy", "logits/*", "eval_loss",
            "eval_kl", "eval_rewards/margin", "num_tokens", "train_tokens_per_second") + _OFFLINE_TAIL,
    "prm": ("loss", "eval_loss", "eval_accuracy", "eval_solution_accuracy", "num_tokens",
            "train_tokens_per_second") + _OFFLINE_TAIL,
}
KEY_METRICS.update(dict.fromkeys(("ppo", "grpo", "rloo"), (
    "reward/total", "reward/*", "eval/*", "kl/seq", "kl/token", "kl/coef", "entropy", "policy/loss",
    "policy/clip_frac", "policy/approx_kl", "policy/grad_norm", "value/loss", "value/explained_variance",
    "value/clip_frac", "response_length/mean", "rollout/truncated_frac", "tokens_per_second", "time/step", "lr")))
KEY_METRICS["distill"] = ("loss", "distill/divergence", "entropy", "eval/*", "grad_norm", "completions/mean_length",
                          "completions/clipped_ratio", "distill/on_policy", "num_tokens", "reward/*", "tokens_per_second",
                          "time/step", "lr")
KEY_METRICS["online-dpo"] = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected",
                             "objective/*", "logps/*", "val/contain_eos_token", "reward/*", "eval/*", "grad_norm",
                             "beta", "response_length/mean", "tokens_per_second", "time/step", "lr")
KEY_METRICS["sdpo"] = ("reward/total", "reward/*", "self_distillation/*", "sdpo/*", "eval/*", "policy/loss",
                      "policy/grad_norm", "response_length/mean", "rollout/truncated_frac", "time/step", "lr")
KEY_METRICS["sdft"] = ("loss", "sdft/distillation_loss", "entropy", "eval/*", "grad_norm", "completions/mean_length",
                      "completions/clipped_ratio", "sdft/teacher_syncs", "num_tokens", "reward/*", "tokens_per_second",
                      "time/step", "lr")
KEY_METRICS["a2po"] = ("loss", "reward", "v_star", "advantage", "implicit_reward", "reward/*", "eval/*", "grad_norm",
                      "a2po/*", "response_length/mean", "rollout/truncated_frac", "time/step", "lr")

NUMBER_FORMAT = ".6g"  # every metric value on the page (six significant digits)
MAX_TEXT = 400  # characters of a prompt or completion shown; the rest is counted


# --------------------------------------------------------------------------- reading a run


def run_kind(config: Dict[str, Any]) -> str:
    """The kind of run whose config.yaml (a dict) is ``config``: ``sft``, ``reward``, ``dpo``,
    ``kto`` or the RL command ``ppo`` / ``grpo`` / ``rloo`` / ``distill`` / ``online-dpo`` / ``a2po`` (from
    ``estimator``). ValueError when it is none of them."""
    if not isinstance(config, dict):
        raise ValueError(f"config.yaml: expected a mapping of config keys, got {type(config).__name__}")
    if "estimator" in config and isinstance(config.get("rollout"), dict):
        est = config["estimator"]
        for kind, estimators in RL_FAMILIES.items():
            if est in estimators:
                return kind
        raise ValueError(f"config.yaml: unknown estimator {est!r} (expected one of "
                         f"{', '.join(e for es in RL_FAMILIES.values() for e in es)})")
    for kind, keys in KIND_MARKERS:
        if any(k in config for k in keys):
            return kind
    raise ValueError("config.yaml: not the config of an rlhf-fast run (sft, reward, prm, dpo, kto, ppo, grpo, rloo, ...): "
                     "it has none of their keys")


def read_config(run_dir: str) -> Dict[str, Any]:
    """``run_dir/config.yaml`` as a dict (ValueError naming the file when it is no YAML mapping)."""
    import yaml

    path = os.path.join(run_dir, "config.yaml")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a YAML config ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of config keys")
    return data


def read_samples(run_dir: str) -> Tuple[List[Dict[str, Any]], int]:
    """``(rows, unreadable)``: the records of ``run_dir/samples.jsonl`` that are JSON objects with
    an int ``step`` (none when the file is absent), and how many lines were not (a torn last
    line of a run killed mid-write among them)."""
    path = os.path.join(run_dir, "samples.jsonl")
    rows, bad = [], 0
    if not os.path.isfile(path):
        return rows, bad
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            step = rec.get("step") if isinstance(rec, dict) else None
            if isinstance(step, int) and not isinstance(step, bool):
                rows.append(rec)
            else:
                bad += 1
    return rows, bad


def config_value(config: Dict[str, Any], dotted: str, default: Any = None) -> Any:
    """The value of the dotted key ``dotted`` (``"rollout.group_size"``) in ``config``."""
    cur: Any = config
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


# --------------------------------------------------------------------------- metric summaries


class MetricSummary(NamedTuple):
    """One metric over a run's log. ``first`` / ``last``: ``(step, value)`` of the first and last
    record that logged it (value a float, NaN / ±inf included); ``best``: ``(step, value)`` of
    the best finite value (the first step that reached it), None for a metric without a better
    direction or without a finite value; ``points``: records that logged it; ``non_finite``:
    how many of them logged NaN / ±inf."""
    key: str
    first: Tuple[int, float]
    last: Tuple[int, float]
    best: Optional[Tuple[int, float]]
    points: int
    non_finite: int


def metric_value(v: Any) -> Optional[float]:
    """A logged value as a float: numbers, and the texts ``"nan"`` / ``"inf"`` / ``"-inf"`` that
    the loggers write for non-finite floats (JSON has none); None for anything else."""
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str) and v.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(v.strip())
    return None


def direction(key: str) -> int:
    """+1 when a larger value of metric ``key`` is better (rewards, verl's ``mean@n`` / ``best@k`` /
    ``worst@k`` / ``maj@k`` of RL's evaluation, accuracies, margins), -1 when
    a smaller one is (losses, perplexity, a distillation divergence), 0 when neither is (KL, entropy, lengths, the policy
    loss of an advantage-weighted objective, ...)."""
    base = re.sub(r"^eval[_/]", "", key)
    if base == "policy/loss":
        return 0
    if base == "loss" or base.endswith("/loss") or base == "ppl" or base.endswith("/divergence"):
        return -1
    if base.endswith("_loss") and not base.endswith("policy_loss"):  # distillation, auxiliary losses
        return -1
    if base.startswith("reward/") and not any(w in base for w in ("std", "dropped")):
        return 1
    if base == "reward":  # a2po's mean reward of the step's answers
        return 1
    if re.fullmatch(r"(mean|best|worst|maj|pass)@\d+", base):  # verl's validation rewards, pass@k
        return 1
    if "accuracy" in base or base.endswith("margin") or base in ("value/explained_variance", "win_rate"):
        return 1
    # online DPO's (TRL's names): the pairs' accuracy and margin, and the scores of its answers
    if base in ("rewards/accuracies", "rewards/margins", "objective/scores", "objective/scores_margin",
                "objective/rlhf_reward"):
        return 1
    return 0


def summarize_metric(records: Sequence[Dict[str, Any]], key: str) -> Optional[MetricSummary]:
    """The :class:`MetricSummary` of ``key`` over ``records`` (metrics.jsonl's dicts with ``step``,
    in log order), or None when no record logged a number for it."""
    pts = [(int(r["step"]), v) for r in records for v in [metric_value(r.get(key))] if v is not None]
    if not pts:
        return None
    finite = [p for p in pts if math.isfinite(p[1])]
    sign = direction(key)
    best = None
    if sign and finite:
        best = finite[0]
        for p in finite[1:]:
            if sign * p[1] > sign * best[1]:  # strict: ties keep the earliest step
                best = p
    return MetricSummary(key, pts[0], pts[-1], best, len(pts), len(pts) - len(finite))


def key_metrics(kind: str, records: Sequence[Dict[str, Any]]) -> List[str]:
    """The logged metrics of :data:`KEY_METRICS` for ``kind``, in its order (a pattern's matches
    sorted), each once."""
    logged = sorted({k for r in records for k, v in r.items() if k != "step" and metric_value(v) is not None})
    out: List[str] = []
    for pat in KEY_METRICS[kind]:
        hits = [k for k in logged if k.startswith(pat[:-1])] if pat.endswith("*") else [k for k in logged if k == pat]
        out += [k for k in hits if k not in out]
    return out


# --------------------------------------------------------------------------- Markdown


# the characters that can start an inline construct (emphasis, code, link, image, autolink or
# HTML, entity, strikethrough, math, a table cell's end); block syntax (#, -, >, 1.) cannot start
# inside a table cell or after a list item's label, so those are left readable
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&!$])")


def md_text(text: Any, limit: Optional[int] = MAX_TEXT) -> str:
    """``text`` as literal Markdown inline text, safe in a table cell: the characters that could
    start emphasis, code, a link, HTML, an entity or a cell break backslash-escaped (CommonMark
    and GFM take any ASCII punctuation escaped), line breaks as ``<br>``, leading / trailing
    spaces kept (``&#32;``: a cell is trimmed), and past ``limit`` characters cut with a count of
    the rest. A non-text value is shown as its JSON."""
    if not isinstance(text, str):
        text = json.dumps(text, ensure_ascii=False, default=str)
    more = ""
    if limit is not None and len(text) > limit:
        more, text = f" … ({len(text) - limit} more characters)", text[:limit]
    s = _MD_SPECIAL.sub(r"\\\1", text)
    s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ").replace("\n", "<br>")
    core = s.strip(" ")
    lead = len(s) - len(s.lstrip(" "))
    trail = len(s) - len(s.rstrip(" ")) if core else 0
    s = "&#32;" * lead + core + "&#32;" * trail
    return (s or "*(empty)*") + more


def md_code(text: str) -> str:
    """``text`` as a code span that holds it exactly, in a table cell too (a fence longer than
    any run of backticks in it; ``|`` escaped, which GFM tables take out again)."""
    text = str(text).replace("\n", " ")
    fence = "`" * (max((len(m) for m in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text.replace('|', chr(92) + '|')}{pad}{fence}"


def md_link_target(path: str, start: str) -> str:
    """``path`` relative to the folder ``start`` with forward slashes, in the ``<...>`` form
    when it has spaces or parentheses (a bare link target may not)."""
    rel = os.path.relpath(path, start).replace(os.sep, "/")
    return f"<{rel}>" if re.search(r"[\s()<>]", rel) else rel


def format_number(v: Optional[float]) -> str:
    """A metric value on the page: :data:`NUMBER_FORMAT`, ``nan`` / ``inf`` / ``-inf`` as such."""
    if v is None:
        return "—"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return format(v, NUMBER_FORMAT)


def _setting(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (dict, list)) or (isinstance(v, str) and (v != v.strip() or not v or not v.isprintable())):
        # (a string with spaces at its ends or control characters, e.g. a step separator "\n", shown as JSON)
        return md_text(json.dumps(v, ensure_ascii=False), limit=120)
    return md_text(str(v), limit=120)


def _at(p: Optional[Tuple[int, float]]) -> str:
    return "—" if p is None else f"{format_number(p[1])} (step {p[0]})"


# --------------------------------------------------------------------------- the page


def _model_and_data(kind: str, cfg: Dict[str, Any]) -> Tuple[str, str]:
    if kind in RL_FAMILIES:
        model = str(config_value(cfg, "model.policy"))
        if model.startswith("tiny:") and config_value(cfg, "model.tiny_hidden_size") is not None:
            sizes = {k: config_value(cfg, f"model.tiny_{k}") for k in ("hidden_size", "num_layers", "vocab_size")}
            model += " (" + ", ".join(f"{k} {v}" for k, v in sizes.items() if v is not None) + ")"
        file = config_value(cfg, "data.prompts_file")
        prompts = config_value(cfg, "data.prompts") or []
        data = f"prompts from {file}" if file else f"{len(prompts)} prompts in the config"
        ev = config_value(cfg, "data.eval_prompts_file") or config_value(cfg, "data.eval_prompts")
        frac = config_value(cfg, "data.eval_fraction")
        if ev:
            data += "; evaluation prompts " + (ev if isinstance(ev, str) else f"({len(ev)} in the config)")
        elif frac:
            data += f"; eval_fraction {frac} of them held out for evaluation"
        return model, data
    data = cfg.get("data") or "the built-in synthetic data"
    if cfg.get("eval_data"):
        data = f"{data}; evaluation data {cfg['eval_data']}"
    elif cfg.get("eval_fraction"):
        data = f"{data}; eval_fraction {cfg['eval_fraction']} of it held out for evaluation"
    return str(cfg.get("model")), str(data)


def _checkpoint_step(ck: str) -> int:
    return int(os.path.basename(ck).split("_")[-1])  # step_00000123


def _status(run_dir: str, ck: Optional[str], done: int, planned: Any, resume_hint: str) -> str:
    """Finished (``final/`` and every planned step) or stopped, and where it can continue from
    (``ck``: the latest complete checkpoint or None)."""
    final = os.path.isdir(os.path.join(run_dir, "final"))
    short = isinstance(planned, int) and done < planned
    if final and not short:
        return "finished (`final/` holds the trained model)"
    where = (f"its latest checkpoint is step {_checkpoint_step(ck)} (`checkpoints/{os.path.basename(ck)}`); {resume_hint}"
             if ck else "it has no checkpoint to continue from")
    if final:
        return (f"stopped at step {done} of {planned}, after an earlier part had finished (`final/` is that "
                f"part's model); {where}")
    return f"stopped (no `final/`): {where}"


def _timing(records: Sequence[Dict[str, Any]], cfg: Dict[str, Any]) -> List[str]:
    """The wall time / throughput lines. With ``log_every`` > 1 a record's value is the mean of
    the steps since the previous record (:class:`~rlhf_fast.trainers.common.LogWindow`), so each
    counts for those steps (a log from before that averaging: the logged step's value stands for
    them)."""
    def finite(key):  # [(value, the steps since the previous record)]
        prev, out = 0, []
        for r in records:
            v, step = metric_value(r.get(key)), int(r["step"])
            if v is not None and math.isfinite(v):
                out.append((v, max(step - prev, 1)))
            prev = step
        return out

    def total(pts):
        return sum(v * w for v, w in pts)

    def mean(pts):
        return total(pts) / sum(w for _, w in pts)

    lines = []
    every = cfg.get("log_every", 1)
    step_times, tps, tokens = finite("time/step"), finite("tokens_per_second"), finite("tokens")
    trained_tps = finite("train_tokens_per_second")

    windows = []  # whether a line counts records for several steps each

    def over(pts, what="steps"):  # the steps the records stand for
        n = sum(w for _, w in pts)
        if every == 1 or n == len(pts):
            return f"{len(pts)} {'logged ' if what == 'logged' else ''}steps"
        windows.append(True)
        return f"the {n} steps of {len(pts)} logged records"

    if step_times:
        lines.append(f"- **Wall time**: {format_number(total(step_times))} s, the sum of `time/step` over "
                     f"{over(step_times, 'logged')}")
    if tps:
        lines.append(f"- **Throughput**: {format_number(mean(tps))} generated tokens/s "
                     f"(mean `tokens_per_second` over {over(tps)})")
    if trained_tps:
        lines.append(f"- **Throughput**: {format_number(mean(trained_tps))} trained (input) tokens/s "
                     f"(mean `train_tokens_per_second` over {over(trained_tps)})")
    if tokens:
        lines.append(f"- **Tokens trained**: {format_number(total(tokens))} (sum of `tokens` over "
                     f"{over(tokens, 'logged')})")
    if windows:
        lines.append(f"- (log_every {every}: each logged value is the mean of the steps since the previous "
                     "record, counted once for each of them)")
    if not lines:
        lines.append("- **Wall time / throughput**: not logged")
    return lines


def _header(run_dir: str, out_dir: str, kind: str, cfg: Dict[str, Any], records: Sequence[Dict[str, Any]]
            ) -> List[str]:
    name = os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    model, data = _model_and_data(kind, cfg)
    rl = kind in RL_FAMILIES
    planned = cfg.get("steps" if rl else "max_steps")
    done = max((int(r["step"]) for r in records), default=0)
    from .checkpoint import latest_checkpoint

    ck = latest_checkpoint(run_dir, recover=False)  # (read-only: the run may be saving)
    if ck:  # a checkpoint past the last logged step (log_every > 1) counts too
        done = max(done, _checkpoint_step(ck))
    hint = ("continue with " + md_code(f"rlhf-fast {kind} --resume {run_dir}") if rl
            else "continue with the same command and `--resume true`")
    est = cfg.get("estimator")
    kind_text = f"{kind} (estimator {est})" if rl and est != kind else kind
    lines = [f"# Run report: {md_text(name)}", "",
             f"- **Kind**: {md_text(kind_text)}",
             f"- **Model**: {md_text(model)}",
             f"- **Data**: {md_text(data)}",
             f"- **Steps**: {done} of {planned} planned"
             + (f" (num_train_epochs {cfg['num_train_epochs']})" if cfg.get("num_train_epochs") else ""),
             f"- **Status**: {_status(run_dir, ck, done, planned, hint)}"]
    lines += _timing(records, cfg)
    cfg_link = md_link_target(os.path.join(run_dir, "config.yaml"), out_dir)
    lines += ["", "## Settings", "", f"The settings that matter most in {kind} runs; the whole resolved config "
              f"is in [config.yaml]({cfg_link}).", "", "| key | value |", "|---|---|"]
    missing = object()
    for key in KEY_SETTINGS[kind]:
        v = config_value(cfg, key, missing)
        if v is not missing and not (key == "num_train_epochs" and v is None):
            lines.append(f"| {md_code(key)} | {_setting(v)} |")
    return lines


def _metrics_section(kind: str, records: Sequence[Dict[str, Any]]) -> List[str]:
    lines = ["", "## Metrics", ""]
    if not records:
        return lines + ["metrics.jsonl holds no records: the run stopped before its first logged step."]
    keys = key_metrics(kind, records)
    lines += ["`best` is the highest value for rewards, accuracies and margins and the lowest for losses "
              "(the first step that reached it; — where neither is better); NaN / inf never count as best.", "",
              "| metric | first | last | best | logged (non-finite) |", "|---|---|---|---|---|"]
    for key in keys:
        s = summarize_metric(records, key)
        count = f"{s.points}" + (f" ({s.non_finite})" if s.non_finite else "")
        lines.append(f"| {md_code(key)} | {_at(s.first)} | {_at(s.last)} | {_at(s.best)} | {count} |")
    if not keys:
        lines.append("| (none of this kind's metrics was logged) | | | | |")
    others = sorted({k for r in records for k, v in r.items()
                     if k != "step" and k not in keys and metric_value(v) is not None})
    if others:
        lines += ["", "Also logged (in the plots): " + ", ".join(md_code(k) for k in others) + "."]
    return lines


def _plots_section(run_dir: str, out_dir: str, records: Sequence[Dict[str, Any]], plot: bool) -> List[str]:
    lines = ["", "## Plots", ""]
    if not plot:
        return lines + ["Not drawn (--no-plots); `rlhf-fast plot RUN_DIR` draws them."]
    drawable = any(k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for r in records for k, v in r.items())
    if not drawable:
        return lines + ["None: no metric has a finite value yet."]
    from .plot import plot_run

    for png in plot_run(run_dir, os.path.join(run_dir, "plots")):
        stem = os.path.splitext(os.path.basename(png))[0]
        lines += [f"![{md_text(stem)}]({md_link_target(png, out_dir)})", ""]
    return lines[:-1]


def _samples_section(run_dir: str, per_step: int) -> List[str]:
    rows, bad = read_samples(run_dir)
    lines = ["", "## Sample completions", ""]
    if not rows:
        return lines + ["None logged (samples.jsonl is absent or empty: `sample_every` 0, or the run stopped before "
                        "its first sample)."]
    if per_step == 0:
        return lines + [f"samples.jsonl holds {len(rows)} completions; none shown (--samples 0)."]
    steps = sorted({r["step"] for r in rows})
    lines.append(f"samples.jsonl holds {len(rows)} completions of {len(steps)} steps; the first {per_step} of the "
                 f"first and the last of them" + (f" ({bad} unreadable lines skipped)" if bad else "") + ".")
    lines += ["", "| step | prompt | completion | reward |", "|---|---|---|---|"]
    for step in dict.fromkeys((steps[0], steps[-1])):
        for r in [r for r in rows if r["step"] == step][:per_step]:
            reward = metric_value(r.get("reward"))
            lines.append(f"| {step} | {md_text(r.get('prompt', ''))} | {md_text(r.get('completion', ''))} | "
                         f"{format_number(reward) if reward is not None else md_text(r.get('reward'))} |")
    return lines


def render_report(run_dir: str, out_dir: str, *, plot: bool = True, samples: int = 4) -> str:
    """The Markdown text of the report of ``run_dir``, its links relative to ``out_dir`` (the
    folder the page goes to). With ``plot``, writes the PNGs of
    :func:`rlhf_fast.trainers.plot.plot_run` into ``RUN_DIR/plots`` first. ``samples``: the
    completions shown per step (RL runs)."""
    from .plot import read_records

    cfg = read_config(run_dir)
    kind = run_kind(cfg)
    records = read_records(run_dir) if os.path.isfile(os.path.join(run_dir, "metrics.jsonl")) else []
    lines = _header(run_dir, out_dir, kind, cfg, records)
    lines += _metrics_section(kind, records)
    lines += _plots_section(run_dir, out_dir, records, plot)
    if kind in RL_FAMILIES:
        lines += _samples_section(run_dir, samples)
    return "\n".join(lines) + "\n"


def check_run_dir(run_dir: str) -> None:
    """FileNotFoundError / ValueError (naming ``run_dir``) unless it is a folder with a config.yaml."""
    if not os.path.exists(run_dir):
        raise FileNotFoundError(f"RUN_DIR {run_dir}: no such folder")
    if not os.path.isdir(run_dir):
        raise ValueError(f"RUN_DIR {run_dir}: expected a run folder, found a file")
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise ValueError(f"RUN_DIR {run_dir}: not a run folder (no config.yaml; rlhf-fast sft / reward / dpo / kto / "
                         "ppo / grpo / rloo write one)")


# what the trainers write in a run folder (and resume, plot and evaluate from): never a report's --out
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl", "eval_samples.jsonl", "tracker_ids.json")
RUN_FOLDERS = ("checkpoints", "final", "plots", "tb")


_REPORT_HINT = "write the report to a Markdown file elsewhere (default RUN_DIR/report.md)"


def check_out_not_run_file(run_dir: str, out: str, *, own: str = ".md", what: str = "the report",
                           hint: str = _REPORT_HINT) -> None:
    """ValueError naming --out when ``out`` is one of the files of the run ``run_dir``
    (:data:`RUN_FILES`, anything under :data:`RUN_FOLDERS`, or another file there that does not
    end in ``own``, the suffix of the files the command writes): ``what`` would replace it. The
    message ends with ``hint``."""
    from .config import path_inside

    rel = path_inside(out, run_dir)
    if rel is None:
        return  # outside the run folder
    top = rel.split(os.sep)[0]
    if top in RUN_FILES or top in RUN_FOLDERS or (os.path.isfile(out) and not out.endswith(own)):
        raise ValueError(f"--out {out}: {rel} in RUN_DIR is the run's own ({what} would replace it); {hint}")


def write_report(run_dir: str, out: Optional[str] = None, *, plot: bool = True, samples: int = 4) -> str:
    """Write the report of ``run_dir`` to ``out`` (default ``RUN_DIR/report.md``) atomically, the
    plots to ``RUN_DIR/plots``; returns the report's path. Every path is checked before anything
    is written."""
    from .config import atomic_write_text, check_output_path

    check_run_dir(run_dir)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise ValueError(f"--samples must be an int >= 0, got {samples!r}")
    out = out if out is not None else os.path.join(run_dir, "report.md")
    check_output_path(out, "--out")
    check_out_not_run_file(run_dir, out)
    if plot:
        check_output_path(os.path.join(run_dir, "plots"), "the plots folder RUN_DIR/plots", folder=True)
    text = render_report(run_dir, os.path.dirname(os.path.abspath(out)), plot=plot, samples=samples)
    atomic_write_text(out, text)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run folder (config.yaml, metrics.jsonl, ...)")
    parser.add_argument("--out", default=None, help="the Markdown file to write (default RUN_DIR/report.md)")
    parser.add_argument("--samples", type=int, default=4, help="RL: completions shown of the first and the last "
                                                               "sampled step (default 4)")
    parser.add_argument("--no-plots", action="store_true", help="draw no PNGs (RUN_DIR/plots is left as it is)")


def run(args) -> int:
    print(write_report(args.run_dir, args.out, plot=not args.no_plots, samples=args.samples))
    return 0
