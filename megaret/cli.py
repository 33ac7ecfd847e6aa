"""The console scripts (`[project.scripts]` in pyproject.toml): each runs one entry point and returns
its exit status, so a non-editable `pip install` has every command the README shows."""

from __future__ import annotations


def train() -> int:
    from megaret.train.__main__ import main

    return main()


def generate() -> int:
    from megaret.generate import main

    main()  # returns the ids; a refusal exits 2 inside
    return 0


def evaluate() -> int:
    from megaret.evaluate import main

    main()  # returns the summary; a refusal exits 2 inside
    return 0


def export() -> int:
    from megaret.export import main

    return main()


def build_shards() -> int:
    from megaret.data.shards_cli import main

    return main()


def submit() -> int:
    from megaret.launch.submit import main

    return main()
