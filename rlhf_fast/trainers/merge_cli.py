"""``rlhf-fast merge POLICY_DIR TARGET_DIR OUT_DIR [--method ...]``: merge two save_pretrained
folders as TRL's ``MergeModelCallback`` does at a checkpoint (:mod:`rlhf_fast.models.merge`),
e.g. a finished run's ``final/`` with the model it started from. Options are TRL's
``MergeConfig`` attributes; left out, the method's TRL default. A list (a gradient over the
layers) is written with commas: ``--target-density 1.0,0.5``.
"""

from __future__ import annotations

import argparse
import re


def _setting(text: str):
    """A number, or comma-separated numbers (a layer gradient)."""
    try:
        items = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or comma-separated numbers, got {text!r}") from None
    return items if "," in text else items[0]


def _flag(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "1.0", "yes"):
        return True
    if low in ("false", "0", "0.0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from rlhf_fast.models.merge import DTYPES, METHODS

    parser.add_argument("policy_dir", help="the trained model's folder (save_pretrained, safetensors)")
    parser.add_argument("target_dir", help="the model to merge it with (e.g. the initial policy)")
    parser.add_argument("out_dir", help="where the merged model folder goes (with the policy's tokenizer)")
    parser.add_argument("--method", choices=METHODS, default="linear", help="TRL's MergeConfig method (linear)")
    parser.add_argument("--policy-weight", dest="policy_model_weight", type=_setting, metavar="W",
                        help="linear: the policy's weight (0.5); ties: unused (the policy is the base)")
    parser.add_argument("--target-weight", dest="target_model_weight", type=_setting, metavar="W",
                        help="linear / ties / dare_ties: the target's weight (0.5 linear, 1.0 ties)")
    parser.add_argument("--policy-density", dest="policy_model_density", type=_setting, metavar="D",
                        help="ties / dare_ties: the base's density (1.0,0.7,0.1; unused, as in mergekit)")
    parser.add_argument("--target-density", dest="target_model_density", type=_setting, metavar="D",
                        help="ties / dare_ties: the fraction of the target's task vector kept (1.0)")
    parser.add_argument("--normalize", type=_flag, metavar="BOOL",
                        help="linear / ties / dare_ties: divide by the weights (true)")
    parser.add_argument("--t", dest="t_values", type=_setting, metavar="T",
                        help="slerp: 0 the policy, 1 the target (0.5)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float16", help="the merge's dtype (float16)")
    parser.add_argument("--seed", type=int, default=0, help="dare_ties: the seed of the random drops (0)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")


# MergeConfig's keys, which its errors name (merge.KEY), as this command's options
OPTIONS = {"policy_model_weight": "--policy-weight", "target_model_weight": "--target-weight",
           "policy_model_density": "--policy-density", "target_model_density": "--target-density",
           "normalize": "--normalize", "t_values": "--t", "dtype": "--dtype", "seed": "--seed", "method": "--method"}


def _as_options(message: str) -> str:
    """A MergeConfig error ``message`` led by the options its ``merge.KEY`` names stand for
    (``--t: merge.t_values ...``: the key is also a trainer config's)."""
    flags = dict.fromkeys(OPTIONS[k] for k in re.findall(r"\bmerge\.(\w+)", message) if k in OPTIONS)
    message = message.replace("leave it null", "leave it out")
    return f"{', '.join(flags)}: {message}" if flags else message


def run(args) -> int:
    """Entry point of ``rlhf-fast merge``."""
    from rlhf_fast.models.merge import MergeConfig, merge_model_folders

    names = ("policy_model_weight", "target_model_weight", "policy_model_density", "target_model_density",
             "normalize", "t_values")
    try:
        config = MergeConfig(method=args.method, dtype=args.dtype, seed=args.seed,
                             **{n: getattr(args, n) for n in names})
    except ValueError as e:
        raise ValueError(_as_options(str(e))) from None
    info = merge_model_folders(args.policy_dir, args.target_dir, args.out_dir, config, overwrite=args.overwrite)
    print(f"merge: {info['method']} of {args.policy_dir} and {args.target_dir} -> {args.out_dir} "
          f"({info['tensors']} tensors, {info['parameters']} parameters, {info['dtype']})")
    return 0
