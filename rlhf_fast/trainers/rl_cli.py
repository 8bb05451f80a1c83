"""``rlhf-fast ppo|grpo|rloo|distill|online-dpo|a2po CONFIG.yaml [--key value ...] [--resume RUN_DIR]``.

The command picks the estimator family: ``ppo`` → gae (or reinforce++ when the config says
so), ``grpo`` → grpo (or dr_grpo), ``rloo`` → rloo; a config file's estimator of another
family becomes the command's, while one asked for with ``--estimator`` or the estimator of a
run being resumed is an error. Overrides use dotted keys of
:class:`~rlhf_fast.trainers.rl_config.RLConfig` (``--rollout.group_size 8``). With only
``--resume RUN_DIR`` the run's own config.yaml is used; CONFIG ``none`` means the defaults. The policy is a local path or a
``tiny:FAMILY`` spec (``--model.policy``); rewards come from ``--reward.functions
module:function`` and/or ``--reward.reward_model PATH``. ``distill`` (estimator distill) trains
the policy towards ``--distill.teacher PATH``
(:class:`~rlhf_fast.trainers.distill.DistillationTrainer`); it needs no reward. ``online-dpo``
(estimator online_dpo, :class:`~rlhf_fast.trainers.online_dpo.OnlineDPOTrainer`) trains a DPO
loss on each prompt's two answers, the better by the rewards (or ``--online_dpo.judge``) chosen;
``rollout.group_size`` is 2 unless the config file or the command line sets it. ``a2po`` (estimator
a2po, :class:`~rlhf_fast.trainers.a2po.A2POTrainer`) regresses β2·log π/π_ref of one answer per
prompt onto r − V*, V* estimated before training; ``rollout.group_size`` is 1 and
``rollout.prompts_per_step`` 8 (TRL's 8 prompts per device, one answer each) unless the config
file or the command line sets them. ``sdpo`` (estimator sdpo,
:class:`~rlhf_fast.trainers.sdpo.SDPOTrainer`) is GRPO plus self-distillation towards the policy
reprompted with a successful sibling answer (``--sdpo.*``).
"""

from __future__ import annotations

import argparse
import importlib
import os

FAMILIES = {"ppo": ("gae", ("gae", "reinforce++", "reinforce++_baseline")), "grpo": ("grpo", ("grpo", "dr_grpo")), "rloo": ("rloo", ("rloo",)),
            "distill": ("distill", ("distill",)), "online-dpo": ("online_dpo", ("online_dpo",)),
            "a2po": ("a2po", ("a2po",)), "sdft": ("sdft", ("sdft",)), "sdpo": ("sdpo", ("sdpo",))}


# the rollout defaults a command runs with in place of RLConfig's (which it refuses) when neither
# the file nor the command line sets them: online DPO takes two answers per prompt; A*-PO one,
# and 8 prompts (rows) a step, the default mini-batch. --help states them.
COMMAND_DEFAULTS = {"online-dpo": {"rollout.group_size": 2},
                    "a2po": {"rollout.group_size": 1, "rollout.prompts_per_step": 8}}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """CONFIG.yaml then ``--key value`` overrides (any RLConfig key, dotted for sections).

    The overrides are open-ended, so every token after the command is kept in order as
    ``args.args`` (argparse's REMAINDER cannot start with an option such as ``--resume``)."""
    from rlhf_fast.trainers.config import config_keys_help
    from rlhf_fast.trainers.rl_config import RLConfig

    parser.usage = ("rlhf-fast {ppo,grpo,rloo,distill,online-dpo,a2po,sdpo,sdft} CONFIG.yaml [--key value ...] "
                    "[--resume RUN_DIR] "
                    "[--print-config]")
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    command = parser.prog.split()[-1]  # "rlhf-fast ppo": the estimator defaults to the family's
    defaults = None
    if command in FAMILIES:  # the estimator of the command's family, and the rollout defaults it sets
        defaults = {"estimator": FAMILIES[command][0], **COMMAND_DEFAULTS.get(command, {})}
    parser.epilog = config_keys_help(RLConfig, defaults)

    def parse_args(args=None, namespace=None):
        ns, extra = parser.parse_known_args(args, namespace)
        ns.args = extra
        return ns

    parser.parse_args = parse_args


def split_args(tokens):
    """``[CONFIG] --k v ...`` → (config path or None, override tokens, resume dir or None)."""
    tokens = list(tokens)
    config = None
    if tokens and not tokens[0].startswith("--"):
        config = tokens.pop(0)
    resume = None
    rest = []
    i = 0
    while i < len(tokens):
        t = tokens[i]
        if t == "--resume" or t.startswith("--resume="):
            value = t.split("=", 1)[1] if "=" in t else (tokens[i + 1] if i + 1 < len(tokens) else "")
            if not value or value.startswith("--"):
                raise ValueError("--resume needs the run folder to continue: --resume RUN_DIR")
            resume = value
            i += 1 if "=" in t else 2
            continue
        rest.append(t)
        i += 1
    return config, rest, resume


