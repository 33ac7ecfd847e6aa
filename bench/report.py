"""What every benchmark ends with: a JSON object, a PNG (matplotlib, Agg) and a last line of
name=value pairs that CI and the README quote."""

from __future__ import annotations

import argparse
import json
import resource
import sys
from pathlib import Path
from typing import Any

OUT_DIR = Path(__file__).resolve().parent / "out"  # the published full-run results README shows
QUICK_DIR = OUT_DIR / "quick"  # --quick runs (CI, checking an install): scratch, git-ignored


def add_out_arg(ap: argparse.ArgumentParser) -> None:
    """`--out DIR`: where the bench writes its files (its own --plot/--json still win)."""
    ap.add_argument("--out", default=None,
                    help="folder for the plot and JSON (default: bench/out/, bench/out/quick/ with --quick)")


def out_path(quick: bool, name: str, out: str | None = None) -> str:
    """Where a bench writes `name` by default: `--out` if given, else bench/out/ for a full run and
    bench/out/quick/ for a --quick one, so a quick run never overwrites the published figures."""
    return str((Path(out) if out else QUICK_DIR if quick else OUT_DIR) / name)


def peak_rss_bytes() -> int:
    """This process's resident high-water mark (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else 0.5 * (s[len(s) // 2 - 1] + s[len(s) // 2])


def save_plot(path: Path, panels: list[dict[str, Any]], title: str) -> str:
    """panels: [{"title", "xlabel", "ylabel", "series": {label: (xs, ys)}, "logx", "logy"}] side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, p in zip(axes[0], panels, strict=True):
        for label, (xs, ys) in p["series"].items():
            pts = [(x, y) for x, y in zip(xs, ys, strict=True) if y is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=label)
        ax.set_title(p["title"])
        ax.set_xlabel(p["xlabel"])
        ax.set_ylabel(p["ylabel"])
        if p.get("logx", True):
            ax.set_xscale("log", base=2)
        if p.get("logy", True):
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def emit(name: str, result: dict[str, Any], pairs: dict[str, Any]) -> None:
    """Print the JSON result, then `bench=<name> k=v ...` as the last line."""
    print(json.dumps(result, indent=1, default=str))

    def fmt(v: Any) -> str:
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    print(" ".join([f"bench={name}", *(f"{k}={fmt(v)}" for k, v in pairs.items())]))
    sys.stdout.flush()
