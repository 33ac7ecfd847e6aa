"""Data checked up front (issue 12, item 5): each misuse is one `megaret: error:` line and exit 2.

Real files throughout; three real launches of `python -m megaret.train` (one of them 2 gloo
ranks under torchrun): a dataset without a validation split stops before step 1, a lying
manifest's out-of-range token ids are refused on every rank at TP=2, and a shard truncated
under a running job is a DataError instead of a SIGBUS. build_shards runs in-process through
its `main` (the same `run_entry` path as the script).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from megaret.config import Config
from megaret.data import DataError, build_loader, open_split
from megaret.data.corpus import Source, binary_reason
from megaret.data.from_config import check_vocab
from megaret.data.loader import TokenLoader
from megaret.data.shards import build_shards
from megaret.errors import ERROR_PREFIX
from megaret.faults import plan_env
from tests.conftest import REPO
from tests.data_fixtures import WORDS, build_tiny, loader_config, write_corpus

_spec = importlib.util.spec_from_file_location("build_shards_cli", REPO / "data_tools" / "build_shards.py")
cli = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cli)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(ERROR_PREFIX)]


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    """build_shards' main in this process: (exit status, stdout, stderr)."""
    try:
        code = cli.main(list(argv))
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Packed shards, seq 16, a 300-id tokenizer, one train shard of many samples."""
    return build_tiny(tmp_path_factory.mktemp("misuse"), "packed", samples_per_shard=1000)


@pytest.fixture(scope="module")
def no_valid(tmp_path_factory):
    """One long document: every document is a training one, the valid split is empty (and warned of)."""
    root = tmp_path_factory.mktemp("novalid")
    (root / "book.txt").write_text(" ".join(WORDS[i % len(WORDS)] for i in range(3000)))
    logged: list[str] = []
    manifest = build_shards([Source("book", str(root / "book.txt"))], root / "shards", seq_length=16,
                            vocab_size=300, samples_per_shard=1000, log=logged.append)
    assert "warning: the valid split is empty (no document went to it): training with evaluation will " \
           "refuse these shards; add documents or raise --valid-fraction" in logged, logged
    return manifest


# --- build_shards: flags, binary input, skipped files, failed builds -------------------------------


@pytest.mark.parametrize("fraction", ["1.5", "-1", "0"])
def test_valid_fraction_outside_0_1_is_refused(tmp_path, capsys, fraction) -> None:
    write_corpus(tmp_path / "src", n_jsonl=0)
    code, _, err = _cli(capsys, "--input", str(tmp_path / "src" / "texts"), "--output", str(tmp_path / "out"),
                        f"--valid-fraction={fraction}", "--seq-length", "16", "--vocab-size", "300")
    assert code == 2 and _errors(err) == [
        f"{ERROR_PREFIX} --valid-fraction {float(fraction)} is outside (0, 1): give the share of documents "
        "held out for evaluation, e.g. 0.01"]
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]  # nothing written


def test_short_held_out_documents_are_warned_of() -> None:
    from megaret.data.shards.writer import split_warnings

    split = {"documents": 3, "samples": 0, "tokens": 0}
    manifest = {"sample_tokens": 2049, "splits": {"train": {**split, "samples": 9}, "valid": split}}
    assert split_warnings(manifest) == [
        "the valid split is empty (its 3 documents hold fewer than one sample of 2049 tokens): training "
        "with evaluation will refuse these shards; add documents or raise --valid-fraction"]


def test_binary_detection() -> None:
    text = "ünïcödé ✓ ".encode() * 200
    assert binary_reason(text) is None
    assert binary_reason(text + b"\xff" * 10) is None  # < 1% undecodable: kept, replaced
    assert binary_reason(text + b"\xff" * 100) == "binary: 3% of its bytes are not UTF-8"
    assert binary_reason(text + b"\0") == "binary: holds NUL bytes"


def test_binary_refused_or_skipped_and_skipped_files_counted(tmp_path, capsys) -> None:
    src = tmp_path / "mixed"
    write_corpus(tmp_path / "w", n_jsonl=0)
    shutil.copytree(tmp_path / "w" / "texts", src)
    (src / "blob.txt").write_bytes(np.random.default_rng(0).bytes(5000))  # NULs and invalid UTF-8
    for i in range(7):
        (src / f"img{i}.png").write_bytes(b"\x89PNG")
    args = ["--input", str(src), "--seq-length", "16", "--vocab-size", "300", "--valid-fraction", "0.2"]

    code, _, err = _cli(capsys, *args, "--output", str(tmp_path / "a"))
    assert code == 2
    assert _errors(err) == [f"{ERROR_PREFIX} input {src / 'blob.txt'} is not text (holds NUL bytes); "
                            "remove it from the input or pass --on-binary skip to skip and count such files"]
    assert not list(tmp_path.glob("a*"))  # the failed build left no temp folder

    code, out, err = _cli(capsys, *args, "--output", str(tmp_path / "b"), "--on-binary", "skip")
    assert code == 0 and not _errors(err), err
    assert ("skipped 8 files of mixed (1 binary, 7 unsupported suffix .png): blob.txt (binary), "
            "img0.png (unsupported suffix .png), img1.png (unsupported suffix .png), img2.png (unsupported "
            "suffix .png), img3.png (unsupported suffix .png) and 3 more") in out.splitlines()
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["sources"][0]["documents"] == 40 and m["sources"][0]["skipped_files"]["count"] == 8


def test_failed_build_leaves_no_temp_folder(tmp_path, capsys, monkeypatch) -> None:
    inputs = write_corpus(tmp_path / "src")
    args = [a for p in inputs for a in ("--input", str(p))] + ["--vocab-size", "300", "--output"]
    code, _, err = _cli(capsys, *args, str(tmp_path / "out"), "--seq-length", "100000")
    assert code == 2 and len(_errors(err)) == 1 and "fewer than seq_length+1=100001" in err
    # interrupted while encoding (Ctrl-C): the half-written shards go too
    from megaret.data.tokenizer import Tokenizer

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(Tokenizer, "encode_batch", interrupted)
    with pytest.raises(SystemExit) as stopped:  # run_entry: Ctrl-C is exit 130
        cli.main([*args, str(tmp_path / "out"), "--seq-length", "16"])
    assert stopped.value.code == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_failed_export_leaves_no_temp_file(tmp_path, monkeypatch) -> None:
    import torch

    from megaret import export as ex

    monkeypatch.setattr(ex, "export_weights", lambda c: ({"w": torch.zeros(4)}, {}, Config()))

    def disk_full(obj, path):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        ex.export(tmp_path / "ckpt", tmp_path / "model.pt")
    assert list(tmp_path.iterdir()) == []


# --- token ids against the model's vocabulary -----------------------------------------------------


def _lying_copy(tiny: Path, dst: Path, vocab: int = 256, drop_max_id: bool = False) -> Path:
    shutil.copytree(tiny.parent, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m["tokenizer"]["vocab_size"] = vocab  # the tokenizer really has 300 ids
    for split in m["splits"].values():
        for entry in split["shards"]:
            if drop_max_id:
                del entry["max_id"]  # as a manifest built before max_id was recorded
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst / "manifest.json"


def test_max_id_recorded_and_checked(tiny, tmp_path) -> None:
    s = open_split(tiny, "train")
    seen = max(int(s.read_usable(i)[0].max()) for i in range(s.num_samples))
    assert max(sh.max_id for sh in s.shards) == seen and s.shards[0].max_id >= 256
    first = s.shards[0]
    lie = tmp_path / "lie" / first.name
    with pytest.raises(DataError, match=f"shard {lie} holds token id {first.max_id}, outside "
                                        r"model.vocab_size=256 \(ids 0..255\)"):
        check_vocab(open_split(_lying_copy(tiny, tmp_path / "lie"), "train"), 256)
    # an older manifest without max_id: only the tokenizer's declared size is checked (no scan)
    check_vocab(open_split(_lying_copy(tiny, tmp_path / "old", drop_max_id=True), "train"), 256)
    old = open_split(_lying_copy(tiny, tmp_path / "old300", vocab=300, drop_max_id=True), "train")
    with pytest.raises(DataError, match="tokenizer has 300 ids but model.vocab_size=256"):
        check_vocab(old, 256)


# --- shards that change under a running job ---------------------------------------------------------


def test_shard_truncated_or_rewritten_while_open(tiny, tmp_path) -> None:
    shutil.copytree(tiny.parent, tmp_path / "d")
    s = open_split(tmp_path / "d" / "manifest.json", "train")
    shard = Path(s.shards[0].local)
    first = s.read_usable(0)[0].copy()
    data = shard.read_bytes()
    os.truncate(shard, len(data) // 3)
    with pytest.raises(DataError, match=rf"shard {shard} changed while in use \(now {len(data) // 3} bytes, "
                                        f"was {len(data)}\\)"):
        s.read_usable(0)  # a memory map would have been SIGBUS on the lost pages
    shard.write_bytes(data)  # the same bytes again: a rewrite all the same (mtime), so re-verify
    with pytest.raises(DataError, match="changed while in use"):
        s.read_usable(0)
    s2 = open_split(tmp_path / "d" / "manifest.json", "train")  # verified again: reads fine
    assert (s2.read_usable(0)[0] == first).all()
    s3 = open_split(tmp_path / "d" / "manifest.json", "train")
    os.utime(shard, ns=(0, 0))  # changed between verification and the first read
    with pytest.raises(DataError, match="changed since it was verified"):
        s3.read_usable(0)


def test_worker_error_is_one_line(tiny, tmp_path) -> None:
    shutil.copytree(tiny.parent, tmp_path / "d")
    s = open_split(tmp_path / "d" / "manifest.json", "train")
    for sh in s.shards:
        os.truncate(sh.local, 4096)
    loader = TokenLoader([s], micro_batch_size=2, dp_rank=0, dp_size=1, seed=0, num_workers=1)
    with pytest.raises(DataError) as info:
        next(iter(loader))
    assert re.fullmatch(rf"shard {tmp_path}/d/train-00000[01]\.tar changed since it was verified \(now 4096 "
                        r"bytes, was \d+\); restore it and restart \(the shard is verified again\), or "
                        "rebuild the shards", str(info.value))
    assert "\n" not in str(info.value)


# --- the trainer: real launches ---------------------------------------------------------------------

TRAIN = ["--config", "configs/tiny.yaml", "data.seq_length=16", "logging.tensorboard=false",
         "train.log_interval=1", "data.num_workers=0"]


def _train_cmd(manifest: Path, run: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "megaret.train", *TRAIN, f"data.paths=[{manifest}]", f"run.dir={run}",
            f"data.cache_dir={run.parent / 'cache'}", *extra]


def _env(**faults) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1",
            **(plan_env(**faults) if faults else {})}


def test_no_validation_split_stops_before_step_1(no_valid, tmp_path) -> None:
    run = tmp_path / "run"
    proc = subprocess.run(_train_cmd(no_valid, run, "model.vocab_size=300", "train.eval_interval=5"),
                          capture_output=True, text=True, timeout=300, cwd=REPO, env=_env())
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert _errors(proc.stderr) == [
        f"{ERROR_PREFIX} manifest {no_valid} has 0 validation samples, and evaluation is on "
        "(train.eval_steps=2, train.eval_interval=5); rebuild the shards with --valid-fraction > 0 "
        "(e.g. 0.01) and enough documents, or set train.eval_interval=0 to train without evaluation",
    ], proc.stderr
    assert "step " not in proc.stdout and not (run / "checkpoints").exists()


def test_shard_truncated_during_training_is_a_data_error(no_valid, tmp_path) -> None:
    """Also: with evaluation off (train.eval_interval=0) the same dataset trains, with a warning."""
    shutil.copytree(no_valid.parent, tmp_path / "d")
    shard = tmp_path / "d" / "train-000000.tar"
    cmd = _train_cmd(tmp_path / "d" / "manifest.json", tmp_path / "run", "model.vocab_size=300",
                     "train.eval_interval=0", "train.steps=60", "checkpoint.interval=1000")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env=_env(sleep_each_step_s=0.2))
    steps = 0
    for line in proc.stdout:
        if line.startswith("step "):
            steps += 1
            if steps == 2:
                os.truncate(shard, shard.stat().st_size // 4)
                break
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, f"{proc.returncode} (-7/135 would be SIGBUS)\n{out[-2000:]}\n{err[-3000:]}"
    assert "megaret: warning: evaluation is off (train.eval_interval=0, train.eval_steps=2)" in err
    assert len(_errors(err)) == 1 and _errors(err)[0].startswith(
        f"{ERROR_PREFIX} shard {shard} changed while in use (now {shard.stat().st_size} bytes, was "), err


def test_out_of_range_ids_refused_on_every_rank_at_tp2(tiny, tmp_path) -> None:
    """Two gloo ranks started as torchrun starts them (its variables), but without its agent, so
    each rank's own exit status and stderr are seen (torchrun stops the peers of the first rank
    that exits, racing their own exit)."""
    manifest = _lying_copy(tiny, tmp_path / "lie")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = _train_cmd(manifest, tmp_path / "run", "model.vocab_size=256", "parallel.tensor=2",
                     "train.eval_steps=0")
    ranks = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                         env={**_env(), "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2",
                              "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        for r in range(2)
    ]  # fmt: skip
    done = [(p, *p.communicate(timeout=300)) for p in ranks]
    for p, out, err in done:
        assert p.returncode == 2, f"{p.returncode}\n{out[-2000:]}\n{err[-3000:]}"
        assert len(_errors(err)) == 1, err
    shard = tmp_path / "lie" / "train-000000.tar"
    assert _errors(done[0][2])[0].startswith(f"{ERROR_PREFIX} shard {shard} holds token id ")
    assert "outside model.vocab_size=256 (ids 0..255)" in done[0][2]
    # rank 1 waited for rank 0's check and stops with its own one line (which refers to rank 0)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_build_loader_checks_the_eval_split_from_the_manifest(no_valid, tmp_path) -> None:
    cfg = loader_config(no_valid, tmp_path, vocab_size=300)
    with pytest.raises(DataError, match="has 0 validation samples"):
        build_loader(cfg, 0, 1, split="valid")
    m = json.loads(no_valid.read_text())
    del m["splits"]["valid"]
    (tmp_path / "m.json").write_text(json.dumps(m))
    cfg.data.paths = [str(tmp_path / "m.json")]
    with pytest.raises(DataError, match="has no validation split, and evaluation is on"):
        build_loader(cfg, 0, 1, split="valid")
