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
``--x/--no-x`` otherwise), ``int | str`` (a whole number or a word such as ``auto``), ``float | str`` (a number
or a word), ``tuple[float, float]`` (two values), and a
``choices`` list becomes a ``click.Choice``; ``tuple[int, ...]`` (any length) is one comma-separated
value (``--milestones 150,180,210``). Values are checked by the config's own ``validate()``, which the
stage function calls, never by click callbacks.

Config files: every generated command also takes ``--config FILE.yaml``. :func:`config_from_params` then
takes each field from the command line when it was given there (click's ``ParameterSource``), else from
the file, else its default. A file is read by :func:`read_config_file`: a mapping of field names (a run's
``config.yaml`` with its ``resolved`` record is one), each value checked against the field's annotation;
an unknown key, a wrong type or a missing file is a one-line TcskdError naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import click
from click.core import ParameterSource

from tcskd.errors import TcskdError

#: The key of a field's :class:`Option` in ``dataclasses.field(metadata=...)``.
KEY = "tcskd.option"
#: The parameter name of ``--config FILE``.
CONFIG = "config"
#: Keys a config file may hold besides the fields, ignored when read (a run's ``config.yaml`` records
#: what its options resolved to under ``resolved``).
IGNORED_KEYS = ("resolved",)
#: Where click got a value that counts as given (not the default).
_GIVEN = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT, ParameterSource.PROMPT)


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


#: Every command takes -h as well as --help, whether it runs under ``tcskd`` or on its own (click remembers a
#: command's help option from its first invocation).
HELP = {"help_option_names": ["-h", "--help"]}

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
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return rest[0], len(rest) < len(args)
        if set(rest) == {int, str}:
            return INT_OR_STR, len(rest) < len(args)
        if set(rest) == {float, str}:
            return FLOAT_OR_STR, len(rest) < len(args)
        raise TypeError(f"unsupported option type {annotation!r}")
    return annotation, False


#: ``int | str``, e.g. ``--workers auto|N``: a whole number (on the command line or in a file) becomes an int,
#: any other text stays a string for the config's ``validate()`` to judge.
INT_OR_STR = int | str


