"""The trainers. Each lives in its own module (``rlhf_fast.trainers.sft``, ``.rl``, ...); the
names below are also reachable here, imported on first use so that importing one trainer's
module (or a config) does not import the others."""

_LAZY = {"DistillationTrainer": "distill", "distillation_loss": "distill"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_LAZY)
