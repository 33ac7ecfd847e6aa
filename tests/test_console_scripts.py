"""The console scripts work from a non-editable install (issue 14, item 7): the package is installed
into a temporary folder (`pip install --no-deps --target`), and each `megaret-*` script runs from
outside the checkout with that folder first on the path, importing megaret from it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

SCRIPTS = ("train", "generate", "evaluate", "export", "build-shards", "submit")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """pip builds in the source tree: it builds a copy (the package, pyproject.toml, README), so the
    checkout gains no build/ or egg-info, and no file left in an old build/lib is installed."""
    target, build, src = (tmp_path_factory.mktemp(n) for n in ("site", "build", "src"))
    shutil.copytree(REPO / "megaret", src / "megaret", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(src)], check=True, capture_output=True, timeout=300,
                   env=dict(os.environ, TMPDIR=str(build)))
    return target


def run(installed, script: str, *args: str, cwd) -> subprocess.CompletedProcess:  # noqa: ANN001
    env = dict(os.environ, PYTHONPATH=str(installed))
    return subprocess.run([sys.executable, str(installed / "bin" / f"megaret-{script}"), *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300, env=env)


def test_every_console_script_runs_from_the_installed_package(installed, tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import megaret, megaret.cli; print(megaret.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, env=dict(os.environ,
                                                                                 PYTHONPATH=str(installed)))
    assert probe.stdout.strip().startswith(str(installed)), probe.stdout + probe.stderr
    for script in SCRIPTS:
        proc = run(installed, script, "--help", cwd=tmp_path)
        usage = proc.stdout.startswith(f"usage: megaret-{script}")
        assert proc.returncode == 0 and usage, proc.stderr[-2000:]


def test_installed_build_shards_and_submit_do_real_work(installed, tmp_path):
    (tmp_path / "a.txt").write_text("the first document " * 20)
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "another document " * 20}) + "\n")
    proc = run(installed, "build-shards", "--input", "a.txt", "b.jsonl", "--output", "shards",
               "--seq-length", "16", "--vocab-size", "512", "--valid-fraction", "0.5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "shards" / "manifest.json").read_text())["splits"]
    proc = run(installed, "submit", "--config", str(REPO / "configs" / "6.7b.yaml"), "--dry-run",
               "launch.nodes=2", cwd=tmp_path)
    assert proc.returncode == 0 and "#SBATCH --nodes=2" in proc.stdout, proc.stderr[-2000:]
