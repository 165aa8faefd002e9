"""How long the command takes to answer what needs no model: --help, --version, a mistyped folder, a Hub id
offline and with the Hub unreachable. Prints a table against the bounds a user expects (issue 13: 1 s for
--help/--version, 2 s for the errors); exits 1 if one is over.

    python scripts/cli_latency.py
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time

CASES = [  # (what, arguments, extra environment, bound in seconds)
    ("--help", ["--help"], {}, 1.0),
    ("--version", ["--version"], {}, 1.0),
    ("mistyped local folder", ["examples/tiny-llava", "--dry-run"], {}, 2.0),
    ("Hub id, offline", ["llava-hf/llava-1.5-7b-hf", "--dry-run"], {"HF_HUB_OFFLINE": "1"}, 2.0),
    ("Hub id, Hub unreachable", ["llava-hf/llava-1.5-7b-hf", "--dry-run"], {"HF_ENDPOINT": "http://127.0.0.1:9"}, 2.0),
]


def main() -> int:
    exe = shutil.which("shortv-export") or sys.exit("shortv-export is not installed (pip install -e .)")
    over = 0
    print("| case | seconds | bound | exit | first line |\n|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "examples", "tiny-llava-easyvqa"))
        for what, args, env, bound in CASES:
            start = time.perf_counter()
            proc = subprocess.run(
                [exe, *args], cwd=tmp, env={**os.environ, "HF_HOME": tmp, **env}, capture_output=True, text=True
            )
            took = time.perf_counter() - start
            first = (proc.stdout or proc.stderr).strip().splitlines()[0][:90]
            over += took > bound
            print(f"| {what} | {took:.2f} | {bound:.0f} | {proc.returncode} | {first} |")
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
