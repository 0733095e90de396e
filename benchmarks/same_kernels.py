"""Which cells of the A/B compile to the same GPU program in two checkouts: ``python3 -m benchmarks same``.

Runs on any machine (no GPU): each cell of :mod:`benchmarks.ab` (variant default, head dim, length,
causal or not, forward or forward+backward) is lowered for CUDA in this tree and in ``--base``, and
the two lowerings are compared: every Mosaic GPU kernel's module (printed without source locations,
so moved or renamed Python lines do not count) and the XLA program around the kernels. A cell whose
lowerings are equal runs the same instructions in both builds, so its A/B ratio can only differ
from 1 by the measurement's own spread; the cells that differ are the ones a GPU A/B must time.

Why this exists: a refactor of the kernel layer (shared helpers, renamed statics) should leave the
compiled kernels alone, and that is checkable exactly and cheaply here, while GPU time is scarce
and a timed A/B resolves a change only down to its run-to-run spread (about 1-2 % on the H100).

The lowering is the one a GPU would run: ``jax.default_backend`` is made to answer "gpu" so the
library picks its kernels (not the interpreter, not the XLA fallback), and the tuning tables are
read for a CPU device kind, which selects the Hopper table as on the H100 and H200.
"""

import hashlib
import json
import os
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.ab import HEADS, HERE, _fn, cell_parser, installed, parse_cells  # noqa: E402

__all__ = ["lowering_digest", "main"]


def _custom_calls(op, found):
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                if inner.operation.name == "stablehlo.custom_call":
                    found.append(inner.operation)
                _custom_calls(inner.operation, found)
    return found


def _kernel_text(module_bytes):
    """A Mosaic GPU kernel's serialized module as text without source locations."""
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jax.experimental.mosaic.gpu import dialect as mgpu_dialect

    with jax_mlir.make_ir_context() as ctx:
        mgpu_dialect.register_dialect(ctx)
        # the module is in Mosaic GPU's versioned (serialized) form, whose ops carry the
        # `stable_mosaic_gpu.` prefix of no registered dialect
        ctx.allow_unregistered_dialects = True
        text = ir.Module.parse(module_bytes).operation.get_asm(enable_debug_info=False)
    # the dump name counts the kernels lowered so far in the process
    return _canonical(re.sub(r'mosaic_gpu\.dump_basename = "[^"]*"', "", text))


_DEFINITION = re.compile(r"^\s*(%\d+)(?::\d+)? = ")
_CONSTANT = re.compile(r'^\s*(%\d+) = "[\w.]*arith\.constant"\(\) \{value = (.*)\} : \(\) -> (.*)$')
_VALUE = re.compile(r"%\d+\b")


def _canonical(text):
    """``text`` with every constant written at its uses and the other values renamed in order.

    The lowering hoists a kernel's constants in the order its Python code first asks for them, so
    two orders of the same scalar arithmetic give the same instructions but other value names.
    Here each use is resolved to its definition as MLIR scopes it (the innermost open region
    that defines the name: nested isolated regions number their values afresh), a constant's
    uses become its value, and every other value is named by the order of its definition: an
    alpha-renaming, so two texts are equal only for the same program."""
    scopes, count, out = [{}], 0, []

    def lookup(m):
        for scope in reversed(scopes):
            if m.group(0) in scope:
                return scope[m.group(0)]
        return m.group(0)  # not defined in this text (cannot happen in a verified module)

    for line in text.splitlines():
        stripped = line.lstrip()
        if stripped.startswith("})"):
            scopes.pop()
        elif stripped.startswith("}, {"):
            scopes[-1] = {}
        constant = _CONSTANT.match(line)
        if constant:
            scopes[-1][constant.group(1)] = f"const<{constant.group(2)} : {constant.group(3)}>"
            continue
        definition = _DEFINITION.match(line)
        head, body = "", line
        if definition:  # rename the result before the uses (an op never uses its own result)
            name = definition.group(1)
            renamed = f"%v{count}"
            count += 1
            head = line[:definition.end()].replace(name, renamed, 1)
            body = line[definition.end():]
        body = _VALUE.sub(lookup, body)
        if definition:
            scopes[-1][name] = renamed
        out.append(head + body)
        if line.rstrip().endswith("({"):
            scopes.append({})
    return "\n".join(out)


