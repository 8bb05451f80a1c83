"""Atomic, exactly-resumable training checkpoints.

Layout of one checkpoint folder ``<run_dir>/checkpoints/step_000123/``::

    models/<name>/            save_pretrained output (HF models) or model.safetensors (nn.Module;
                              a peft model: its trainable weights only, marked TRAINABLE_ONLY)
    optimizers/<name>.pt      optimizer state_dict
    schedulers/<name>.pt      LR scheduler state_dict
    rng.pt                    python, numpy, torch CPU (and CUDA) generator states
    extra.json                JSON-able trainer state: step, data position, KL controller, ...
    COMPLETE                  written last; a folder without it is ignored

Everything is first written to a hidden temporary folder in the same parent, fsynced,
then renamed with ``os.replace``, so a crash mid-save never leaves a checkpoint that
looks valid but is not.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import random
import re
import shutil
import tempfile
from typing import Any, Dict, Mapping, Optional

import torch

_STEP_RE = re.compile(r"^step_(\d+)$")
# rlhf_fast.distributed.save_sharded's temporary and replaced folders (of a checkpoint or of a
# companion beside it: reference_step_N, bema_step_N)
_SHARDED_LEFTOVER_RE = re.compile(r"^(?:[a-z]+_)?step_\d+\.(tmp|old)$")
# replace_folder's name for the folder it moves aside
_OLD_PREFIX = ".old-"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on directories
    finally:
        os.close(fd)


def replace_folder(tmp: str, path: str) -> None:
    """Put the finished folder ``tmp`` at ``path``. os.replace cannot replace a non-empty
    folder, so an existing one is moved aside first (to a sibling ``.old-<name>-*``) and deleted
    only once the new one is in place. An exception between the two renames (Ctrl-C, a full
    disk) puts the old one back; a kill there leaves it aside, where :func:`latest_checkpoint`
    and :func:`prune_checkpoints` move a checkpoint's back (:func:`recover_replaced`): the old
    folder or the new one stays at ``path``, never neither."""
    if not os.path.exists(path):
        os.replace(tmp, path)
        return
    parent, name = os.path.split(os.path.abspath(path))
    old = tempfile.mkdtemp(prefix=f"{_OLD_PREFIX}{name}-", dir=parent)
    os.rmdir(old)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        if not os.path.exists(path):
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _replaced_name(entry: str) -> Optional[str]:
    """The folder name that ``entry`` (``.old-<name>-<random>``, :func:`replace_folder`) was
    moved aside from; None for any other entry."""
    if not entry.startswith(_OLD_PREFIX) or "-" not in entry[len(_OLD_PREFIX):]:
        return None
    return entry[len(_OLD_PREFIX):].rsplit("-", 1)[0] or None


def recover_replaced(root: str) -> None:
    """Move back each complete folder that :func:`replace_folder` had moved aside inside
    ``root`` (a checkpoints folder) when nothing took its place: a process killed between its
    two renames would otherwise leave a checkpoint (or its companion) only under ``.old-*``,
    invisible to a resume and removed by the next prune."""
    if not os.path.isdir(root):
        return
    for entry in sorted(os.listdir(root)):
        name = _replaced_name(entry)
        if name is None or os.path.exists(os.path.join(root, name)):
            continue
        if os.path.isfile(os.path.join(root, entry, "COMPLETE")):
            try:
                os.replace(os.path.join(root, entry), os.path.join(root, name))
            except OSError:
                pass  # (another process moved it back first)


@contextlib.contextmanager
def staged_folder(path: str):
    """Context: a new, empty folder in which to write everything that belongs at ``path`` (a
    final model); when the block ends without an exception it replaces ``path``
    (:func:`replace_folder`, fsynced), otherwise it is removed, so a failed write (a full disk,
    a Ctrl-C) leaves ``path`` as it was instead of a torn model. The folder is ``path``'s name
    inside a hidden ``.tmp-<name>-*`` sibling; those a killed process left are removed first
    (one writer at a time: rank 0)."""
    parent, name = os.path.split(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    for entry in sorted(os.listdir(parent)):
        if _replaced_name(entry) == name and not os.path.exists(os.path.join(parent, name)):
            os.replace(os.path.join(parent, entry), os.path.join(parent, name))  # a kill between the renames
        elif entry.startswith(f".tmp-{name}-") or _replaced_name(entry) == name:
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    stage = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=parent)
    try:
        tmp = os.path.join(stage, name)  # (named as the target: what is written there carries its name)
        os.makedirs(tmp)
        yield tmp
        _fsync_tree(tmp)
        replace_folder(tmp, os.path.join(parent, name))
        _fsync_dir(parent)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(dirpath)


def rng_state() -> Dict[str, Any]:
    """The states of every random generator a training step may draw from."""
    import numpy as np

    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore generator states captured by :func:`rng_state`."""
    import numpy as np

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# In a peft model's folder: the weights hold its trainable parameters only (the adapters); the
# frozen base comes from the model the run is built from again on resume.
TRAINABLE_ONLY = "TRAINABLE_ONLY"


