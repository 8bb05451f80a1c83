"""Dataclass configs filled from YAML and ``--key value`` command-line overrides.

A config is a dataclass whose fields may themselves be dataclasses. Values from YAML
and from the command line are converted to each field's annotated type (bool, int,
float, str, Optional[...], Literal[...], tuple/list of those, dict), so a typo in a key
or a value of the wrong type fails early with a ValueError that names the dotted key
and the type that was expected. Validation of ranges stays in each dataclass's
``__post_init__``, which runs again once every value is set; :func:`typed_config` gives a
config built from Python (no conversion) the type check of its values.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import types
import typing
from collections.abc import Mapping
from typing import Any, Dict, List, Optional, Sequence, Tuple, Type, TypeVar, Union

T = TypeVar("T")

_TRUE = {"true", "yes", "1", "on", "y"}
_FALSE = {"false", "no", "0", "off", "n"}


def _type_name(tp) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp) -> Tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, (args[0] if len(args) == 1 else Union[tuple(args)])
    return False, tp


def _convert(value: Any, tp, key: str, from_string: bool) -> Any:
    """Convert ``value`` to the annotated type ``tp``; ``from_string`` for CLI text."""
    if isinstance(value, _BareFlag) and tp is not Any and _is_optional(tp)[1] is not bool:
        # "expected int, got 'true'" would puzzle: the value was left out
        raise ValueError(f"--{key} needs a value ({_type_name(tp)}); only a true/false key may be given bare")
    err = ValueError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    optional, inner = _is_optional(tp)
    if optional:
        if value is None or (from_string and isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
            return None
        return _convert(value, inner, key, from_string)
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        args = typing.get_args(tp)
        if from_string and isinstance(value, str) and value.strip()[:1] == "[" and value.strip()[-1:] == "]":
            # a YAML sequence goes to the union's list member first (loss_type: a name or a list)
            args = sorted(args, key=lambda a: typing.get_origin(a) not in (list, tuple))
        for arg in args:
            try:
                return _convert(value, arg, key, from_string)
            except ValueError:
                continue
        raise err
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        for c in choices:
            try:
                if _convert(value, type(c), key, from_string) == c:
                    return c
            except ValueError:
                continue
        raise ValueError(f"config key {key!r}: expected one of {list(choices)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if from_string and isinstance(value, str):  # a section given whole on the command line: --bema {}
            import yaml

            try:
                parsed = yaml.load(value, Loader=unique_key_loader())
            except DuplicateKeyError as e:
                raise ValueError(f"config key {key!r}: {e}") from None
            except yaml.YAMLError:
                parsed = None
            value = parsed if isinstance(parsed, dict) else value
        if not isinstance(value, dict):
            raise ValueError(f"config key {key!r}: expected a mapping for {tp.__name__}, got {value!r}")
        return _build(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE:
            return True
        if isinstance(value, str) and value.strip().lower() in _FALSE:
            return False
        raise err
    if tp is int:
        if isinstance(value, bool):
            raise err
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                try:
                    f = float(value)
                except ValueError:
                    raise err from None
                if f.is_integer():
                    return int(f)
        raise err
    if tp is float:
        if isinstance(value, bool):
            raise err
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise err from None
        raise err
    if tp is str:
        if isinstance(value, str):
            return value
        # YAML turns `name: 123` into an int; a str field takes it as text
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise err
    if origin in (list, tuple, List, Tuple, Sequence) or tp in (list, tuple):
        args = typing.get_args(tp)
        if isinstance(value, str) and value.strip().startswith("[") and value.strip().endswith("]"):
            # a YAML sequence, as a mapping may be given as YAML text: --data.prompts '[a, b]'
            import yaml

            try:
                parsed = yaml_value(value)
            except (yaml.YAMLError, ValueError):
                parsed = None
            value = parsed if isinstance(parsed, list) else value
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")] if value.strip() else []
        if not isinstance(value, (list, tuple)):
            raise err
        if origin is tuple or tp is tuple:
            if len(args) == 2 and args[1] is Ellipsis:
                return tuple(_convert(v, args[0], f"{key}[{i}]", True) for i, v in enumerate(value))
            if args:
                if len(args) != len(value):
                    raise ValueError(f"config key {key!r}: expected {len(args)} items ({_type_name(tp)}), got {value!r}")
                return tuple(_convert(v, a, f"{key}[{i}]", True) for i, (v, a) in enumerate(zip(value, args)))
            return tuple(value)
        elem = args[0] if args else Any
        return [_convert(v, elem, f"{key}[{i}]", True) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if from_string and isinstance(value, str):
            # a whole mapping on the command line: --annotator_weights '{alice: 2, bob: 0.5}'
            import yaml

            try:
                parsed = yaml.load(value, Loader=unique_key_loader()) if value.strip() else {}
            except DuplicateKeyError as e:
                raise ValueError(f"config key {key!r}: {e}") from None
            except yaml.YAMLError:
                parsed = None
            if not isinstance(parsed, dict):
                raise ValueError(f"config key {key!r}: expected a mapping ({_type_name(tp)}) such as "
                                 f"'{{name: value}}', or one entry with --{key}.NAME value; got {value!r}")
            value = parsed
        if not isinstance(value, dict):
            raise err
        args = typing.get_args(tp)
        if args:
            return {_convert(k, args[0], key, True): _convert(v, args[1], f"{key}.{k}", True)
                    for k, v in value.items()}
        return dict(value)
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise err


def _hints(cls) -> Dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown_key(cls, prefix: str, key: str, names) -> ValueError:
    """The error for ``key``, no field of ``cls`` (the section ``prefix``): the close spellings
    among ``names``, else the keys of ``cls``'s sections that end in ``key`` (``lr`` →
    ``optim.lr``), then every valid key."""
    import difflib

    close = ([prefix + n for n in difflib.get_close_matches(key, sorted(names), n=3, cutoff=0.75)]
             if isinstance(key, str) else [])
    if not close and isinstance(key, str):
        close = [prefix + k for k, _, _ in config_keys(cls) if k.rsplit(".", 1)[-1] == key][:3]
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ValueError(f"unknown config key {prefix + str(key)!r}{hint} "
                      f"(valid keys: {', '.join(sorted(names))})")


def _build(cls: Type[T], data: Dict[str, Any], prefix: str = "") -> T:
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise _unknown_key(cls, prefix, k, names)
        kwargs[k] = _convert(v, hints[k], prefix + k, from_string=False)
    return cls(**kwargs)


def _set_path(data: Dict[str, Any], cls, dotted: str, raw: str) -> None:
    """Set ``data[a][b] = raw`` for ``--a.b raw``, checking the key against ``cls``."""
    raw_parts = dotted.split(".")
    # --key-name spells a config key; the NAME of --mapping.NAME is data (an annotator 'gpt-4o')
    parts = [p.replace("-", "_") for p in raw_parts]
    cur_cls, cur = cls, data
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cur_cls) if f.init}
        key = ".".join(parts[: i + 1])
        if part not in names:
            raise _unknown_key(cur_cls, ".".join(parts[:i]) + "." if i else "", part, names)
        tp = _hints(cur_cls)[part]
        _, inner = _is_optional(tp)
        if i == len(parts) - 1:
            cur[part] = _convert(raw, tp, key, from_string=True)
            return
        if typing.get_origin(inner) is dict or inner is dict:
            if i != len(parts) - 2:
                raise ValueError(f"config key {key!r} is a mapping; set one entry with --{key}.NAME value")
            args = typing.get_args(inner)
            sub = dict(cur.get(part) or {})
            # a mapping of keyword arguments (lora, optim_args: values Any) reads dashes as any
            # key; one of data (annotator_weights: annotator id -> weight) keeps the name as given
            name = parts[-1] if not args or args[1] is Any else raw_parts[-1]
            sub[name] = _convert(raw, args[1] if args else Any, f"{key}.{name}", from_string=True)
            cur[part] = sub
            return
        if not dataclasses.is_dataclass(inner):
            raise ValueError(f"config key {key!r} is {_type_name(tp)}, not a section; cannot set {dotted!r}")
        sub = cur.get(part)
        if sub is None:
            sub = {}
        elif dataclasses.is_dataclass(sub):
            sub = to_dict(sub)
        elif not isinstance(sub, dict):
            raise ValueError(f"config key {key!r}: expected a mapping for {_type_name(inner)}, got {sub!r}")
        else:
            sub = dict(sub)
        cur[part] = sub
        cur_cls, cur = inner, sub


class _BareFlag(str):
    """The "true" of a ``--flag`` given without a value (an error for a key that is not a bool)."""


def parse_overrides(overrides: Sequence[str]) -> List[Tuple[str, str]]:
    """``["--a.b", "1", "--c=x", "--flag"]`` -> ``[("a.b", "1"), ("c", "x"), ("flag", "true")]``
    (dashes in the keys read as underscores)."""
    return [(k.replace("-", "_"), v) for k, v in _split_overrides(overrides)]


def _split_overrides(overrides: Sequence[str]) -> List[Tuple[str, str]]:
    """:func:`parse_overrides` with the keys as given (``--annotator_weights.gpt-4o``)."""
    out: List[Tuple[str, str]] = []
    items = list(overrides)
    i = 0
    while i < len(items):
        tok = items[i]
        if not isinstance(tok, str) or not tok.startswith("--") or len(tok) == 2:
            raise ValueError(f"overrides: expected '--key value' pairs, got {tok!r}")
        body = tok[2:]
        if "=" in body:
            k, v = body.split("=", 1)
            i += 1
        elif i + 1 < len(items) and not (items[i + 1].startswith("--") and len(items[i + 1]) > 2
                                         and not _looks_numeric(items[i + 1])):
            k, v = body, items[i + 1]
            i += 2
        else:
            k, v = body, _BareFlag("true")  # a bare --flag sets a bool
            i += 1
        out.append((k, v))
    return out


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


class DuplicateKeyError(ValueError):
    """A YAML mapping that holds one key twice (``key``, at the 1-based ``lines``)."""

    def __init__(self, key: Any, lines: Tuple[int, int]):
        super().__init__(f"key {key!r} is given twice (lines {lines[0]} and {lines[1]}); keep one")
        self.key, self.lines = key, lines


_UNIQUE_KEY_LOADER = None


def unique_key_loader():
    """A ``yaml.SafeLoader`` subclass that refuses a mapping holding a key twice
    (:class:`DuplicateKeyError`), where ``yaml.safe_load`` keeps the last value without a word.
    A key given beside a merge (``<<: *base``) still overrides the merged one, as in YAML."""
    global _UNIQUE_KEY_LOADER
    if _UNIQUE_KEY_LOADER is None:
        import yaml

        class UniqueKeyLoader(yaml.SafeLoader):
            def __init__(self, stream):
                super().__init__(stream)
                self._checked = set()  # ids of the mapping nodes whose own keys were checked

            def flatten_mapping(self, node):
                # each node's own keys once, before SafeLoader flattens merges into node.value
                # (flattening a merge flattens the merged node too, in place: checked later, its
                # merged keys would look repeated)
                if id(node) not in self._checked:
                    self._checked.add(id(node))
                    seen: Dict[Any, int] = {}
                    for key_node, _ in node.value:
                        if key_node.tag == "tag:yaml.org,2002:merge":
                            continue
                        key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                        try:
                            if key in seen:
                                raise DuplicateKeyError(key, (seen[key], line))
                            seen[key] = line
                        except TypeError:  # an unhashable key: SafeLoader's own error follows
                            pass
                super().flatten_mapping(node)

        # YAML 1.2 (and a reader's eye) takes 5e-2 and 1.0e5 for numbers; PyYAML's YAML 1.1 leaves
        # them text, which a free-form mapping (lora, rollout.generation_kwargs) would pass on
        import re

        UniqueKeyLoader.add_implicit_resolver(
            "tag:yaml.org,2002:float",
            re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
            list("-+0123456789."))
        # YAML 1.1 reads 010 as octal 8 and 10:30 as base-60 630, where the command line reads
        # 10 and '10:30': such a numeral stays text here, which an int key reads as the command
        # line does (_convert: int("010") is 10) and a str key keeps. (Every numeral still read
        # as an int is one YAML 1.1 reads so too: config.yaml's safe_dump quotes the text ones.)
        int_tag = "tag:yaml.org,2002:int"
        for first, resolvers in UniqueKeyLoader.yaml_implicit_resolvers.items():  # (the class's own copy)
            UniqueKeyLoader.yaml_implicit_resolvers[first] = [r for r in resolvers if r[0] != int_tag]
        UniqueKeyLoader.add_implicit_resolver(
            int_tag, re.compile(r"^[-+]?(?:0|[1-9][0-9_]*|0x[0-9a-fA-F_]+|0b[01_]+)$"), list("-+0123456789"))
        _UNIQUE_KEY_LOADER = UniqueKeyLoader
    return _UNIQUE_KEY_LOADER


def yaml_value(text: str) -> Any:
    """``text`` (a command-line value, ``--lora.lora_dropout 5e-2``) read as YAML the way a config
    file is (:func:`unique_key_loader`: 5e-2 is a number); yaml.YAMLError / DuplicateKeyError
    for text that is no YAML."""
    import yaml

    return yaml.load(text, Loader=unique_key_loader())


def _yaml_problem(e) -> str:
    """': CAUSE at line L, column C' of the YAML error ``e`` (PyYAML's first line alone names
    neither: "while scanning for the next token")."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    text = f": {problem or str(e).splitlines()[0]}"
    if mark is not None:
        text += f" at line {mark.line + 1}, column {mark.column + 1}"
    if problem and "'\\t'" in problem:
        text += " (YAML indents with spaces, not tabs)"
    return text