def build_config(command: str, tokens):
    """The resolved RLConfig of a command line (estimator fixed by the command's family)."""
    from rlhf_fast.trainers.config import load_config
    from rlhf_fast.trainers.rl_config import RLConfig

    if command not in FAMILIES:
        raise ValueError(f"command must be one of {tuple(FAMILIES)}, got {command!r}")
    config, overrides, resume = split_args(tokens)
    if resume is not None:
        if os.path.exists(resume) and not os.path.isdir(resume):
            raise ValueError(f"--resume {resume}: expected a run folder, found a file")
        if not os.path.isdir(resume):
            raise FileNotFoundError(f"--resume: run folder not found: {resume}")
        _check_rl_run(resume)
        if config is None:
            config = os.path.join(resume, "config.yaml")
        moved = _override_value(overrides, "output_dir")
        if moved is not None and os.path.abspath(moved) != os.path.abspath(resume):
            raise ValueError(f"--output_dir {moved} with --resume {resume}: a resumed run continues in its own "
                             f"folder; copy the folder first to continue a copy of it elsewhere")
        overrides = overrides + ["--resume", resume]
    if config is None:
        raise ValueError(f"usage: rlhf-fast {command} CONFIG.yaml [--key value ...] [--resume RUN_DIR]")
    # 'none' / '-': the defaults, as for rlhf-fast sft and reward
    path = None if config in ("none", "-") else config
    default, allowed = FAMILIES[command]
    # The estimator is settled before the config is built, as the checks that run then depend
    # on it (group estimators need rollout.group_size >= 2; gae does not).
    asked = _override_value(overrides, "estimator")
    estimator = asked if asked is not None else _file_estimator(path)
    if estimator is None:
        estimator = RLConfig.__dataclass_fields__["estimator"].default
    known = {e for _, family in FAMILIES.values() for e in family}
    if estimator in known and estimator not in allowed:  # (an unknown one: load_config names the choices)
        # a config file of another family is reused as the command's own; an estimator asked
        # for on the command line, or the run being resumed, is not silently replaced
        if asked is not None:
            raise ValueError(f"--estimator {asked} is not of the {command} family {allowed}; use "
                             f"rlhf-fast {_family_of(asked)}")
        if resume is not None and config == os.path.join(resume, "config.yaml"):
            raise ValueError(f"--resume {resume}: that run used estimator {estimator!r}; resume it with "
                             f"rlhf-fast {_family_of(estimator)}")
        overrides = overrides + ["--estimator", default]
    for key, value in COMMAND_DEFAULTS.get(command, {}).items():
        section, name = key.split(".")
        end, given = _whole_section(overrides, section)
        if end is not None:
            # a section given whole (--rollout '{...}') replaces the file's and the earlier keys: the
            # command's default follows it unless the mapping or a later --section.key sets the key
            if _override_value(overrides[end:], key) is None and name not in given:
                overrides = overrides[:end] + [f"--{key}", str(value)] + overrides[end:]
        elif _override_value(overrides, key) is None and _file_value(path, section, name) is None:
            overrides = [f"--{key}", str(value)] + overrides
    cfg = load_config(RLConfig, path, overrides)
    if resume is None and cfg.resume is not None:
        # a config file's resume: RUN, as --resume RUN: the run continues in RUN, so an output_dir
        # naming another folder (the file's or the command line's) would be ignored
        moved = _override_value(overrides, "output_dir")
        moved = _file_value(path, "output_dir") if moved is None else moved
        if moved is not None and os.path.abspath(str(moved)) != os.path.abspath(cfg.resume):
            raise ValueError(f"output_dir {moved} with resume {cfg.resume}: a resumed run continues in its own "
                             f"folder; copy the folder first to continue a copy of it elsewhere")
    from rlhf_fast.trainers.common import check_output_dir

    check_output_dir(cfg.output_dir)  # now, not once the models are built (RLConfig does not check it)
    return cfg


def _check_rl_run(resume: str) -> None:
    """ValueError naming ``--resume`` when the folder ``resume`` holds an offline run (sft,
    reward, dpo, kto: :func:`~rlhf_fast.trainers.config.saved_run_kind`), whose config.yaml
    would otherwise be read as an RLConfig and fail on a key that names neither."""
    from rlhf_fast.trainers.config import saved_run_kind

    kind = saved_run_kind(resume)
    if kind is not None and kind not in FAMILIES:
        raise ValueError(f"--resume {resume}: that folder holds a run of rlhf-fast {kind}, not an RL run; "
                         f"continue it with the rlhf-fast {kind} command that made it (resume: true)")


