"""bench/quality.py --quick: four archs trained by the trainer at equal parameters on the same
tokens, a perplexity table, loss curves from TensorBoard, a last line of name=value pairs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_quality_quick(tmp_path):
    png, out = tmp_path / "quality.png", tmp_path / "quality.json"
    names = ("quality.json", "quality.md", "quality.png")
    published = {n: (REPO / "bench" / "out" / n).read_bytes() for n in names}
    proc = subprocess.run(
        [sys.executable, "bench/quality.py", "--quick", "--out", str(tmp_path)],  # runs, plot, json, md
        capture_output=True, text=True, cwd=REPO, timeout=400, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    last = proc.stdout.rstrip("\n").splitlines()[-1].split()
    assert all("=" in p for p in last)
    pairs = dict(p.split("=", 1) for p in last)
    assert pairs["bench"] == "quality" and float(pairs["max_param_dev"]) <= 0.02
    result = json.loads(out.read_text())
    assert out.with_suffix(".md").read_text().startswith("| model |") and (tmp_path / "quality_runs").is_dir()
    # a quick run never writes over the published full-run results README shows
    assert {n: (REPO / "bench" / "out" / n).read_bytes() for n in published} == published
    assert png.is_file() and png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "| model |" in proc.stdout  # the markdown table
    trained = {r["arch"] for r in result["table"]}
    assert trained | set(result["skipped"]) == {"retnet", "transformer", "brt", "sliding"}
    assert "retnet" in trained and int(pairs["trained"]) == len(trained)
    tokens = {r["tokens"] for r in result["table"]}
    assert tokens == {int(pairs["tokens"])}  # every model saw the same number of tokens
    for r in result["table"]:
        assert f"{r['arch']}_ppl" in pairs and 1 < r["val_ppl_mean"] < 2 * 512  # vocab 512
        assert abs(r["param_ratio"] - 1) <= 0.02
        steps, losses = result["curves"][r["arch"]]["train"]  # read back from the run's TensorBoard events
        assert len(steps) == 6 and all(0 < x < 10 for x in losses)
        assert result["curves"][r["arch"]]["eval"][0]
