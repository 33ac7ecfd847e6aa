"""The benchmarks run in --quick mode, print their JSON and a last line of name=value pairs,
and write their plot. Timings are not asserted (shared CPUs); exact accounting is."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def run_bench(script: str, tmp_path, where: str = "plot") -> tuple[dict, dict]:
    """where: "plot" (--plot FILE), "out" (--out DIR) or "default" (neither: a quick run's own
    default place, bench/out/quick/)."""
    png = {"plot": tmp_path / f"{script}.png", "out": tmp_path / "out" / f"{script}.png",
           "default": REPO / "bench" / "out" / "quick" / f"{script}.png"}[where]
    args = {"plot": ["--plot", str(png)], "out": ["--out", str(png.parent)], "default": []}[where]
    published = REPO / "bench" / "out" / f"{script}.png"
    before = published.read_bytes() if published.exists() else None
    proc = subprocess.run(
        [sys.executable, f"bench/{script}.py", "--quick", *args],
        capture_output=True, text=True, cwd=REPO, timeout=240, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.rstrip("\n").splitlines()
    last = lines[-1].split()
    pairs = dict(p.split("=", 1) for p in last)
    assert all("=" in p for p in last) and pairs["bench"] == script
    result = json.loads("\n".join(lines[:-1]))
    assert png.is_file() and png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    # a quick run never writes over the published full-run figure README shows
    assert (published.read_bytes() if published.exists() else None) == before
    return result, pairs


def test_retention_forms_quick(tmp_path):
    result, pairs = run_bench("retention_forms", tmp_path, "default")
    assert {"T", "speedup", "memory_ratio", "goal_speed_8x", "goal_memory_1_8"} <= set(pairs)
    rows = {r["T"]: r for r in result["table"]}
    # memory is measured, not timed: the quadratic form needs more than the chunkwise one at 2048
    assert rows[2048]["chunk_mib"] < rows[2048]["parallel_mib"]


def test_decoding_quick(tmp_path):
    result, pairs = run_bench("decoding", tmp_path, "out")
    assert float(pairs["b1_retnet_memory_growth"]) == 1.0  # the recurrent state does not grow
    for row in result["table"]:
        assert row["bytes_ratio"] > 1 and row["transformer_state_mib"] > row["retnet_state_mib"]
    by = {(r["batch"], r["length"]): r for r in result["table"]}
    (b, lo), (_, hi) = min(by), max(by)
    kv_lo, kv_hi = by[(b, lo)]["transformer_state_mib"], by[(b, hi)]["transformer_state_mib"]
    assert kv_hi == pytest.approx(kv_lo * hi / lo, rel=1e-3)  # the KV cache grows with the context


def test_train_throughput_quick(tmp_path):
    result, pairs = run_bench("train_throughput", tmp_path)
    assert 0.9 < float(pairs["param_ratio"]) < 1.1  # equal parameters by construction
    assert all(r["retnet_tokens_per_s"] > 0 and r["transformer_tokens_per_s"] > 0 for r in result["table"])