def _file_estimator(path):
    """The ``estimator`` a YAML config file names, or None (no file, no key, or a file that
    :func:`load_config` will report on)."""
    value = _file_value(path, "estimator")
    return value if isinstance(value, str) else None


def _file_value(path, *keys):
    """The value a YAML config file holds under the nested ``keys``, or None (no file, no such
    key, or a file that :func:`load_config` will report on)."""
    if path is None or not os.path.isfile(path):
        return None
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, ValueError, yaml.YAMLError):
        return None
    for k in keys:
        data = data.get(k) if isinstance(data, dict) else None
    return data


def _last_option(overrides, key: str):
    """(index after the last ``--key value`` / ``--key=value`` among the override tokens, its
    value), or (None, None). Dashes in a token's key read as underscores, as
    :func:`~rlhf_fast.trainers.config.load_config` reads them (``--output-dir``)."""
    end, found = None, None
    for i, t in enumerate(overrides):
        if not t.startswith("--"):
            continue
        name, eq, value = t[2:].partition("=")
        if name.replace("-", "_") != key:
            continue
        if eq:
            end, found = i + 1, value
        elif i + 1 < len(overrides):
            end, found = i + 2, overrides[i + 1]
    return end, found


def _override_value(overrides, key: str):
    """The value of ``--key value`` / ``--key=value`` among the override tokens (the last), or None
    (:func:`_last_option`)."""
    return _last_option(overrides, key)[1]


def _whole_section(overrides, section: str):
    """(index after the last ``--section VALUE`` / ``--section=VALUE`` among the override tokens,
    the keys its YAML mapping sets), or (None, ()) when the section is not given whole. A value
    that is no mapping sets no key (:func:`load_config` reports it)."""
    from rlhf_fast.trainers.config import yaml_value

    end, text = _last_option(overrides, section)
    if end is None:
        return None, ()
    import yaml

    try:
        given = yaml_value(text)
    except (yaml.YAMLError, ValueError):  # (no YAML, or a repeated key: load_config names it)
        given = None
    return end, (tuple(k.replace("-", "_") for k in given if isinstance(k, str)) if isinstance(given, dict) else ())


def _family_of(estimator: str) -> str:
    return next((cmd for cmd, (_, allowed) in FAMILIES.items() if estimator in allowed), "ppo|grpo|rloo")


# estimator -> (module, trainer class, the two metrics of the closing line as (label, key)); None: the rest
_TRAINERS = {
    "distill": ("rlhf_fast.trainers.distill", "DistillationTrainer", (("loss", "loss"), ("entropy", "entropy"))),
    "online_dpo": ("rlhf_fast.trainers.online_dpo", "OnlineDPOTrainer",
                   (("loss", "loss"), ("accuracy", "rewards/accuracies"))),
    "a2po": ("rlhf_fast.trainers.a2po", "A2POTrainer", (("loss", "loss"), ("reward", "reward"))),
    "sdft": ("rlhf_fast.trainers.sdft", "SDFTTrainer", (("loss", "loss"), ("entropy", "entropy"))),
    "sdpo": ("rlhf_fast.trainers.sdpo", "SDPOTrainer",
             (("reward", "reward/total"), ("distill", "self_distillation/distillation_loss"))),
    None: ("rlhf_fast.trainers.rl", "RLTrainer", (("reward", "reward/total"), ("kl", "kl/seq"))),
}


def run(args) -> int:
    """Train; prints the run folder and two of the last step's metrics (:data:`_TRAINERS`: reward
    and KL for the policy-gradient estimators)."""
    from rlhf_fast.trainers.config import config_yaml, take_print_config

    tokens, show = take_print_config(args.args)
    cfg = build_config(args.command, tokens)
    if show:  # the resolved config (what the run's config.yaml would hold); nothing loaded
        print(config_yaml(cfg), end="")
        return 0
    if cfg.resume is None:  # a file, a folder below a file, no permission: named before the models load
        from rlhf_fast.trainers.common import check_fresh_run_dir
        from rlhf_fast.trainers.config import check_output_path

        check_output_path(cfg.output_dir, "output_dir", folder=True)
        # a folder holding a run, too (RLTrainer.train refuses it again, for callers from Python)
        check_fresh_run_dir(cfg.output_dir, resume_hint=f"resume: {cfg.output_dir}, or --resume {cfg.output_dir}")
    from rlhf_fast.trainers.common import quiet_hf_progress

    quiet_hf_progress()
    module, cls, shown = _TRAINERS.get(cfg.estimator, _TRAINERS[None])
    trainer = getattr(importlib.import_module(module), cls)(cfg)
    hist = trainer.train()
    last = hist[-1] if hist else {}
    print(f"rlhf-fast {args.command}: {trainer.run_dir.path} step {trainer.global_step} "
          + " ".join(f"{label} {last.get(key, float('nan')):.4f}" for label, key in shown))
    return 0
