"""One declaration per option: config dataclass fields that carry their own CLI option.

A stage's options are the fields of its config dataclass. Each field is
declared once with :func:`opt` (default, choices, one-line CLI help, option
name, metavar, hidden) and documented by the docstring below it; the click
options of the stage's command are generated from the fields by
:func:`click_options` and turned back into the config by
:func:`config_from_params`::

    @dataclass
    class Config:
        dim: int | None = opt(None, help="Number of coordinates.", metavar="K")
        lam: float = opt(10.0, help="Weight of the mimic term.", cli="--lambda")

    @click.command()
    @click_options(Config)
    def cmd(**params):
        run(config_from_params(Config, params))

The option's type follows the annotation: ``str``, ``int``, ``float`` (also
``X | None``), ``bool`` (an on/off flag: ``--x`` when the default is False,
``--x/--no-x`` otherwise), ``tuple[float, float]`` (two values),
``tuple[int, ...]`` (one comma-separated value, ``150,180,210``), and a
``choices`` list becomes a ``click.Choice``. Values are checked by the config's
own ``validate()``, which the stage function calls, never by click callbacks.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass
from typing import Any, Callable, Iterable, Sequence

import click

#: The key of a field's :class:`Option` in ``dataclasses.field(metadata=...)``.
KEY = "tcskd.option"


@dataclass(frozen=True)
class Option:
    """How one config field appears on the command line."""

    help: str | None = None
    choices: tuple[str, ...] | None = None
    cli: str | None = None
    """Option declaration, e.g. ``--lambda`` or ``--linear/--no-linear``; None = ``--`` + the field name with
    dashes."""
    flag: bool | None = None
    """A bool field as an on/off flag (the default for bool fields); False = an option taking a value."""
    metavar: str | None = None
    hidden: bool = False
    show_default: bool | None = None
    """None = show the default when it is not None and the field is not a plain ``--x`` flag."""
    enabled: bool = True
    """False: the field has no CLI option (set from Python or a saved config only)."""


def opt(default: Any = MISSING, *, help: str | None = None, choices: Iterable[str] | None = None,
        cli: str | bool | None = None, flag: bool | None = None, metavar: str | None = None,
        hidden: bool = False, show_default: bool | None = None) -> Any:
    """A dataclass field with its CLI option: ``dataclasses.field(default=..., metadata={KEY: Option})``.

    ``default`` omitted: a required field (and a required option). ``cli`` is the option's declaration
    (``"--lambda"``) or False for a field without an option; a tuple default keeps its value (immutable).
    """
    option = Option(help=help, choices=tuple(choices) if choices is not None else None,
                    cli=cli if isinstance(cli, str) else None, flag=flag, metavar=metavar, hidden=hidden,
                    show_default=show_default, enabled=cli is not False)
    return dataclasses.field(default=default, metadata={KEY: option})


def option_of(f: dataclasses.Field) -> Option:
    """The field's :class:`Option` (a plain field gets the defaults)."""
    return f.metadata.get(KEY) or Option()


def cli_fields(cls: type, exclude: Sequence[str] = (), only: Sequence[str] | None = None) -> list[dataclasses.Field]:
    """The fields of ``cls`` that have a CLI option, in declaration order: those in ``only`` (default: all),
    less ``exclude``."""
    unknown = (set(exclude) | set(only or ())) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {', '.join(sorted(unknown))}")
    return [f for f in dataclasses.fields(cls) if option_of(f).enabled and f.name not in exclude
            and (only is None or f.name in only)]


def option_names(cls: type, exclude: Sequence[str] = ()) -> dict[str, str]:
    """field name -> the long option naming it (``lam`` -> ``--lambda``)."""
    return {f.name: _decls(f)[0].split("/")[0] for f in cli_fields(cls, exclude)}


