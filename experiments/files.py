"""What every experiment does with files: versions, JSON-safe values, atomic writes, resumable parts.

A run's results live in ``<out_dir>/<preset>-<digest>.json``; the units it finishes (a trained
model, a study) in ``<preset>-<digest>.parts/<unit>.json``, each stored with the config and versions
it was made under (its *identity*), so that a rerun reuses exactly the units that match and
recomputes the others (another device kind or package version recomputes).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import platform
import tempfile

import jax
import numpy as np

__all__ = ["versions", "jsonable", "write_atomic", "result_path", "parts_dir", "identity",
           "load_part", "resume_part", "write_part"]


def versions(*modules: str) -> dict:
    """Versions of everything that could change the numbers: Python, jax, jaxlib, numpy, jaxattn,
    the platform and device, and each named module (``"flax"``, ``"orbax.checkpoint"``, ...)."""
    import jaxlib

    import jaxattn

    out = {"python": platform.python_version(), "jax": jax.__version__,
           "jaxlib": jaxlib.__version__, "numpy": np.__version__, "jaxattn": jaxattn.__version__}
    for name in modules:
        out[name.replace(".", "-")] = importlib.import_module(name).__version__
    dev = jax.devices()[0]
    out.update(platform=platform.platform(), backend=jax.default_backend(),
               device=getattr(dev, "device_kind", dev.platform))
    return out


def jsonable(obj):
    """numpy arrays and scalars as lists and Python numbers (NaN kept: ``json`` writes ``NaN``)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def write_atomic(path, text: str) -> None:
    """Writes ``text`` to ``path`` so that a reader (or a rerun after a kill) sees the old file or
    the whole new one: a temporary file in the same folder (one filesystem), then ``os.replace``."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _stem(config) -> str:
    return f"{config.preset}-{config.digest()}"


def result_path(config) -> pathlib.Path:
    """The results JSON of a config (its ``out_dir``, ``preset`` and ``digest()``)."""
    return pathlib.Path(config.out_dir) / f"{_stem(config)}.json"


def parts_dir(config) -> pathlib.Path:
    """The folder of a config's finished units."""
    return pathlib.Path(config.out_dir) / f"{_stem(config)}.parts"


def identity(config, vers: dict, skip=("out_dir",)) -> dict:
    """What a stored unit must match to be reused: the config less ``skip`` (fields that change no
    number, such as the output folder) and the versions, as JSON would return them."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k not in skip}
    return json.loads(json.dumps(jsonable({"config": fields, "versions": vers})))


def write_part(path, ident: dict, field: str, value, indent=None) -> None:
    """Stores ``value`` under ``field`` beside its identity, atomically."""
    write_atomic(path, json.dumps(jsonable({**ident, field: value}), indent=indent))


def load_part(path, ident: dict, field: str):
    """``(value, None)`` if ``path`` holds ``field`` stored under ``ident``; else ``(None, why)``,
    with ``why`` None when there is no file."""
    path = pathlib.Path(path)
    if not path.exists():
        return None, None
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError) as err:  # writes are atomic, so only an edited file gets here
        return None, f"unreadable ({err})"
    if not isinstance(stored, dict) or field not in stored:
        return None, f"no {field} in it"
    for part in ("config", "versions"):
        want, got = ident[part], stored.get(part) or {}
        diff = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
        if diff:
            return None, f"another {part} ({', '.join(diff)} differ)"
    return stored[field], None


def resume_part(path, ident: dict, field: str, say):
    """:func:`load_part`'s value, or None after saying why the file there is not reused."""
    value, why = load_part(path, ident, field)
    if why:
        say(f"recomputing {pathlib.Path(path).name}: {why}")
    return value
