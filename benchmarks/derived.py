"""DERIVED benchmark inputs (``data_prep.derive``): made once into a work folder, in a child
process so that the measuring process stays small, and reused by reruns."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def derived_file(src: Path, out: Path, cells: int, depth: int, seed: int) -> Path:
    """``out``: ``cells`` cells derived from the real file ``src`` at ``depth`` (made if it is
    not there yet)."""
    if not out.exists():
        subprocess.run([sys.executable, "-m", "data_prep.derive", str(src), "--cells", str(cells),
                        "--depth", str(depth), "--out", str(out), "--seed", str(seed)],
                       check=True, cwd=REPO)
    return out
