"""`python launcher/submit.py --config configs/6.7b.yaml [...]`: the README's command, kept as a thin
wrapper over megaret/launch/submit.py (installed as the console script `megaret-submit`)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout run without an install

from megaret.launch.submit import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