def _int_or_str(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lstrip("+-").isdigit():
        return int(value)
    return value


#: ``float | str``, e.g. ``--probe-wd auto|WD``: a number (``1e-3`` too) becomes a float, other text stays a string.
FLOAT_OR_STR = float | str


def _float_or_str(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


class _FloatOrText(click.ParamType):
    """``float | str`` on the command line: a number as a float, other text as it is."""

    name = "number|text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return _float_or_str(value)


class _IntOrText(click.ParamType):
    """``int | str`` on the command line: a whole number as an int, other text as it is."""

    name = "integer|text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        return _int_or_str(value)


class _CommaList(click.ParamType):
    """``tuple[T, ...]`` on the command line: one comma-separated value (``150,180,210``; empty = none)."""

    name = "list"

    def __init__(self, item: type) -> None:
        self.item = item
        self.name = f"{item.__name__},..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, (tuple, list)):
            return tuple(value)
        try:
            return tuple(self.item(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of {self.item.__name__}", param, ctx)


def _variadic(base: Any) -> type | None:
    """T of ``tuple[T, ...]``, else None."""
    args = typing.get_args(base)
    if typing.get_origin(base) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return args[0]
    return None


def _click_type(base: Any, option: Option) -> Any:
    if option.choices is not None:
        return click.Choice(list(option.choices))
    if _variadic(base) in (int, float, str):
        return _CommaList(_variadic(base))
    if typing.get_origin(base) is tuple:
        args = typing.get_args(base)
        if not args or Ellipsis in args:
            raise TypeError(f"unsupported option type {base!r}: give a fixed-length tuple")
        return tuple(args)
    if base in (str, int, float):
        return base
    if base == INT_OR_STR:
        return _IntOrText()
    if base == FLOAT_OR_STR:
        return _FloatOrText()
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
        return _FileOption(decls, is_flag=True, default=bool(default), show_default=show, **kw)
    kw["type"] = bool if base is bool else _click_type(base, option)
    if typing.get_origin(base) is tuple and _variadic(base) is None:
        kw["nargs"] = len(typing.get_args(base))
    show = option.show_default if option.show_default is not None else default is not None
    if not required:  # click takes an explicit default=None as a value that satisfies required=True
        kw["default"] = default
    return _FileOption(decls, show_default=show, **kw)


class _FileOption(click.Option):
    """A generated option: a required one may be left out when ``--config`` is given (the file may hold it;
    :func:`config_from_params` checks that one of the two did)."""

    def process_value(self, ctx: click.Context, value: Any) -> Any:
        if self.required and ctx.params.get(CONFIG) is not None:
            self.required = False
            try:
                return super().process_value(ctx, value)
            finally:
                self.required = True
        return super().process_value(ctx, value)


def config_option() -> click.Option:
    """``--config FILE``: processed first (eager), so the required options know a file may supply them."""
    return click.Option(["--config", CONFIG], metavar="FILE", is_eager=True, default=None,
                        help="YAML file of options (e.g. a run's config.yaml); options given here override it.")


def click_options(cls: type, exclude: Sequence[str] = (),
                  only: Sequence[str] | None = None) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per field of the config dataclass ``cls`` (declaration order).

    The options' parameter names are the field names, so ``config_from_params(cls, params)`` rebuilds the
    config; fields declared with ``cli=False`` and the names in ``exclude`` get no option; ``only`` picks
    some fields (a command that shares a few options of a stage, e.g. ``--cache-root``). Without ``only``
    the command also gets ``--config FILE`` (see :func:`config_from_params`).
    """
    hints = typing.get_type_hints(cls)
    options = [click_option(f, hints[f.name]) for f in cli_fields(cls, exclude, only)]
    if only is None:
        options.append(config_option())

    def decorate(fn: Callable) -> Callable:
        params = getattr(fn, "__click_params__", None)
        if params is None:
            params = fn.__click_params__ = []  # type: ignore[attr-defined]
        # click applies decorators bottom-up and reverses the list: append in reverse to keep field order.
        params.extend(reversed(options))
        return fn

    return decorate


def config_from_params(cls: type, params: dict[str, Any], ctx: click.Context | None = None,
                       **overrides: Any) -> Any:
    """``cls`` from a click ``params`` dict (keys that are not fields are ignored), plus ``overrides``.

    With ``params["config"]`` (``--config FILE``) a field comes from the command line when it was given
    there (``ctx``'s ParameterSource; default: the current click context), else from the file, else its
    default. A list given for a tuple field (e.g. read back from YAML or JSON) becomes a tuple.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k: v for k, v in params.items() if k in names}
    path = params.get(CONFIG)
    if path is not None:
        ctx = ctx if ctx is not None else click.get_current_context(silent=True)
        given = given_params(ctx) if ctx is not None else non_default(cls, values)
        from_file = read_config_file(cls, path)
        values = {**{k: v for k, v in values.items() if k in given or k not in from_file},
                  **{k: v for k, v in from_file.items() if k not in given}}
        _require(cls, values, path)
    values.update(overrides)
    for name, value in values.items():
        if isinstance(value, list) and typing.get_origin(_base_type(hints[name])[0]) is tuple:
            values[name] = tuple(value)
    return cls(**values)


def given_params(ctx: click.Context) -> set[str]:
    """The names of the parameters of ``ctx`` given on the command line (or in the environment)."""
    return {name for name in ctx.params if ctx.get_parameter_source(name) in _GIVEN}


def non_default(cls: type, values: Mapping[str, Any]) -> set[str]:
    """The names in ``values`` whose value is not the field's default (how the API tells what was given)."""
    return {f.name for f in dataclasses.fields(cls) if f.name in values and (
        f.default is MISSING and f.default_factory is MISSING or values[f.name] != _default(f))}


def _default(f: dataclasses.Field) -> Any:
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def _require(cls: type, values: dict[str, Any], path: str) -> None:
    for f in dataclasses.fields(cls):
        if f.default is MISSING and f.default_factory is MISSING and values.get(f.name) is None:
            name = option_names(cls).get(f.name, f.name)
            raise TcskdError(f"{path}: missing key '{f.name}' (or give {name})")


def config_from_file(cls: type, path: str | Path, **overrides: Any) -> Any:
    """``cls`` from a config file (:func:`read_config_file`) and ``overrides`` (the Python side of
    ``--config``): e.g. ``config_from_file(TrainConfig, "runs/a/config.yaml", out="runs/b")``."""
    values = {**read_config_file(cls, path), **overrides}
    _require(cls, values, str(path))
    return cls(**values)


def read_config_file(cls: type, path: str | Path) -> dict[str, Any]:
    """The fields of ``cls`` a YAML file sets, each checked against its annotation (:func:`check_values`).

    TcskdError (one line naming the file and the key) for a missing or unreadable file, a file that is not a
    mapping, an unknown key or a value of the wrong type. Keys in :data:`IGNORED_KEYS` are skipped.
    """
    data = load_yaml(path)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise TcskdError(f"{path}: expected a mapping of option names to values, got {type(data).__name__}")
    return check_values(cls, {k: v for k, v in data.items() if k not in IGNORED_KEYS}, str(path))


def load_yaml(path: str | Path) -> Any:
    """The content of a YAML file; TcskdError (one line naming the file) when missing or malformed."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise TcskdError(f"{path}: no such file" if not p.exists() else f"{path}: not a file")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise TcskdError(f"{path}: not valid YAML{line}: {getattr(e, 'problem', None) or e}") from None


def check_values(cls: type, values: Mapping[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """``values`` (field name -> value, e.g. read from YAML) checked against the annotations of ``cls``.

    Returns them converted (a list for a tuple field -> tuple, an int for a float field -> float, a YAML 1.1
    string like ``5e-4`` for a float field -> float). TcskdError ``SOURCE: unknown key 'PREFIX+name' (...)``
    or ``SOURCE: key 'PREFIX+name' must be ... (got ...)``.
    """
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    choices = {f.name: option_of(f).choices for f in dataclasses.fields(cls)}
    out = {}
    for name, value in values.items():
        if name not in hints or name not in fields:
            raise TcskdError(f"{source}: unknown key '{prefix}{name}' ({cls.__name__} has no such field; "
                             f"known: {', '.join(fields)})")
        ok, converted = _convert(value, hints[name])
        if not ok:
            raise TcskdError(f"{source}: key '{prefix}{name}' must be {_describe(hints[name])} "
                             f"(got {type(value).__name__} {value!r})")
        if choices[name] and converted is not None and converted not in choices[name]:
            raise TcskdError(f"{source}: key '{prefix}{name}' must be one of {', '.join(choices[name])} "
                             f"(got {converted!r})")
        out[name] = converted
    return out


def _convert(value: Any, annotation: Any) -> tuple[bool, Any]:
    base, optional = _base_type(annotation)
    if value is None:
        return optional, None
    if base is bool:
        return isinstance(value, bool), value
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if base is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads 5e-4 (no dot) as a string
            except ValueError:
                return False, value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if base is str:
        return isinstance(value, str), value
    if base == INT_OR_STR:
        return isinstance(value, (int, str)) and not isinstance(value, bool), _int_or_str(value)
    if base == FLOAT_OR_STR:
        return isinstance(value, (int, float, str)) and not isinstance(value, bool), _float_or_str(value)
    if typing.get_origin(base) is tuple:
        item = _variadic(base)
        if item is not None and isinstance(value, str):
            try:
                value = [item(v) for v in value.split(",") if v.strip()]
            except ValueError:
                return False, value
        if not isinstance(value, (list, tuple)):
            return False, value
        items = [item] * len(value) if item is not None else list(typing.get_args(base))
        if len(items) != len(value):
            return False, value
        converted = [_convert(v, t) for v, t in zip(value, items)]
        return all(ok for ok, _ in converted), tuple(v for _, v in converted)
    return isinstance(value, base) if isinstance(base, type) else True, value


def _describe(annotation: Any) -> str:
    base, optional = _base_type(annotation)
    if typing.get_origin(base) is tuple:
        item = _variadic(base)
        what = (f"a list of {item.__name__}" if item is not None else
                f"a list of {len(typing.get_args(base))} ({', '.join(t.__name__ for t in typing.get_args(base))})")
    else:
        what = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                INT_OR_STR: "an integer or a string", FLOAT_OR_STR: "a number or a string"}.get(
            base, getattr(base, "__name__", str(base)))
    return what + (" or null" if optional else "")


__all__ = ["KEY", "CONFIG", "IGNORED_KEYS", "Option", "opt", "option_of", "cli_fields", "option_names",
           "click_option", "config_option", "click_options", "config_from_params", "given_params", "non_default",
           "config_from_file", "read_config_file", "load_yaml", "check_values"]
