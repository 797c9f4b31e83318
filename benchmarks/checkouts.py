"""Running a benchmark's measuring program with the code of another checkout of this repository.

Comparisons with an earlier commit (``--previous DIR``, a ``git worktree add DIR <commit>``)
run the same small program once per checkout, each in a fresh interpreter, so neither
checkout's imports or caches reach the other's figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def run_in_checkout(program: str, repo: Path, *args: object, env: dict | None = None) -> dict:
    """Run ``program`` (Python source) in a fresh interpreter started in checkout ``repo``, with
    ``sys.argv[1:]`` = ``repo`` and ``args`` (the program puts ``repo`` first on ``sys.path``
    itself); return the JSON object on the last line it prints. Raises RuntimeError with the end
    of its stderr if it fails."""
    proc = subprocess.run([sys.executable, "-c", program, str(repo), *map(str, args)],
                          cwd=repo, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})},
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"the measuring program failed in checkout {repo}:\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