def load_config(cls: Type[T], path: Optional[str] = None, overrides: Sequence[str] = ()) -> T:
    """Build the dataclass ``cls`` from the YAML file ``path`` then ``--key value`` overrides.

    ``overrides`` is a list of command-line tokens (``["--lr", "1e-4", "--model.name", "tiny:llama"]``;
    ``--key=value`` and a bare ``--flag`` meaning true also work). Lists and tuples come from
    YAML sequences or comma-separated text. Raises ValueError naming the dotted key and the
    expected type for unknown keys or unconvertible values, or the key a YAML mapping holds
    twice; FileNotFoundError for a missing file, IsADirectoryError for a folder.
    """
    import yaml

    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"cls must be a dataclass type, got {cls!r}")
    data: Dict[str, Any] = {}
    if path is not None:
        if os.path.isdir(path):
            raise IsADirectoryError(f"config file {path}: expected a file, found a folder")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"config file not found: {path}")
        with open(path, "r", encoding="utf-8") as f:
            try:
                loaded = yaml.load(f, Loader=unique_key_loader())
            except yaml.YAMLError as e:
                raise ValueError(f"{path}: invalid YAML{_yaml_problem(e)}") from None
            except DuplicateKeyError as e:
                raise ValueError(f"{path}: {e}") from None
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save the config "
                                 f"as UTF-8") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of config keys at the top level, got {type(loaded).__name__}")
        # validated only once overrides are applied, so an override may fix a YAML value
        data = loaded
    for key, raw in _split_overrides(overrides):
        _set_path(data, cls, key, raw)
    return _build(cls, data)


