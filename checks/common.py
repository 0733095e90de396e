"""What the GPU check scripts share: the no-GPU guard and ``--set`` parsing."""

import dataclasses
import sys

import jax


def gpu_missing(explicit: bool, what: str, hint: str) -> bool:
    """True (after a message on stderr) when JAX has no GPU and the caller did not ask for the
    interpreter (``explicit``): the GPU checks at realistic sizes would run for hours in the CPU
    interpreter, so they say so at once instead (``main`` then exits with status 2)."""
    backend = jax.default_backend()
    if backend == "gpu" or explicit:
        return False
    print(f"{what} needs a GPU (the JAX backend is {backend!r}); {hint}", file=sys.stderr)
    return True


def parse_overrides(text, cls):
    """``"intra_overlap=1,pingpong=0"`` -> ``{"intra_overlap": True, "pingpong": False}``: fields
    of the dataclass ``cls`` (``--set``); bool fields by the field's default type, else int."""
    fields = {f.name: type(f.default) for f in dataclasses.fields(cls)}
    out = {}
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in fields:
            raise SystemExit(f"--set: {key!r} is not a {cls.__name__} field ({', '.join(fields)})")
        try:
            number = int(value)
        except ValueError:
            raise SystemExit(f"--set: {item!r}: the value must be an integer (0 / 1 for a bool "
                             "field)") from None
        out[key] = bool(number) if fields[key] is bool else number
    return out