def _trainable_names(model: torch.nn.Module) -> set:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _save_model(model: torch.nn.Module, folder: str) -> None:
    from rlhf_fast.models.loading import _is_peft

    os.makedirs(folder, exist_ok=True)
    peft = _is_peft(model)
    if hasattr(model, "save_pretrained") and not peft:
        model.save_pretrained(folder, safe_serialization=True)
        return
    from safetensors.torch import save_file

    # (peft's save_pretrained renames the adapter keys, so its folder would not load back into
    # the model; the state dict's own keys do)
    keep = _trainable_names(model) if peft else None
    # safetensors refuses shared storage (tied weights); clone so each tensor owns its data
    sd = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items() if keep is None or k in keep}
    save_file(sd, os.path.join(folder, "model.safetensors"))
    if peft:
        with open(os.path.join(folder, TRAINABLE_ONLY), "w") as f:
            f.write("the frozen base weights are not in this checkpoint\n")


def _read_model_state(folder: str) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(path):
        return load_file(path)
    # save_pretrained may shard big models
    sd = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            sd.update(load_file(os.path.join(folder, name)))
    if not sd:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    return sd


def check_state_dtypes(model: torch.nn.Module, saved: Mapping[str, torch.dtype], where: str,
                       init_key: str = "model_init_kwargs") -> None:
    """ValueError when a floating-point tensor saved under a name of ``saved`` ({name: dtype} of a
    checkpoint's state dict) has another dtype than the same-named one of ``model``:
    ``load_state_dict`` would cast it silently, so a run trained in bf16 (``init_key``'s dtype,
    TRL's model_init_kwargs) and resumed without that key would continue from float32 copies of
    its weights (or the reverse, rounding them). ``where`` names the checkpoint part in the
    message. Names only one side has are left to the load's own check."""
    mine = model.state_dict(keep_vars=True)  # (no copies: the parameters and buffers themselves)
    for name, dtype in saved.items():
        ours = mine.get(name)
        if ours is None or not dtype.is_floating_point or dtype == ours.dtype:
            continue
        theirs = _dtype_name(dtype)
        raise ValueError(f"{where} holds {theirs} weights ({name!r}), but the model being resumed has "
                         f"{_dtype_name(ours.dtype)} ones: the run was saved with another {init_key} dtype; resume "
                         f"with the one it trained with ({init_key}: {{dtype: {theirs}}}), as the run's config.yaml "
                         "says, or start a new run")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtypes(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.dtype]:
    return {k: v.dtype for k, v in state.items()}


def _load_model(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], folder: str) -> None:
    missing, unexpected = model.load_state_dict(sd, strict=False)
    # tied weights are saved once by save_pretrained; anything else missing is an error
    tied = set()
    if hasattr(model, "_tied_weights_keys") and model._tied_weights_keys:
        tk = model._tied_weights_keys
        tied = set(tk.keys() if isinstance(tk, dict) else tk)
    missing = [k for k in missing if k not in tied]
    if os.path.isfile(os.path.join(folder, TRAINABLE_ONLY)):
        # the frozen base was not saved; every trainable weight must have been
        trainable = _trainable_names(model)
        missing = [k for k in missing if k in trainable]
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")


def _is_fsdp(model: torch.nn.Module) -> bool:
    from rlhf_fast.distributed import fsdp_units

    return bool(fsdp_units(model))