def section_config(value: Any, cls: type, key: str, what: str) -> Any:
    """A config section given from Python as None, a mapping of ``cls``'s fields or a ``cls``:
    None or a ``cls``. ValueError naming ``key.<field>`` for an unknown field, TypeError naming
    ``key`` for another type (``what``: the section's settings, for the message)."""
    if value is None or isinstance(value, cls):
        return value
    if isinstance(value, dict):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"unknown key {key}.{unknown[0]} (valid keys: {', '.join(sorted(names))})")
        return cls(**value)
    raise TypeError(f"{key} must be null, a mapping of {what} or a {cls.__name__}, got {type(value).__name__}")


@functools.lru_cache(maxsize=None)
def _field_hints(cls) -> Dict[str, Any]:
    return _hints(cls)


def _conforms(value: Any, tp) -> bool:
    """Whether ``value`` already is of the annotated type ``tp`` (an int passes for a float, a
    tuple for a list); unlike :func:`_convert`, no text is read as a number or a bool: a config
    built from Python keeps the values it was given."""
    if tp is Any:
        return True
    optional, inner = _is_optional(tp)
    if optional:
        return value is None or _conforms(value, inner)
    origin = typing.get_origin(tp)
    if origin is Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        return any(_conforms(value, a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return any(value == c and isinstance(value, type(c)) for c in typing.get_args(tp))
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):  # (bool is an int: True is no step count)
        return isinstance(value, int if tp is int else (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple, List, Tuple, Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(tp)
        if args and (origin is tuple or tp is tuple) and not (len(args) == 2 and args[1] is Ellipsis):
            return len(args) == len(value) and all(_conforms(v, a) for v, a in zip(value, args))
        return not args or all(_conforms(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        args = typing.get_args(tp)
        return isinstance(value, Mapping) and (not args or all(
            _conforms(k, args[0]) and _conforms(v, args[1]) for k, v in value.items()))
    return isinstance(value, tp) if isinstance(tp, type) else True  # an annotation not read here: no check


def _wrong_typed_field(cfg: Any, prefix: str, loose: Sequence[str] = ()) -> Optional[Tuple[str, Any, Any]]:
    """(dotted key, annotation, value) of the first init field of the dataclass instance ``cfg``,
    other than those named in ``loose``, whose value is not of its annotated type; None when
    every one is."""
    hints = _field_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        if f.init and f.name not in loose and not _conforms(getattr(cfg, f.name), hints[f.name]):
            return prefix + f.name, hints[f.name], getattr(cfg, f.name)
    return None


def check_field_types(cfg: Any, prefix: str = "", loose: Sequence[str] = ()) -> None:
    """ValueError naming the key (``prefix`` + the field: ``ppo.gamma``) and the type expected for
    the first field of the dataclass instance ``cfg`` (but those named in ``loose``) whose value
    is not of its annotated type (:func:`_conforms`: ``True`` for an int, ``"false"`` for a bool,
    a list for a name)."""
    bad = _wrong_typed_field(cfg, prefix, loose)
    if bad is not None:
        key, tp, value = bad
        raise ValueError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")


def typed_config(prefix: str = "", loose: Sequence[str] = ()):
    """Class decorator of a config dataclass whose ``__post_init__`` checks ranges (``prefix``:
    its section's ``"ppo."``, or ``""``; ``loose``: fields it takes beyond their annotation and
    checks itself, as an offline config's ``data`` may hold the rows). :func:`load_config`
    converts each value to its field's type first; a config built from Python gets the type
    check here, around the class's own checks, which keep their messages:

    * before them, a mapping given for a section (a field whose type is a config dataclass)
      becomes that dataclass, as :func:`load_config` builds it (a misspelt key is named, with
      the close spellings);
    * a check that fails on a value of the wrong type with an unrelated TypeError or
      AttributeError (``'<=' not supported``, ``'list' object has no attribute 'startswith'``)
      raises instead the ValueError of :func:`check_field_types` naming that key;
    * after them, a value of another type that they let through (``True`` for a discount,
      ``"false"`` for a bool: truthy) is refused by :func:`check_field_types`."""

    def wrap(cls):
        checks = cls.__post_init__

        @functools.wraps(checks)
        def __post_init__(self):
            hints = _field_hints(type(self))
            for f in dataclasses.fields(self):
                tp, value = hints[f.name], getattr(self, f.name)
                section = dataclasses.is_dataclass(tp) and isinstance(tp, type)
                if f.init and section and isinstance(value, dict):
                    setattr(self, f.name, _build(tp, value, prefix=f"{prefix}{f.name}."))
            try:
                checks(self)
            except (TypeError, AttributeError) as e:
                bad = _wrong_typed_field(self, prefix, loose)
                if bad is None or bad[0].rsplit(".", 1)[-1] in str(e):  # (its own message names the key)
                    raise
            check_field_types(self, prefix, loose)  # (the ValueError for the value behind a failed check)

        cls.__post_init__ = __post_init__
        return cls

    return wrap


def saved_run_kind(run_dir: str) -> Optional[str]:
    """The kind of the run in the folder ``run_dir`` as ``rlhf-fast report`` tells it
    (:func:`~rlhf_fast.trainers.report.run_kind` of its config.yaml: ``sft``, ``reward``,
    ``dpo``, ``kto`` or an RL command such as ``grpo``); None when it holds no config.yaml, or one
    that is no rlhf-fast run's config."""
    from .report import read_config, run_kind

    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        return None
    try:
        return run_kind(read_config(run_dir))
    except (ValueError, OSError):
        return None


def config_fields(cls) -> List[dataclasses.Field]:
    """The init fields of the dataclass (type or instance) ``cls`` in the order a config lists
    them: declaration order, except that a field whose metadata says ``after: KEY`` follows the
    field KEY (with the others that follow it, in declaration order). Dataclasses put a base
    class's fields first; this lets shared keys (``OptimizerOptions``) sit beside the keys they
    go with in config.yaml and ``--help``."""
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = {f.name for f in fields}
    movers = {f.name for f in fields if f.metadata.get("after") in names}
    moved: Dict[str, List[dataclasses.Field]] = {}
    for f in fields:
        # (one level only: a field placed after one that is itself placed stays where it is)
        if f.name in movers and f.metadata["after"] not in movers:
            moved.setdefault(f.metadata["after"], []).append(f)
    out: List[dataclasses.Field] = []
    placed = {id(f) for group in moved.values() for f in group}
    for f in fields:
        if id(f) not in placed:
            out.append(f)
            out.extend(moved.get(f.name, []))
    return out


def to_dict(cfg: Any) -> Dict[str, Any]:
    """A plain nested dict (tuples as lists) of the dataclass ``cfg``, ready for YAML/JSON."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"cfg must be a dataclass instance, got {type(cfg).__name__}")

    def plain(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in config_fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def config_yaml(cfg: Any) -> str:
    """The dataclass ``cfg`` as YAML text (fields in declaration order): what config.yaml holds."""
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, path: str) -> None:
    """Write the resolved config ``cfg`` as YAML to ``path`` atomically (temp file + os.replace)."""
    atomic_write_text(path, config_yaml(cfg))


def config_keys(cls) -> List[Tuple[str, str, Any]]:
    """Every settable key of the dataclass ``cls`` as (dotted key, type name, default), nested
    sections flattened in declaration order (the default of a section's field is that of the
    section's own dataclass)."""
    out: List[Tuple[str, str, Any]] = []

    def walk(c, prefix):
        hints = _hints(c)
        for f in config_fields(c):
            tp = hints[f.name]
            inner = _is_optional(tp)[1]
            if dataclasses.is_dataclass(inner) and isinstance(inner, type):
                walk(inner, f"{prefix}{f.name}.")
                continue
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "(required)"
            out.append((prefix + f.name, _type_name(tp), default))

    walk(cls, "")
    return out


def config_keys_help(cls, defaults: Optional[Dict[str, Any]] = None) -> str:
    """A ``--help`` epilog listing the config keys of ``cls`` with their types and defaults
    (``defaults``: dotted key → the default a command sets instead)."""
    rows = [(k, t, (defaults or {}).get(k, d)) for k, t, d in config_keys(cls)]
    width = max(len(k) for k, _, _ in rows)
    lines = ["config keys (in CONFIG.yaml, or --key value; nested: --section.key value):"]
    lines += [f"  {k:{width}s}  {t} = {d!r}" for k, t, d in rows]
    lines.append("--print-config: print the resolved config as YAML and exit (nothing is loaded or trained)")
    return "\n".join(lines)


PRINT_CONFIG = "--print-config"


def take_print_config(tokens: Sequence[str]) -> Tuple[List[str], bool]:
    """(``tokens`` without ``--print-config``, whether it was there)."""
    rest = [t for t in tokens if t != PRINT_CONFIG]
    return rest, len(rest) != len(tokens)


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees the old or the new file, never a half one."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 less the umask)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def check_output_path(path, option: str, *, folder: bool = False) -> None:
    """Check, before any work whose results it will hold, that ``path`` can be written: a file
    (or, with ``folder``, a folder) that is not the other kind, in a folder that exists or can
    be created and is writable. Raises ValueError naming ``option`` and the path."""
    path = os.fspath(path)
    if not path.strip():
        raise ValueError(f"{option}: expected a {'folder' if folder else 'file'} path, got an empty string")
    want, other = ("a folder", "a file") if folder else ("a file", "a folder")
    if os.path.exists(path):
        if os.path.isdir(path) != folder:
            raise ValueError(f"{option} {path}: expected {want}, found {other}")
        if not os.access(path, os.W_OK):
            raise ValueError(f"{option} {path}: not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the nearest folder that exists will hold the new ones
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise ValueError(f"{option} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"{option} {path}: cannot write in {parent} (permission denied)")


__all__ = ["load_config", "to_dict", "save_config", "parse_overrides", "atomic_write_text", "check_output_path"]


def path_inside(path, folder) -> Optional[str]:
    """``path`` relative to ``folder`` (both resolved: links followed) when it is ``folder`` or
    lies under it, else None."""
    rel = os.path.relpath(os.path.realpath(path), os.path.realpath(folder))
    return None if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def check_out_not_input(out: str, inputs: Dict[str, Optional[str]], what: str) -> None:
    """ValueError naming --out when ``out`` would replace one of a command's ``inputs`` (option
    -> path; None or a path that does not exist, such as a ``tiny:`` spec, is skipped): the file
    itself, or any path inside a folder (a model's config.json, its tokenizer). ``what`` ("the
    results") names what the command writes. Shared by ``eval`` and ``generate``."""
    for option, src in inputs.items():
        if not src or not os.path.exists(src):
            continue
        if os.path.isdir(src):
            rel = path_inside(out, src)
            if rel is not None:
                raise ValueError(f"--out {out} is inside the {option} folder {src} ({what} would replace its "
                                 f"{rel}); write {what} outside it")
        elif os.path.exists(out) and os.path.samefile(out, src):
            raise ValueError(f"--out {out} is the {option} file itself; write {what} to another file")
