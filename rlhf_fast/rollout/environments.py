"""Environments in rollouts: TRL GRPOTrainer's ``environment_factory``.

An environment is an object with a ``reset(**record)`` method and public methods the policy
calls as tools (each described, like a tool function, by its name, type hints and docstring).
Each answer gets its own instance: the ``group_size`` answers of a prompt each act on their
own state. Before generation every instance is reset with its prompt's record (the prompt
under ``"prompt"`` and the record's other fields); a string it returns is appended to the last
user message of a chat prompt (to the text of a text prompt), as TRL does. The reward
functions then receive the instances, aligned with the completions, as ``environments=``; an
environment with a ``get_reward()`` method is also a reward source of its own
(:class:`EnvironmentReward`, weight 1, named after its class).

Several environments: a mapping ``{name: factory}``; each prompt record names its
environment in its ``environment`` field (not passed to ``reset``), and only that
environment's methods are tools in its prompt.

Instances are created afresh for every generation call from the prompt records (TRL instead
keeps a pool of instances, constructed once and reset for each use): a rollout depends on the
records and the seeds alone, so an environment has no state to checkpoint, and a resumed run
acts on the same states as an uninterrupted one.

Read top to bottom: the factories (from callables or ``module:Class`` paths) → an instance's
tools → resetting instances for the answers of some prompts → the ``get_reward`` source.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from rlhf_fast.algorithms.rewards import RewardError, RewardSource, _reward_value

Factory = Callable[[], Any]
# reset(**record) and get_reward() are the environment's protocol, never tools (TRL's exclusions)
PROTOCOL = ("reset", "get_reward")


def normalize_factories(factory: Union[Factory, Mapping[str, Factory], None],
                        key: str = "environment_factory") -> Dict[Optional[str], Factory]:
    """``{name: factory}`` of a factory (one environment for every prompt: name None) or a
    mapping of names to factories (each prompt names its own); ``{}`` for None. A factory that
    is not callable is a TypeError naming ``key`` (``key.NAME`` in a mapping)."""
    if factory is None:
        return {}
    if isinstance(factory, Mapping):
        if not factory:
            raise ValueError(f"{key} must map at least one environment name to a factory, got {{}}")
        out: Dict[Optional[str], Factory] = {}
        for name, f in factory.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"{key}: environment names must be non-empty strings, got {name!r}")
            if not callable(f):
                raise TypeError(f"{key}.{name} must be a callable returning an environment (a class), "
                                f"got {type(f).__name__}")
            out[name] = f
        return out
    if not callable(factory):
        raise TypeError(f"{key} must be a callable returning an environment (a class) or a mapping "
                        f"{{name: callable}}, got {type(factory).__name__}")
    return {None: factory}


def load_factories(spec: Union[str, Mapping[str, str], None],
                   key: str = "rollout.environment_factory") -> Dict[Optional[str], Factory]:
    """The factories of ``module:Class`` (or ``file.py:Class``) import paths: one path, or a
    mapping ``{name: path}``; a path that does not import is a ValueError naming the key."""
    from rlhf_fast.algorithms import load_callable

    def load(s, k):
        try:
            return load_callable(s, what="environment")
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"{k}: expected 'module:Class' or 'file.py:Class' naming an environment class, "
                             f"got {s!r} ({e})") from None

    if spec is None:
        return {}
    if isinstance(spec, str):
        return {None: load(spec, key)}
    return {name: load(s, f"{key}.{name}") for name, s in spec.items()}


def environment_tools(env: Any) -> List[Callable]:
    """The tools of an environment instance: the public functions of its class (not
    ``reset`` / ``get_reward``, not ``_private``), bound to it, in name order — TRL's
    ``inspect.getmembers(type(env), predicate=inspect.isfunction)`` (listed on the class so
    that properties are not evaluated)."""
    return [getattr(env, name) for name, _ in inspect.getmembers(type(env), predicate=inspect.isfunction)
            if name not in PROTOCOL and not name.startswith("_")]


def probe(factories: Dict[Optional[str], Factory], key: str = "environment_factory") -> Dict[Optional[str], Any]:
    """One instance of each environment, checked to have a callable ``reset`` (a ValueError
    naming ``key``, or ``key.NAME``, otherwise): its bound methods describe the tools in the
    prompts."""
    out = {}
    for name, factory in factories.items():
        env = factory()
        if not callable(getattr(env, "reset", None)):
            where = key if name is None else f"{key}.{name}"
            raise ValueError(f"{where}: each environment must define a callable reset(**record) method "
                             f"({type(env).__name__} has none)")
        out[name] = env
    return out


def environment_name(fields: Mapping[str, Any], names: Sequence[Optional[str]], where: str) -> Optional[str]:
    """The environment a prompt record uses: None with a single environment, else its
    ``environment`` field, which must be one of ``names`` (a ValueError naming ``where``)."""
    if list(names) == [None]:
        return None
    name = fields.get("environment")
    if name not in names:
        raise ValueError(f"{where}: with several environments each prompt record needs an 'environment' field, "
                         f"one of {sorted(n for n in names if n is not None)}; got {name!r}")
    return name


def reset_kwargs(prompt: Any, fields: Mapping[str, Any], multi: bool) -> Dict[str, Any]:
    """The keyword arguments of ``reset``: the record — the prompt under ``"prompt"`` and its
    other fields, copied so no environment can change the run's records — without the
    ``environment`` field when it selects the environment (TRL's)."""
    rec = {"prompt": prompt, **fields}
    if multi:
        rec.pop("environment", None)
    return copy.deepcopy(rec)


def with_observation(prompt: Any, observation: Optional[str]) -> Any:
    """``prompt`` with what ``reset`` returned appended: to the content of a chat's last
    message (a new message, the record untouched; a text block appended to a content-block
    list), to a text prompt's end; unchanged for None. TRL's ``_generate_and_score_completions``."""
    if observation is None:
        return prompt
    if not isinstance(observation, str):
        raise TypeError(f"an environment's reset() must return a string or None, got {type(observation).__name__}")
    if isinstance(prompt, str):
        return prompt + observation
    last = prompt[-1]
    content = last["content"]
    if isinstance(content, list):  # content blocks: the observation as one more text block, as TRL's
        return list(prompt[:-1]) + [{**last, "content": content + [{"type": "text", "text": observation}]}]
    return list(prompt[:-1]) + [{**last, "content": content + observation}]


def start(factories: Dict[Optional[str], Factory], records: Sequence[Tuple[Any, Mapping[str, Any]]],
          names: Sequence[Optional[str]], n: int) -> Tuple[List[Any], List[Optional[str]]]:
    """Fresh instances for ``n`` answers to each of ``records`` (``(prompt, fields)``, whose
    environments are ``names``), each reset with its record, in row order (prompt-major, as
    the rollout's rows). Returns ``(instances, observations)``, B = len(records)·n each; a
    ``reset`` that raises, or returns neither a string nor None, is an error naming the
    environment and the prompt (:func:`_reset`)."""
    multi = list(factories) != [None]
    envs, obs = [], []
    for (prompt, fields), name in zip(records, names):
        for _ in range(n):
            env = factories[name]()
            envs.append(env)
            obs.append(_reset(env, name, prompt, reset_kwargs(prompt, fields, multi)))
    return envs, obs


def _reset(env: Any, name: Optional[str], prompt: Any, record: Dict[str, Any]) -> Optional[str]:
    """``env.reset(**record)``: a string or None. What it raises is a RuntimeError (the
    environment's exception as its cause), a value of another type a TypeError, both naming
    the environment and the prompt: with many prompts and environments the bare exception of
    the user's code would not say which one failed."""
    where = type(env).__name__ if name is None else f"{name!r} ({type(env).__name__})"
    text = repr(prompt)
    text = text if len(text) <= 200 else text[:200] + "..."
    try:
        out = env.reset(**record)
    except Exception as e:  # noqa: BLE001 - re-raised with the environment and the prompt named
        raise RuntimeError(f"environment {where}: {type(env).__name__}.reset(**record) raised "
                           f"{type(e).__name__}: {e} (prompt {text})") from e
    if out is not None and not isinstance(out, str):
        raise TypeError(f"environment {where}: {type(env).__name__}.reset() must return a string or None, "
                        f"got {type(out).__name__} (prompt {text})")
    return out


class EnvironmentReward(RewardSource):
    """The reward of environments of class ``cls`` that own it: ``env.get_reward()`` (sync or
    async) of each answer's instance, read from the ``environments`` field, after its rollout.
    Answers of another environment class score NaN under ``calling_convention="trl"`` (TRL's
    None: left out of the weighted nansum and of ``reward/NAME``; an answer no source scores is
    unscored), 0 under ours (where NaN would be a bad reward). A ``get_reward()`` of
    None is NaN: "does not apply" under ``calling_convention="trl"`` (TRL's), else handled by
    ``on_bad_reward`` as a reward function's None."""

    def __init__(self, cls: type):
        self.cls, self.name = cls, cls.__name__

    def __call__(self, prompts, completions, ctx):
        from rlhf_fast.rollout.tools import _run_coroutines

        envs = ((ctx.fields if ctx is not None else None) or {}).get("environments")
        if envs is None or len(envs) != len(completions):
            raise RewardError(f"reward source {self.name!r} reads each answer's environment (get_reward); "
                              f"this batch has none")
        # another class's answers: TRL's None ("does not apply": NaN) under its calling convention
        # (the context then holds TRL's inputs), so an answer no source scores is unscored as in
        # TRL; 0 under ours, where NaN would be a bad reward
        other = None if ctx.trl is not None else 0.0
        out: List[Any] = [e.get_reward() if type(e) is self.cls else other for e in envs]
        pending = [i for i, v in enumerate(out) if inspect.isawaitable(v)]
        for i, v in zip(pending, _run_coroutines([out[i] for i in pending]) if pending else []):
            if isinstance(v, BaseException):
                raise v
            out[i] = v
        # None: "does not apply" (NaN), as TRL's get_reward source; under our convention NaN
        # follows reward.on_bad_reward like a reward function's None
        return [float("nan") if v is None else _reward_value(v) for v in out]


def reward_sources(probes: Mapping[Optional[str], Any]) -> List[EnvironmentReward]:
    """One :class:`EnvironmentReward` per environment class that defines ``get_reward`` (once
    per class, however many names map to it), in the order of ``probes``."""
    out, seen = [], []
    for env in probes.values():
        cls = type(env)
        if callable(getattr(cls, "get_reward", None)) and cls not in seen:
            seen.append(cls)
            out.append(EnvironmentReward(cls))
    return out


__all__ = ["EnvironmentReward", "environment_name", "environment_tools", "load_factories", "normalize_factories",
           "probe", "reset_kwargs", "reward_sources", "start", "with_observation"]