def save_checkpoint(
    directory: str,
    *,
    models: Optional[Mapping[str, torch.nn.Module]] = None,
    optimizers: Optional[Mapping[str, Any]] = None,
    schedulers: Optional[Mapping[str, Any]] = None,
    extra: Optional[Mapping[str, Any]] = None,
) -> str:
    """Atomically write a checkpoint to ``directory`` (replaced if it exists); returns it.

    ``models``: name -> nn.Module or PreTrainedModel (weights as safetensors);
    ``optimizers`` / ``schedulers``: name -> object with ``state_dict()``;
    ``extra``: JSON-able dict (step, data position, controller state, ...).
    RNG states are always saved.
    """
    models, optimizers, schedulers = dict(models or {}), dict(optimizers or {}), dict(schedulers or {})
    extra = dict(extra or {})
    for name in list(models) + list(optimizers) + list(schedulers):
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise ValueError(f"checkpoint entry names must be plain non-empty strings, got {name!r}")
    try:
        extra_text = json.dumps(extra, indent=2, sort_keys=True)
    except TypeError as e:
        raise TypeError(f"extra must be JSON-serialisable: {e}") from None
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
    try:
        for name, model in models.items():
            _save_model(model, os.path.join(tmp, "models", name))
        for kind, objs in (("optimizers", optimizers), ("schedulers", schedulers)):
            if objs:
                os.makedirs(os.path.join(tmp, kind))
            for name, obj in objs.items():
                torch.save(obj.state_dict(), os.path.join(tmp, kind, name + ".pt"))
        torch.save(rng_state(), os.path.join(tmp, "rng.pt"))
        with open(os.path.join(tmp, "extra.json"), "w", encoding="utf-8") as f:
            f.write(extra_text)
        with open(os.path.join(tmp, "COMPLETE"), "w") as f:
            f.write("ok\n")
        _fsync_tree(tmp)
        replace_folder(tmp, directory)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_checkpoint(
    directory: str,
    *,
    models: Optional[Mapping[str, torch.nn.Module]] = None,
    optimizers: Optional[Mapping[str, Any]] = None,
    schedulers: Optional[Mapping[str, Any]] = None,
    restore_rng: bool = True,
    map_location: Any = "cpu",
    init_key: str = "model_init_kwargs",
) -> Dict[str, Any]:
    """Restore models, optimizers, schedulers (in place) and RNG states; return ``extra``.

    Every name passed must exist in the checkpoint (ValueError otherwise), with the dtypes of
    the model's weights (:func:`check_state_dtypes`; ``init_key``: the config key that sets
    them, named in the ValueError). A model sharded
    with FSDP2 (``fully_shard``, under torchrun) takes the one-process checkpoint's full
    weights — and the optimizer over its parameters the full optimizer state — as its shard
    on each rank (:func:`rlhf_fast.distributed.load_full_state`; every rank must call this),
    so a run saved on one process continues on N ranks.
    """
    directory = os.path.abspath(directory)
    if not os.path.isfile(os.path.join(directory, "COMPLETE")):
        raise FileNotFoundError(f"not a complete checkpoint: {directory}")
    done = set()  # optimizers restored together with their FSDP2 model
    for name, model in (models or {}).items():
        folder = os.path.join(directory, "models", name)
        if not os.path.isdir(folder):
            raise ValueError(f"checkpoint {directory} has no model {name!r}")
        if _is_fsdp(model):
            ids = {id(p) for p in model.parameters()}
            mine = [(n, o) for n, o in (optimizers or {}).items()
                    if all(id(p) in ids for g in o.param_groups for p in g["params"])]
            for n, _ in mine:
                if not os.path.isfile(os.path.join(directory, "optimizers", n + ".pt")):
                    raise ValueError(f"checkpoint {directory} has no optimizer {n!r}")
            if len(mine) > 1:
                raise ValueError(f"more than one optimizer ({', '.join(n for n, _ in mine)}) over model {name!r}")
            with _restoring(directory, f"model {name!r}"):
                sd = _read_model_state(folder)
            check_state_dtypes(model, _dtypes(sd), f"checkpoint {directory}: model {name!r}", init_key)
            with _restoring(directory, f"model {name!r}" + (f" and optimizer {mine[0][0]!r}" if mine else "")):
                from rlhf_fast.distributed import load_full_state

                osd = (torch.load(os.path.join(directory, "optimizers", mine[0][0] + ".pt"), map_location="cpu",
                                  weights_only=False) if mine else None)
                load_full_state(model, mine[0][1] if mine else None, sd, osd)
            done.update(n for n, _ in mine)
            continue
        with _restoring(directory, f"model {name!r}"):
            sd = _read_model_state(folder)
        # (outside _restoring: its hint would blame a damaged file or another model)
        check_state_dtypes(model, _dtypes(sd), f"checkpoint {directory}: model {name!r}", init_key)
        with _restoring(directory, f"model {name!r}"):
            _load_model(model, sd, folder)
    for kind, objs in (("optimizers", optimizers or {}), ("schedulers", schedulers or {})):
        for name, obj in objs.items():
            if kind == "optimizers" and name in done:
                continue
            path = os.path.join(directory, kind, name + ".pt")
            if not os.path.isfile(path):
                raise ValueError(f"checkpoint {directory} has no {kind[:-1]} {name!r}")
            with _restoring(directory, f"{kind[:-1]} {name!r}"):
                obj.load_state_dict(torch.load(path, map_location=map_location, weights_only=False))
    if restore_rng:
        with _restoring(directory, "the RNG states"):
            set_rng_state(torch.load(os.path.join(directory, "rng.pt"), weights_only=False))
    with _restoring(directory, "extra.json"):
        with open(os.path.join(directory, "extra.json"), encoding="utf-8") as f:
            return json.load(f)


