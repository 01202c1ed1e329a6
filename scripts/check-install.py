"""`pip check`, allowing exactly what the lock omits on purpose (see `make venv`).

The lock leaves out dependencies that a package declares but nothing here imports, each named
with its reason in a ``# omitted: NAME: why`` header line (scripts/write-lock.py). `pip check`
reports those as missing; this passes such lines and fails on anything else pip reports, so
a broken or inconsistent install still stops `make`.

    python scripts/check-install.py constraints.lock.txt
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

MISSING = re.compile(r"^\S+ \S+ requires (\S+), which is not installed\.$")


def omitted(lock: str) -> set[str]:
    """The names the lock's header declares omitted."""
    return {m.group(1).lower() for m in re.finditer(r"^# omitted: ([A-Za-z0-9_.\-]+):", lock, re.MULTILINE)}


def problems(pip_check_output: str, allowed: set[str]) -> list[str]:
    """pip's report lines other than "X requires NAME, which is not installed." for an allowed NAME."""
    left = []
    for line in filter(None, (raw.strip() for raw in pip_check_output.splitlines())):
        found = MISSING.match(line)
        if not (found and found.group(1).lower() in allowed):
            left.append(line)
    return left


if __name__ == "__main__":
    allowed = omitted(Path(sys.argv[1]).read_text())
    proc = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True, check=False)
    output = proc.stdout + proc.stderr
    left = problems(output, allowed) if proc.returncode else []
    if proc.returncode and (left or not output.strip()):
        sys.exit("pip check: " + ("; ".join(left) or f"failed with exit status {proc.returncode}"))
    print(f"pip check: consistent (omitted on purpose: {', '.join(sorted(allowed)) or 'none'})")
