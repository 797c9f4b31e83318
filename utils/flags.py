"""Command lines generated from nested typed dataclasses: the one way settings become flags.

A configuration is a dataclass whose fields are settings or sections (dataclasses themselves).
Every setting is a flag spelled by its path with dashes: ``--section.field-name``, a top-level
field ``--field-name`` (with ``underscores``, also ``--section.field_name``). A section may also
offer its fields under a short spelling without the section (``--field-name``, or with a prefix
such as ``--vocab-``), and a caller may give a field another short name (``--context`` for
``data.context``): that is how the documented short flags stay. Booleans take ``--x`` /
``--no-x``; ``list`` fields take several values; ``X | None`` parses as ``X``.

Help text is the field's ``metadata["help"]``, else its comments in the source: the comment at
the end of the field's line, else the comment lines right above it.

Flags are parsed without defaults: ``given(args)`` holds only what the command line set, by path,
so presets can fill the rest and an explicit flag always wins; ``build(cls, values)`` makes the
nested configuration from such a dict over the classes' defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Section:
    """How a section's fields are spelled besides ``--<name>.<field>``: ``short`` is the prefix
    of their short flags (``""``: the bare field name; None: no short flags)."""

    name: str
    short: str | None = None
    title: str = ""


def is_section(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def add_flags(parser: argparse.ArgumentParser, cls: type, sections: list[Section] = (),
              short_names: Mapping[str, str] = {}, skip: set[str] = frozenset(),
              helps: Mapping[str, str] = {}, underscores: bool = False,
              defaults=None, top_title: str = "settings") -> None:
    """Add one flag per setting of ``cls`` (see the module docstring). ``short_names`` maps a
    path to its short flag (without dashes), replacing the section's short spelling of it;
    ``defaults`` (an instance of ``cls``; default: ``cls()``) gives the defaults the help shows;
    ``skip`` lists the paths set by other means; ``helps`` gives the help of a path where this
    command gives the field a meaning of its own; ``underscores`` adds each spelling with ``_``
    for ``-`` (the DeepSpeed convention, ``--deepspeed_config``)."""
    by_name = {s.name: s for s in sections}
    hints = typing.get_type_hints(cls)
    top = parser.add_argument_group(top_title)
    defaults = defaults if defaults is not None else cls()
    for f in dataclasses.fields(cls):
        if is_section(hints[f.name]):
            sec = by_name.get(f.name, Section(f.name))
            group = parser.add_argument_group(sec.title or f"{f.name} settings")
            sub = typing.get_type_hints(hints[f.name])
            for g in dataclasses.fields(hints[f.name]):
                path = f"{f.name}.{g.name}"
                spellings = [f"{_dashed(f.name)}.{_dashed(g.name)}"]
                if path in short_names:
                    spellings.insert(0, short_names[path])
                elif sec.short is not None:
                    spellings.insert(0, f"{sec.short}{_dashed(g.name)}")
                if path not in skip:
                    help_ = helps.get(path) or help_of(hints[f.name], g)
                    default = getattr(getattr(defaults, f.name), g.name)
                    _add(group, g, sub[g.name], path, spellings, help_, default, underscores)
        elif f.name not in skip:
            spellings = [short_names.get(f.name, _dashed(f.name))]
            help_ = helps.get(f.name) or help_of(cls, f)
            _add(top, f, hints[f.name], f.name, spellings, help_, getattr(defaults, f.name),
                 underscores)


def _dashed(name: str) -> str:
    return name.replace("_", "-")


def _add(group, f: dataclasses.Field, tp, path: str, spellings: list[str], help_: str,
         default, underscores: bool) -> None:
    if underscores:
        spellings = [v for s in spellings for v in (s, s.replace("-", "_"))]
    names = [f"--{s}" for s in dict.fromkeys(spellings)]  # one spelling without dashes
    if default not in (None, "") and tp is not bool:
        help_ = f"{help_} (default: {default})" if help_ else f"(default: {default})"
    kw: dict = {"dest": path, "default": argparse.SUPPRESS, "help": help_}
    if tp is bool:
        kw["action"] = argparse.BooleanOptionalAction
        kw["help"] = f"{help_} (default: {'on' if default else 'off'})"
    elif typing.get_origin(tp) is list:
        kw.update(nargs="*", type=_scalar(typing.get_args(tp)[0]),
                  metavar=f.metadata.get("metavar", "VALUE"))
        kw["help"] += "; several values: give it after positional arguments"
    else:
        kw.update(type=_scalar(tp), metavar=f.metadata.get("metavar", f.name.upper()))
    group.add_argument(*names, **kw)


def _scalar(tp) -> type:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None: parse as X
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    if tp in (int, float, str):
        return tp
    raise TypeError(f"no flag type for {tp}")


def help_of(cls: type, f: dataclasses.Field) -> str:
    """``metadata["help"]``, else the field's comment (see the module docstring)."""
    if "help" in f.metadata:
        return f.metadata["help"]
    return _comments(cls).get(f.name, "")


@functools.cache
def _comments(cls: type) -> dict[str, str]:
    """{field: comment} from the class body: the end-of-line comment, else the lines above."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    body = next(i for i, line in enumerate(lines) if line.lstrip().startswith("class ")) + 1
    out, above = {}, []
    for line in lines[body:]:
        text = line.strip()
        if text.startswith(("def ", "@", "class ")):  # the methods: no more fields
            break
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        m = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if m and not text.startswith(("def ", "@")):
            out[m.group(1)] = m.group(2) or " ".join(above)
        above = []
    return out


def given(args: argparse.Namespace) -> dict:
    """The settings the command line set: {path: value}."""
    return dict(vars(args))


def build(cls: type, values: Mapping[str, object], defaults=None):
    """``cls`` with ``values`` ({path: value}) over ``defaults`` (an instance; default: the
    classes' own defaults). Section constructors run their checks (``__post_init__``)."""
    defaults = defaults if defaults is not None else cls()
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        current = getattr(defaults, f.name)
        if is_section(hints[f.name]):
            sub = {k.split(".", 1)[1]: v for k, v in values.items()
                   if k.startswith(f"{f.name}.")}
            kw[f.name] = dataclasses.replace(current, **sub)
        else:
            kw[f.name] = values.get(f.name, current)
    return cls(**kw)


def paths(cls: type) -> list[str]:
    """Every setting's path, in field order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if is_section(hints[f.name]):
            out += [f"{f.name}.{g.name}" for g in dataclasses.fields(hints[f.name])]
        else:
            out.append(f.name)
    return out