@contextlib.contextmanager
def _restoring(directory: str, what: str):
    """Any failure to read or apply part of a checkpoint (a size mismatch with the model being
    restored, a truncated or corrupt file) as one ValueError naming the checkpoint and part."""
    try:
        yield
    except Exception as e:
        text = str(e).strip()
        first = text.splitlines()[0] if text else ""
        raise ValueError(f"checkpoint {directory}: cannot restore {what} ({type(e).__name__}: {first}) — is it "
                         "from another model or configuration (resume with that one), or damaged (remove that "
                         "folder to resume from the previous checkpoint)?") from e


def checkpoint_step(directory: str, extra: Any, keys: tuple = ("step",)) -> int:
    """The step of the checkpoint ``directory`` whose ``extra.json`` held ``extra``, checked
    before a trainer applies it: a JSON object holding ``keys``, with ``step`` a whole number
    >= 0 that matches the folder's ``step_N`` name (when it has one). ValueError naming the
    file and what to do otherwise, instead of a bare KeyError or a silently wrong step."""
    where = f"checkpoint {directory}: extra.json"
    hint = "the checkpoint is damaged; remove that folder to resume from the previous checkpoint"
    if not isinstance(extra, dict):
        raise ValueError(f"{where} holds {type(extra).__name__}, not the trainer state object — {hint}")
    missing = [k for k in keys if k not in extra]
    if missing:
        raise ValueError(f"{where} lacks {', '.join(map(repr, missing))} — {hint}")
    step = extra["step"]
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"{where} has step {step!r}, not a whole number >= 0 — {hint}")
    m = _STEP_RE.match(os.path.basename(os.path.normpath(directory)))
    if m and int(m.group(1)) != step:
        raise ValueError(f"{where} says step {step} but the folder is named for step {int(m.group(1))} "
                         f"(renamed or copied?) — rename it to step_{step:08d} or remove it")
    return step


def restoring_extra(directory: str):
    """Context: a failure to apply the state in ``extra.json`` of ``directory`` (a value of the
    wrong type or shape) as one ValueError naming the checkpoint."""
    return _restoring(directory, "the trainer state in extra.json")


