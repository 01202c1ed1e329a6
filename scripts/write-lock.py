"""Write constraints.lock.txt from a `pip install --dry-run --report` (see `make lock`).

Every resolved distribution but the project itself and :data:`OMITTED`, as
``name==version --hash=sha256:...`` of the very file pip chose, sorted by name. The omitted ones
are listed in the lock's header (``# omitted: NAME: why``), where ``scripts/check-install.py``
reads them: `pip check` may report them missing, nothing else.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HEADER = """\
# The full resolved set of `pip install -c constraints.txt -e .[dev]` on the CPU machines (Python 3.11,
# Linux x86_64), every file pinned by sha256: `make` and CI install exactly this, so a new release of any
# dependency cannot change a fresh install. torch is the local CPU wheel (/opt/wheels, found by
# `pip install torch==2.13.0`); its hash is that file's. Regenerate with `make lock` after editing
# pyproject.toml or constraints.txt. GPU clusters install from environment.yml (CUDA torch) instead.
"""

#: Declared by a dependency but imported by nothing that runs here. Left out of the lock, each
#: with the reason, which `make lock` writes into the header.
OMITTED = {
    "bitsandbytes": (
        "pyiqa's metadata requires it, but no pyiqa module imports it (tests/test_packaging.py checks); "
        "where it is installed peft and diffusers import it at start-up, 1.5-1.8 s of every stage process (measured), "
        "and it is 125 MB"
    ),
}


def header() -> str:
    return HEADER + "".join(f"# omitted: {name}: {why}\n" for name, why in OMITTED.items())


def lock_lines(report: dict, project: str = "tvt") -> list[str]:
    lines = []
    for item in sorted(report["install"], key=lambda i: i["metadata"]["name"].lower()):
        name, version = item["metadata"]["name"], item["metadata"]["version"]
        if name == project or name.lower() in OMITTED:
            continue
        hashes = item["download_info"].get("archive_info", {}).get("hashes", {})
        if "sha256" not in hashes:
            raise SystemExit(f"{name} {version}: pip reported no sha256 (from {item['download_info']['url']})")
        lines.append(f"{name}=={version} --hash=sha256:{hashes['sha256']}")
    return lines


if __name__ == "__main__":
    report_path, out = sys.argv[1:3]
    Path(out).write_text(header() + "\n".join(lock_lines(json.loads(Path(report_path).read_text()))) + "\n")
    print(f"wrote {out}")