def _decls(f: dataclasses.Field) -> list[str]:
    return [option_of(f).cli or "--" + f.name.replace("_", "-")]


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the annotation without ``| None``, whether None was allowed)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1:
            raise TypeError(f"unsupported option type {annotation!r}")
        return rest[0], True
    return annotation, False


class IntList(click.ParamType):
    """``tuple[int, ...]`` on the command line: one comma-separated value (``150,180,210``; empty: ``()``)."""

    name = "ints"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, (tuple, list)):
            return tuple(value)
        try:
            return tuple(int(v) for v in str(value).replace(" ", "").split(",") if v)
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of integers", param, ctx)


def _is_int_list(base: Any) -> bool:
    return typing.get_origin(base) is tuple and typing.get_args(base) == (int, Ellipsis)


def _click_type(base: Any, option: Option) -> Any:
    if option.choices is not None:
        return click.Choice(list(option.choices))
    if _is_int_list(base):
        return IntList()
    if typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        if not args or Ellipsis in args:
            raise TypeError(f"unsupported option type {base!r}: give a fixed-length tuple")
        return tuple(args)
    if base in (str, int, float):
        return base
    raise TypeError(f"unsupported option type {base!r}")


def click_option(f: dataclasses.Field, annotation: Any) -> click.Option:
    """The click option of one config field."""
    option = option_of(f)
    base, _ = _base_type(annotation)
    required = f.default is MISSING and f.default_factory is MISSING
    default = None if required else (f.default if f.default is not MISSING else f.default_factory())
    decls = _decls(f) + [f.name]
    kw: dict[str, Any] = {"help": option.help, "metavar": option.metavar, "hidden": option.hidden,
                          "required": required}
    if base is bool and option.flag is not False:
        if default and "/" not in decls[0]:
            decls[0] = f"{decls[0]}/--no-{decls[0][2:]}"
        flag_only = "/" not in decls[0]
        show = option.show_default if option.show_default is not None else not flag_only
        return click.Option(decls, is_flag=True, default=bool(default), show_default=show, **kw)
    kw["type"] = bool if base is bool else _click_type(base, option)
    if typing.get_origin(base) is tuple and not _is_int_list(base):
        kw["nargs"] = len(typing.get_args(base))
    show = option.show_default if option.show_default is not None else default is not None
    if not required:  # click takes an explicit default=None as a value that satisfies required=True
        kw["default"] = default
    return click.Option(decls, show_default=show, **kw)


def click_options(cls: type, exclude: Sequence[str] = (),
                  only: Sequence[str] | None = None) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per field of the config dataclass ``cls`` (declaration order).

    The options' parameter names are the field names, so ``config_from_params(cls, params)`` rebuilds the
    config; fields declared with ``cli=False`` and the names in ``exclude`` get no option; ``only`` picks
    some fields (a command that shares a few options of a stage, e.g. ``--cache-root``).
    """
    hints = typing.get_type_hints(cls)
    options = [click_option(f, hints[f.name]) for f in cli_fields(cls, exclude, only)]

    def decorate(fn: Callable) -> Callable:
        params = getattr(fn, "__click_params__", None)
        if params is None:
            params = fn.__click_params__ = []  # type: ignore[attr-defined]
        # click applies decorators bottom-up and reverses the list: append in reverse to keep field order.
        params.extend(reversed(options))
        return fn

    return decorate


def config_from_params(cls: type, params: dict[str, Any], **overrides: Any) -> Any:
    """``cls`` from a click ``params`` dict (keys that are not fields are ignored), plus ``overrides``.

    A list given for a tuple field (e.g. read back from YAML or JSON) becomes a tuple.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in params.items() if k in names}
    values.update(overrides)
    for name, value in values.items():
        if isinstance(value, list) and typing.get_origin(_base_type(hints[name])[0]) is tuple:
            values[name] = tuple(value)
    return cls(**values)


__all__ = ["KEY", "Option", "opt", "option_of", "cli_fields", "option_names", "click_option", "click_options",
           "config_from_params"]
