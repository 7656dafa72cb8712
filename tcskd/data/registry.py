"""The registry of dataset kinds: a spec ``KIND:ARG`` -> the reader that opens it as a :class:`Source`.

Each module of this package registers one or more :class:`Reader` s at import (timm's
``timm/data/readers/`` is the model: a reader per format behind one factory). A reader opens a split of
its kind and, where that is cheaper than opening it, gives its fingerprint (part of a cache's key).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from tcskd.errors import DataError, MissingSplitError
from tcskd.source import Source

SPLITS = ("train", "test", "all")


@dataclass(frozen=True)
class Reader:
    """One kind of dataset spec."""

    kind: str
    """The spec's prefix (``wds`` in ``wds:ROOT``)."""
    syntax: str
    """How a spec of this kind is written, for help and errors (``wds:ROOT``)."""
    open: Callable[[str, str, str], Source]
    """(spec, arg, split) -> the split as a Source, or a one-line DataError."""
    fingerprint: Callable[[str, str, str], str] | None = None
    """(spec, arg, split) -> the data's fingerprint without opening it (None: open it and take its own)."""
    reindex: Callable[[str, str], None] | None = None
    """(spec, arg) -> rebuild the source's saved index now (``tcskd cache --reindex``); None: it keeps none."""
    sequential: bool = False
    """Rows are read fastest in source order (tar streams, parquet row groups): ``tcskd cache --order auto``
    keeps that order for this kind; False: any row costs the same (arrays in memory, one file per image)."""


_READERS: dict[str, Reader] = {}


def register(*readers: Reader) -> None:
    for r in readers:
        _READERS[r.kind] = r


def readers() -> list[Reader]:
    return list(_READERS.values())


def spec_help() -> str:
    """Every registered spec form, for help and error messages."""
    forms = [r.syntax for r in _READERS.values()]
    return ", ".join(forms[:-1]) + " or " + forms[-1] if len(forms) > 1 else "".join(forms)


def parse_spec(spec: str) -> tuple[str, str]:
    kind, sep, arg = spec.partition(":")
    if not sep or not arg:
        raise DataError(f"bad data spec '{spec}': expected one of {spec_help()}")
    return kind, arg


def _reader(spec: str, split: str) -> tuple[Reader, str]:
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}' (choose train, test or all)")
    kind, arg = parse_spec(spec)
    if kind not in _READERS:
        raise DataError(f"unknown data spec '{spec}': expected one of {spec_help()}")
    return _READERS[kind], arg


def open_source(spec: str, split: str = "train") -> Source:
    """Resolve a data spec and split into a Source, or raise a one-line DataError."""
    reader, arg = _reader(spec, split)
    return reader.open(spec, arg, split)


def fingerprint(spec: str, split: str = "train") -> str:
    """The dataset's fingerprint (part of a cache's key), without opening it where the reader can."""
    reader, arg = _reader(spec, split)
    if reader.fingerprint is not None:
        return reader.fingerprint(spec, arg, split)
    return reader.open(spec, arg, split).fingerprint


def reads_sequentially(spec: str) -> bool:
    """True when ``spec``'s kind reads rows fastest in source order (:attr:`Reader.sequential`)."""
    reader, _ = _reader(spec, "train")
    return reader.sequential


def reindex(spec: str) -> None:
    """Rebuild the saved index of ``spec``'s source, if its kind keeps one (``tcskd cache --reindex``)."""
    reader, arg = _reader(spec, "train")
    if reader.reindex is not None:
        reader.reindex(spec, arg)


def has_split(spec: str, split: str) -> bool:
    """Whether ``spec`` has a non-empty ``split``; any problem other than its absence is raised (a split named
    in the spec and missing, an unreadable dataset), so that a run does not quietly go without a test split."""
    try:
        return len(open_source(spec, split)) > 0
    except MissingSplitError:
        return False
