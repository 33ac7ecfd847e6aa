"""Run several megaret command lines in one process, one after another, paying the imports once.

    python -m tests.cli_batch CASES.json OUTDIR

CASES.json is a list of {"name", "module", "argv"}; each case runs ``<module>.main(argv)`` as
``python -m <module> argv`` would (its exit status from SystemExit: run_entry's 2 for a user
error, 0 for a return) with stdout and stderr in OUTDIR/<name>.out / .err. OUTDIR/results.json
gets {name: {"rc", "seconds"}}. The fault plan and the environment are the process's own.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import sys
import time
import traceback
from pathlib import Path


def run_case(module: str, argv: list[str]) -> int:
    try:
        rc = importlib.import_module(module).main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - a crash is this case's status 1, as in its own process
        traceback.print_exc()
        return 1
    return rc if isinstance(rc, int) else 0


def main() -> None:
    cases, out = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2])
    results = {}
    for case in cases:
        t0 = time.perf_counter()
        with open(out / f"{case['name']}.out", "w") as o, open(out / f"{case['name']}.err", "w") as e, \
                contextlib.redirect_stdout(o), contextlib.redirect_stderr(e):
            rc = run_case(case["module"], case["argv"])
        results[case["name"]] = {"rc": rc, "seconds": time.perf_counter() - t0}
    (out / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