def lowering_digest(fn, *args):
    """``(program, kernels)``: a digest of the CUDA lowering of ``fn(*args)`` outside the Mosaic
    GPU kernels, and one digest per kernel (in program order), all free of source locations."""
    from jax._src.lib.mlir import ir

    lowered = fn.trace(*args).lower(lowering_platforms=("cuda",))
    module = lowered.compiler_ir("stablehlo")
    kernels = []
    with module.context:
        for call in _custom_calls(module.operation, []):
            if ir.StringAttr(call.attributes["call_target_name"]).value != "mosaic_gpu_v2":
                continue
            config = call.attributes["mhlo.backend_config"]
            text = _kernel_text(ir.StringAttr(config["module"]).value_bytes)
            digest = hashlib.sha256(text.encode()).hexdigest()
            kernels.append(digest)
            # the outer program's digest sees the kernel by its location-free digest only
            call.attributes["mhlo.backend_config"] = ir.DictAttr.get(
                {"module": ir.StringAttr.get(digest)})
        program = module.operation.get_asm(enable_debug_info=False)
    # the module's name is the traced function's, which both builds share
    return hashlib.sha256(program.encode()).hexdigest(), kernels


def _changed(new, base):
    """Indices of the kernels that differ, or None when the builds lower to different counts."""
    if len(new) != len(base):
        return None
    return [i for i, (a, b) in enumerate(zip(new, base, strict=True)) if a != b]


def main(argv=None):
    parser = cell_parser("python3 -m benchmarks same", __doc__.split("\n\n")[0])
    args, cells = parse_cells(parser, argv)
    # the library picks the GPU kernels when it believes it runs on a GPU
    jax.default_backend = lambda: "gpu"
    builds = {"new": (HERE, {}), "base": (os.path.abspath(args.base), {})}
    print(f"new {HERE}, base {builds['base'][0]}", flush=True)
    rows = []
    for D, N, B, causal, mode, name in cells:
        x = jax.ShapeDtypeStruct((B, N, HEADS, D), jnp.bfloat16)
        got, errors = {}, {}
        for build, (root, modules) in builds.items():
            with installed(root, modules) as jaxattn:
                try:
                    got[build] = lowering_digest(_fn(jaxattn, name, causal, mode), x, x, x)
                except Exception as e:  # noqa: BLE001 - reported as the cell's result
                    errors[build] = f"{type(e).__name__}: {str(e)[:200]}"
                    got[build] = (None, [])
        (p_new, k_new), (p_base, k_base) = got["new"], got["base"]
        row = dict(variant=name, D=D, N=N, B=B, causal=causal, mode=mode, errors=errors,
                   same_program=not errors and p_new == p_base, kernels_new=len(k_new),
                   kernels_base=len(k_base), kernels_changed=_changed(k_new, k_base))
        row["same"] = row["same_program"] and row["kernels_changed"] == []
        rows.append(row)
        what = (f"ERROR {errors}" if errors else "same" if row["same"] else
                f"DIFFERENT (program {'same' if row['same_program'] else 'differs'}, "
                f"kernels {len(k_new)} vs {len(k_base)}, changed {row['kernels_changed']})")
        print(f"{name:<12} D={D:<4} N={N:<6} causal={int(causal)} {mode:<7} {what}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(rows=rows), f, indent=1)
    print(f"\n{sum(r['same'] for r in rows)} of {len(rows)} cells lower to the same program and "
          f"kernels in both builds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
