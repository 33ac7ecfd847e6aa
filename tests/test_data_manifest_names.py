"""Data never executes: a shard name read from a manifest is a plain file name beside it.

A manifest may come from anywhere (a download, an https URL), so a shard entry such as
``pipe:touch x; cat y`` must be refused before anything opens it. Each test writes real shards,
poisons one entry of a copy of the manifest, and checks that opening the split raises a
DataError naming the manifest, the split and the entry, and that the command's marker file was
never created.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from megaret.config import Config
from megaret.data import build_loader, open_split
from megaret.data.errors import DataError
from tests.data_fixtures import build_tiny, loader_config

FIX = ("shard names in a manifest must be plain file names inside its folder; "
       "rebuild the shards with data_tools/build_shards.py")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(tmp_path_factory.mktemp("names"))


def _poisoned(tiny, tmp_path, name_of):
    """A copy of the shard folder whose first train entry is renamed by ``name_of(real shard path)``."""
    dst = tmp_path / "copy"
    shutil.copytree(tiny.parent, dst)
    m = json.loads((dst / "manifest.json").read_text())
    entry = m["splits"]["train"]["shards"][0]
    entry["name"] = name_of(dst / entry["name"])
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst / "manifest.json", entry["name"]


def _refused(manifest_loc, name, split="train"):
    return re.escape(f"manifest {manifest_loc} split {split!r} lists shard {name!r}: {FIX}")


def _cfg(manifest, tmp_path) -> Config:
    return loader_config(manifest, tmp_path)


BAD_NAMES = {
    "pipe": lambda real, marker: f"pipe:touch {marker}; cat {real}",
    "absolute": lambda real, marker: str(real),
    "parent": lambda real, marker: "../x.tar",
    "http": lambda real, marker: "http://127.0.0.1:9/x.tar",
    "file": lambda real, marker: f"file://{real}",
    "backslash": lambda real, marker: "..\\x.tar",
    "subfolder": lambda real, marker: "sub/../../x.tar",
    "empty": lambda real, marker: "",
    "dot": lambda real, marker: ".",
    "shell": lambda real, marker: f"{real.name}; touch {marker}",
    "newline": lambda real, marker: f"{real.name}\n",
    "not-a-string": lambda real, marker: 7,
}


@pytest.mark.parametrize("kind", BAD_NAMES)
def test_bad_shard_name_is_refused_and_nothing_runs(tiny, tmp_path, kind) -> None:
    marker = tmp_path / "ran"
    manifest, name = _poisoned(tiny, tmp_path, lambda real: BAD_NAMES[kind](real, marker))
    with pytest.raises(DataError, match=_refused(manifest.resolve(), name)):
        open_split(manifest, "train", cache_dir=tmp_path / "cache")
    assert not marker.exists()
    assert open_split(manifest, "valid").num_samples > 0  # the untouched split still opens


def test_refused_through_the_trainers_loader(tiny, tmp_path) -> None:
    marker = tmp_path / "ran"
    manifest, name = _poisoned(tiny, tmp_path, lambda real: f"pipe:touch {marker}; cat {real}")
    with pytest.raises(DataError, match=_refused(manifest.resolve(), name)):
        build_loader(_cfg(manifest, tmp_path), dp_rank=0, dp_size=1)
    assert not marker.exists()


def test_user_pipe_path_does_not_let_a_name_into_the_shell(tiny, tmp_path) -> None:
    """data.paths may be a pipe: command (the user's own); a manifest name appended to it must
    still be a plain file name, or it would become part of the shell command."""
    marker = tmp_path / "ran"
    manifest, name = _poisoned(tiny, tmp_path, lambda real: f"{real.name};touch {marker}")
    loc = f"pipe:cat {manifest}"
    with pytest.raises(DataError, match=_refused(loc, name)):
        open_split(loc, "train", cache_dir=tmp_path / "cache")
    assert not marker.exists()


def test_plain_manifest_still_opens(tiny, tmp_path) -> None:
    s = open_split(tiny, "train")
    assert s.num_samples > 0 and all(sh.local == str(tiny.parent / sh.name) for sh in s.shards)
    batch = next(iter(build_loader(_cfg(tiny, tmp_path), dp_rank=0, dp_size=1)))
    assert batch["tokens"].shape == (2, 16)


def test_remote_manifest_sha_cannot_name_a_file_outside_the_cache(tiny, tmp_path) -> None:
    """A fetched shard is cached under its manifest sha256: that field must be 64 hex digits."""
    dst = tmp_path / "copy"
    shutil.copytree(tiny.parent, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["sha256"] = "../../escaped"
    (dst / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="sha256 '../../escaped' is not 64 hex digits"):
        open_split(f"pipe:cat {dst / 'manifest.json'}", "train", cache_dir=tmp_path / "cache" / "a" / "b")
    assert not list(tmp_path.rglob("escaped*"))
