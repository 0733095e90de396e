"""The experiments' command lines: every config field is a flag, read by one rule."""

from __future__ import annotations

import argparse
import dataclasses

__all__ = ["convert", "parser", "config"]

_NONE = ("", "none", "None")


def convert(name: str, text: str, default):
    """``text`` of the flag ``--name`` as a value of the type of the field's ``default``.

    Tuples are comma-separated (items of the type of the default's first item, else strings),
    bools are ``1/true/yes`` or ``0/false/no``, a string field (or one whose default is None)
    takes a string, or ``none`` for None.

    Raises:
      SystemExit: naming the flag, when ``text`` cannot be read.
    """
    flag = "--" + name.replace("_", "-")
    try:
        if default is None or isinstance(default, str):  # e.g. implementation: "pallas" or none
            return None if text in _NONE else text
        if isinstance(default, tuple):
            kind = type(default[0]) if default else str
            return tuple(kind(x) for x in text.split(",") if x)
        if isinstance(default, bool):
            word = text.strip().lower()
            if word in ("1", "true", "yes"):
                return True
            if word in ("0", "false", "no"):
                return False
            raise ValueError(text)
        return type(default)(text)
    except ValueError as err:
        kind = "comma-separated list" if isinstance(default, tuple) else type(default).__name__
        raise SystemExit(f"{flag}: cannot read {text!r} as {kind}") from err


def parser(prog: str, doc: str, config_cls, presets: dict, *, default: str,
           resume: bool = True, progress: bool = True) -> argparse.ArgumentParser:
    """The command line of an experiment: ``--preset``, ``--out`` (``--out-dir``), ``--no-plot``,
    ``--no-resume`` and ``--no-progress`` where the experiment has them, and one flag per other
    field of ``config_cls`` that overrides the preset's value."""
    p = argparse.ArgumentParser(prog=f"python -m {prog}", description=doc.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(presets), default=default)
    p.add_argument("--out", "--out-dir", dest="out_dir", default=None,
                   help="output folder (the preset's out_dir by default)")
    if resume:
        p.add_argument("--no-resume", action="store_true", help="recompute every unit")
    p.add_argument("--no-plot", action="store_true", help="write the JSON only")
    if progress:
        p.add_argument("--no-progress", action="store_true", help="no progress bars")
    for f in dataclasses.fields(config_cls):
        if f.name not in ("preset", "out_dir"):
            p.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                           help=f"override the preset's {f.name} (tuples: comma-separated)")
    return p


def config(args, config_cls, presets: dict):
    """The preset ``args.preset`` with every flag given on the command line applied."""
    base = presets[args.preset]
    overrides = {f.name: convert(f.name, getattr(args, f.name), getattr(base, f.name))
                 for f in dataclasses.fields(config_cls)
                 if f.name not in ("preset", "out_dir") and getattr(args, f.name) is not None}
    if args.out_dir is not None:
        overrides["out_dir"] = args.out_dir
    return dataclasses.replace(base, **overrides)