@contextlib.contextmanager
def keeping_hyperparameters(optimizers, schedulers):
    """Context for restoring optimizer / LR-scheduler state into objects built from the current
    config: an optimizer's ``load_state_dict`` also brings back the saved param-group settings
    (lr, weight decay, betas) and a scheduler its base LRs, so a resume with, say, a new ``lr``
    would silently keep the old one while config.yaml records the new. Afterwards the settings
    the objects were built with are put back and each LambdaLR's current LR recomputed from
    them at its restored step (with an unchanged config, the same values). A ReduceLROnPlateau
    or transformers' GreedyLR keeps its saved progress (best metric, counters, changed LR) under its
    new settings (:func:`_keep_plateau_settings`, :func:`_keep_greedy_settings`)."""
    fresh = [[{k: v for k, v in g.items() if k not in ("params", "lr")} for g in opt.param_groups]
             for opt in optimizers]
    plateaus = [(s, {k: getattr(s, k) for k in _PLATEAU_SETTINGS}, [g["lr"] for g in s.optimizer.param_groups])
                for s in schedulers if isinstance(s, torch.optim.lr_scheduler.ReduceLROnPlateau)]
    greedy = [(s, {k: copy.copy(getattr(s, k)) for k in _GREEDY_SETTINGS}) for s in schedulers if _is_greedy(s)]
    yield
    for opt, groups in zip(optimizers, fresh):
        if len(groups) == len(opt.param_groups):
            for g, f in zip(opt.param_groups, groups):
                g.update(f)
    for sched in schedulers:
        groups = sched.optimizer.param_groups
        if not all("initial_lr" in g for g in groups):
            continue
        sched.base_lrs = [g["initial_lr"] for g in groups]
        lambdas = getattr(sched, "lr_lambdas", None)
        if lambdas is not None and len(lambdas) == len(groups):
            for g, base, fn in zip(groups, sched.base_lrs, lambdas):
                g["lr"] = base * fn(sched.last_epoch)
            sched._last_lr = [g["lr"] for g in groups]
    for sched, settings, base_lrs in plateaus:
        _keep_plateau_settings(sched, settings, base_lrs)
    for sched, settings in greedy:
        _keep_greedy_settings(sched, settings)


# ReduceLROnPlateau's settings (lr_scheduler_kwargs), which its state_dict also holds
_PLATEAU_SETTINGS = ("factor", "default_min_lr", "min_lrs", "patience", "cooldown", "eps", "mode", "threshold",
                     "threshold_mode")


def _keep_plateau_settings(sched, settings: Dict[str, Any], base_lrs) -> None:
    """After a ReduceLROnPlateau's ``load_state_dict``: put back the ``settings`` it was built
    with, and, when the LR it was built at (``base_lrs``) differs from the saved one
    (``sched.base_lrs``, set by ``make_scheduler``), scale the restored LR by new / saved, so the
    reductions made so far apply to the new ``lr`` (floored at ``min_lr``)."""
    old_mode = sched.mode
    for k, v in settings.items():
        setattr(sched, k, v)
    sched._init_is_better(mode=sched.mode, threshold=sched.threshold, threshold_mode=sched.threshold_mode)
    if sched.mode != old_mode:  # the best so far was judged the other way round
        sched.best, sched.num_bad_epochs = sched.mode_worse, 0
    saved = getattr(sched, "base_lrs", None)
    groups = sched.optimizer.param_groups
    if saved is not None and len(saved) == len(groups) and list(saved) != list(base_lrs):
        for g, old, new, floor in zip(groups, saved, base_lrs, sched.min_lrs):
            g["lr"] = max(floor, g["lr"] * new / old)
        sched._last_lr = [g["lr"] for g in groups]
    sched.base_lrs = list(base_lrs)


def _is_greedy(sched) -> bool:
    if type(sched).__name__ != "GreedyLR":  # (transformers not imported for the other schedules)
        return False
    from transformers.optimization import GreedyLR

    return isinstance(sched, GreedyLR)


# GreedyLR's settings (lr_scheduler_kwargs) and the LRs it was built at (_init_lrs: where its reset
# returns), which its state_dict and load_state_dict also carry
_GREEDY_SETTINGS = ("factor", "min_lrs", "max_lrs", "patience", "verbose", "cooldown", "warmup", "mode", "threshold",
                    "threshold_mode", "eps", "smooth", "window_size", "reset_start_original", "_init_lrs")


def _keep_greedy_settings(sched, settings: Dict[str, Any]) -> None:
    """After a GreedyLR's ``load_state_dict`` (which brings back the saved settings and sets the
    LR to the saved one): put back the ``settings`` it was built with; when the LR it was built
    at differs from the saved one, scale the restored LR by new / saved (within min_lr and
    max_lr), so the changes made so far apply to the new ``lr``; a new mode restarts the best
    metric, a new smoothing window keeps the latest values that fit."""
    from transformers.optimization import StreamingAverage

    old_mode, saved_init = sched.mode, list(sched._init_lrs)
    for k, v in settings.items():
        setattr(sched, k, v)
    if sched.mode != old_mode:  # the best so far was judged the other way round
        sched.best = float("inf") if sched.mode == "min" else float("-inf")
        sched.num_bad_epochs = sched.num_good_epochs = 0
    sched.reset_start = min(sched.reset_start, sched.reset_start_original)
    avg = sched._streaming_avg
    if not sched.smooth:
        sched._streaming_avg = None
    elif avg is None:
        sched._streaming_avg = StreamingAverage(sched.window_size)
    elif avg.window_size != sched.window_size:
        avg.window_size, avg.values = sched.window_size, avg.values[-sched.window_size:]
        avg.sum = sum(avg.values)
    groups = sched.optimizer.param_groups
    if len(saved_init) == len(groups) and saved_init != list(sched._init_lrs):
        for g, old, new, lo, hi in zip(groups, saved_init, sched._init_lrs, sched.min_lrs, sched.max_lrs):
            g["lr"] = min(hi, max(lo, g["lr"] * new / old))
        sched._last_lr = [g["lr"] for g in groups]


