"""RetNet logits and every parameter gradient at TP=2 and TP=4 equal TP=1 (2 and 4 gloo ranks).

The 2-rank launch also checks model.retention_kernel=fla against torch at TP=1 and TP=2 (a
carried state and document resets; flash-linear-attention's kernels under Triton's interpreter
in the launched ranks): one launch for both, as each costs ~15 s of imports per rank.
"""

from __future__ import annotations

import json

import pytest

from megaret.ops.retention_fla import fla_available
from tests.conftest import run_distributed


@pytest.mark.multiproc
@pytest.mark.parametrize(("nproc", "tp_sizes", "fla"), [
    pytest.param(2, (2,), True, marks=pytest.mark.kernels), (4, (2, 4), False)])
def test_retnet_tp_matches_tp1(nproc, tp_sizes, fla):
    with_fla = fla and fla_available()
    proc = run_distributed("tp_parity.py", nproc, *(["--fla"] if with_fla else []), *map(str, tp_sizes))
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    results = json.loads(line[len("RESULT "):])
    print(json.dumps(results, indent=1))
    expected = {f"{m}/tp{t}" for m in ("chunk/gelu", "parallel/swiglu") for t in tp_sizes}
    if with_fla:
        expected |= {f"fla/tp{t}" for t in (1, *tp_sizes)}
    assert set(results) == expected
    for key, r in results.items():
        assert r["logits_rel"] <= 1e-5, (key, r)
        assert r["grad_rel_max"] <= 1e-5, (key, r)
        assert key.startswith("fla/") or r["grad_norm_rel"] <= 1e-5, (key, r)
    if fla and not with_fla:
        pytest.skip("the retention_kernel=fla checks need fla-core and triton: pip install -e '.[kernels]'")
