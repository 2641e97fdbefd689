"""Control commands: what each command accepts, checked before its handler runs.

A daemon declares each command once, `Command(handler, args={name: type | Arg(...)})`, and
`Command.validate` checks what a client sent (argument names, JSON types, required ones,
defaults; `Arg.parse` turns a checked value into the typed one the handler takes), so a
handler sees only valid arguments and a bad request changes nothing. `WIRE_ARGS` is the one
list of argument names for mmctl and both daemons (docs/CONTRACTS.md); `wire_command(cmd,
handler)` is a standard command with those names.
"""
from __future__ import annotations

import inspect
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import BadArgument, MmfeedError
from .filters import FilterSpec

# Argument names on the wire, one place for mmctl and both daemons (docs/CONTRACTS.md).
WIRE_ARGS: dict[str, dict[str, Any]] = {}  # filled below, after Arg is defined


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               list: "a list", dict: "an object"}


def _type_name(t: Any) -> str:
    origin = typing.get_origin(t)
    if origin is list:
        (inner,) = typing.get_args(t) or (Any,)
        return f"a list of {_type_name(inner).removeprefix('a ').removeprefix('an ')}s" \
            if inner in _TYPE_NAMES else "a list"
    if isinstance(t, tuple):
        return " or ".join(_type_name(x) for x in t)
    if t is Any or t is None:
        return "any JSON value"
    return _TYPE_NAMES.get(t, getattr(t, "__name__", str(t)))


def _matches(value: Any, t: Any) -> bool:
    """JSON-aware isinstance: an int is a valid float, a bool is never an int or float."""
    if t is Any or t is None:
        return True
    if isinstance(t, tuple):
        return any(_matches(value, x) for x in t)
    if typing.get_origin(t) is list:
        args = typing.get_args(t)
        return isinstance(value, list) and (not args or all(_matches(v, args[0]) for v in value))
    if t is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if t is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, t)


@dataclass(frozen=True)
class Arg:
    """One argument of a command: its JSON type, whether it is required, its default.

    `type` is str, int, float (ints accepted), bool, list, `list[str]`, dict, a tuple of those,
    or `typing.Any`. A bare type in `Command(args=...)` means `Arg(type)` (required).
    `parse`, when given, turns the checked JSON value into the typed value the handler gets
    (`FilterSpec.parse` for a filter spec: parsed once, here); its ValueError (or MmfeedError)
    is the client's bad argument, worded `cmd: message`.
    """

    type: Any = Any
    required: bool = True
    default: Any = None
    help: str = ""
    parse: Callable[[Any], Any] | None = None

    def describe(self) -> str:
        return _type_name(self.type)


@dataclass(frozen=True)
class Command:
    """A control command: the handler and the arguments it accepts.

    The handler is called with the validated arguments as keyword arguments (defaults filled
    in) and returns a dict merged into the `{"ok": true}` reply, or None. With `args=None`
    the spec is read from the handler's signature and type hints.
    """

    handler: Callable[..., Mapping[str, Any] | None]
    args: Mapping[str, Any] | None = field(default_factory=dict)
    help: str = ""

    def __post_init__(self) -> None:
        spec = _spec_from_signature(self.handler) if self.args is None else self.args
        norm = {name: a if isinstance(a, Arg) else Arg(a) for name, a in spec.items()}
        object.__setattr__(self, "args", norm)

    def validate(self, cmd: str, args: Mapping[str, Any]) -> dict[str, Any]:
        """Checked keyword arguments for the handler, or BadArgument naming what is wrong."""
        spec: Mapping[str, Arg] = self.args  # type: ignore[assignment]
        accepted = ", ".join(f"{n} ({a.describe()})" for n, a in spec.items()) or "no arguments"
        unknown = sorted(set(args) - set(spec))
        if unknown:
            raise BadArgument(f"{cmd}: unknown argument {unknown[0]!r}; accepted: {accepted}")
        out: dict[str, Any] = {}
        for name, a in spec.items():
            if name not in args:
                if a.required:
                    raise BadArgument(f"{cmd}: missing argument {name!r} ({a.describe()}); "
                                      f"accepted: {accepted}")
                out[name] = a.default
                continue
            value = args[name]
            if not _matches(value, a.type):
                raise BadArgument(f"{cmd}: argument {name!r} must be {a.describe()}, "
                                  f"got {type(value).__name__} {json.dumps(value)[:80]}")
            if a.parse is not None:
                try:
                    value = a.parse(value)
                except (ValueError, MmfeedError) as e:
                    raise BadArgument(f"{cmd}: {e}") from None
            out[name] = value
        return out


def _spec_from_signature(fn: Callable) -> dict[str, Arg]:
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # unresolvable annotations: fall back to untyped arguments
        hints = {}
    spec = {}
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        t = hints.get(name, Any)
        if typing.get_origin(t) in (typing.Union, types.UnionType):
            t = tuple(x for x in typing.get_args(t) if x is not type(None)) or Any
        required = p.default is p.empty
        spec[name] = Arg(t, required=required, default=None if required else p.default)
    return spec


WIRE_ARGS.update({
    "status": {},
    "filter": {"spec": Arg(str, parse=FilterSpec.parse)},   # handlers get a FilterSpec
    "sensor": {"input": str, "stem": str},
    "method": {"input": str, "name": str},
    "segment": {"start": float, "end": float},
    "segment_clear": {},
    "label": {"name": str},
    "modalities": {"enable": Arg(list[str], required=False, default=[]),
                   "disable": Arg(list[str], required=False, default=[])},
    "pause": {},
    "resume": {},
    "mix": {"fraction": float},
    "checkpoint": {},
    "logs": {"n": Arg(int, required=False, default=100)},
    # issue 18: watching and steering a run
    "generation": {"number": int},
    "preview": {},
    "batch": {"size": int, "lr_rule": Arg(str, required=False, default="none")},
    "record": {"action": str, "split": Arg(str, required=False, default="train"),
               "cache": Arg(str, required=False, default="")},
})


def wire_command(cmd: str, handler: Callable[..., Mapping[str, Any] | None]) -> Command:
    """`Command(handler, args=WIRE_ARGS[cmd])`: a standard command with mmctl's argument names."""
    return Command(handler, args=WIRE_ARGS[cmd])