def checkpoint_dir(run_dir: str, step: int) -> str:
    """The folder of the checkpoint at ``step`` inside ``run_dir``."""
    return os.path.join(run_dir, "checkpoints", f"step_{int(step):08d}")


def latest_checkpoint(run_dir: str, recover: bool = True) -> Optional[str]:
    """The complete checkpoint with the highest step under ``run_dir/checkpoints`` (or None),
    after moving back one a killed :func:`replace_folder` left aside (:func:`recover_replaced`);
    ``recover`` False for a reader beside a live run (``rlhf-fast report``), which must never
    move a folder the run is replacing."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return None
    if recover:
        recover_replaced(root)
    best, best_step = None, -1
    for name in os.listdir(root):
        m = _STEP_RE.match(name)
        path = os.path.join(root, name)
        if m and os.path.isfile(os.path.join(path, "COMPLETE")) and int(m.group(1)) > best_step:
            best, best_step = path, int(m.group(1))
    return best


def prune_companions(run_dir: str, prefix: str) -> None:
    """Remove the folders ``checkpoints/<prefix>step_N`` whose checkpoint ``step_N`` is gone
    (pruned, or never completed): the state some trainers keep beside each checkpoint (TR-DPO's
    moving reference ``reference_``, BEMA's buffers ``bema_``)."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return
    names = set(os.listdir(root))
    for n in names:
        if n.startswith(prefix + "step_") and n[len(prefix):] not in names:
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)


def prune_checkpoints(run_dir: str, keep: int, best_step: Optional[int] = None) -> None:
    """Delete all but the ``keep`` most recent complete checkpoints (keep <= 0 keeps all), and
    never the complete one of ``best_step`` (load_best_model_at_end's best): it is kept beside
    the ``max(keep - 1, 1)`` most recent, as transformers' ``rotate_checkpoints`` keeps its
    ``best_model_checkpoint`` (so ``keep`` 1 may keep 2). First, whatever ``keep``, a folder a killed
    :func:`replace_folder` left aside is moved back (:func:`recover_replaced`) and the temporary
    folders of interrupted saves are removed."""
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return
    recover_replaced(root)
    for n in os.listdir(root):
        # what an interrupted save_checkpoint / save_sharded of a checkpoint or a companion left
        # (a whole model copy each; a complete checkpoint is never named so): no save is under
        # way while the run prunes, right after its own save finished
        if n.startswith((".tmp-", _OLD_PREFIX)) or _SHARDED_LEFTOVER_RE.match(n):
            shutil.rmtree(os.path.join(root, n), ignore_errors=True)
    if keep <= 0:
        return
    steps = sorted((int(m.group(1)), n) for n in os.listdir(root) if (m := _STEP_RE.match(n)))
    # only complete checkpoints count: an incomplete or stray step_* folder with a higher step
    # (an interrupted sharded save, a damaged copy) must not push the good ones out
    complete = [s for s, n in steps if os.path.isfile(os.path.join(root, n, "COMPLETE"))]
    if len(complete) <= keep:
        return
    best = best_step if best_step in complete[:-1] else None  # (the newest is kept anyway)
    oldest_kept = [s for s in complete if s != best][-max(keep - (best is not None), 1)]
    for step, name in steps:
        if step < oldest_kept and step != best:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)


__all__ = ["save_checkpoint", "load_checkpoint", "check_state_dtypes", "latest_checkpoint", "checkpoint_dir",
           "prune_checkpoints", "replace_folder", "recover_replaced", "staged_folder", "checkpoint_step",
           "restoring_extra", "keeping_hyperparameters", "rng_state", "set_rng_state"]
