"""Run flash-linear-attention's Triton kernels on a CPU under Triton's interpreter (test only).

`install()` must run before anything imports triton (megatron-core does, when triton is
installed), so the kernels tests call it first thing in a process of their own (tests/kernels/
ops_parity.py and tests/distributed/tp_parity.py --fla, launched by pytest): the interpreter never
reaches the pytest process or any other test. ops_parity.py installs it only without CUDA (with
CUDA it runs the real compiled kernels); the gloo ranks of tp_parity.py compute on CPU, so they
always do.

What the interpreter needs (verified with fla-core 0.6.0 and triton 3.9.0 / 3.8.0):
- TRITON_INTERPRET=1 before triton is imported (`triton.jit` picks the interpreter at import);
- FLA_CACHE_RESULTS=0 (fla's autotune disk cache asks the GPU driver);
- autotuning without a driver to benchmark with: keep the first config left after pruning and
  never benchmark (the interpreter's result does not depend on the config);
- `for i in range(n)` binds a Python int in the interpreter where compiled code has an int32
  tensor, and fla calls `i.to(tl.int64)` on such loop variables: wrap each `range` loop
  variable in `interpreter_semantic.to_tensor`, as the interpreter already does for assignments.
"""

from __future__ import annotations

import ast
import os
import sys


def interpreted() -> bool:
    """True where the kernels must run under the interpreter (no CUDA device)."""
    import torch

    return not torch.cuda.is_available()


def install() -> bool:
    """Set up the interpreter for this process (kernels on CPU tensors); returns True."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernels_adapters.install() must run before triton is imported")
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["FLA_CACHE_RESULTS"] = "0"
    from triton.runtime import autotuner, interpreter

    if getattr(autotuner.Autotuner, "_megaret_interpreted", False):
        return True
    prune = autotuner.Autotuner.prune_configs

    def first_config(self: autotuner.Autotuner, kwargs: dict) -> list:
        return prune(self, kwargs)[:1]  # one config left: run() then never benchmarks

    def no_bench(self: autotuner.Autotuner, *args: object, config: object, **meta: object) -> list[float]:
        return [0.0, 0.0, 0.0]

    def visit_for(self: ast.NodeTransformer, node: ast.For) -> ast.For:
        node = self.generic_visit(node)
        loop = node.iter
        is_range = isinstance(loop, ast.Call) and (
            (isinstance(loop.func, ast.Name) and loop.func.id == "range")
            or (isinstance(loop.func, ast.Attribute) and loop.func.attr == "range"))
        if is_range and isinstance(node.target, ast.Name):
            name = node.target.id
            wrap = ast.parse(f"{name} = interpreter_semantic.to_tensor({name}, False)").body[0]
            node.body.insert(0, ast.copy_location(wrap, node))
            ast.fix_missing_locations(node)
        return node

    autotuner.Autotuner.prune_configs = first_config
    autotuner.Autotuner._bench = no_bench
    interpreter.ASTTransformer.visit_For = visit_for
    autotuner.Autotuner._megaret_interpreted = True
    return True
