"""`python data_tools/build_shards.py --input PATH [PATH ...] --output DIR [...]`: the README's command,
kept as a thin wrapper over megaret/data/shards_cli.py (the console script `megaret-build-shards`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout run without an install

from megaret.data.shards_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
