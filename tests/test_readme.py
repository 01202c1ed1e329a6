"""The README's commands work as written on a clean clone (issue 15, finding 4).

Every command of the README's ``bash`` blocks is either run here — in a scratch copy of the
project, with only the environment's ``bin`` on PATH as after ``source .venv/bin/activate``,
and no ``TVT_*`` variable — or listed in :data:`COVERED_ELSEWHERE` with the test that runs it.
A command added to the README without either fails :func:`test_every_readme_command_is_classified`.
Pipeline commands run as Snakemake dry-runs (``-n``): the DAG, config and rules are what breaks.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from workflow_support import _project_copy

from tvt import config

ROOT = config.REPO_ROOT
BIN = Path(sys.executable).parent
#: commands run here as written (snakemake: as a dry run)
RUN_HERE = ("tvt workflow ", "tvt where", "tvt config validate ", "tvt --version", "snakemake --cores ",
            "source .venv/bin/activate", "SD=$(tvt where ")
#: expensive or needing what a test machine lacks, with the test that covers each
COVERED_ELSEWHERE = {
    "make demo": "the pipeline: tests/test_workflow.py::test_pipeline_end_to_end_keyed_cached_and_tracked",
    "make test": "this suite",
    "tvt sr ": "tests/test_sr.py (--tagger: tests/test_sr_tagger.py)",
    "tvt pipeline --engine dvc": "tests/test_workflow.py (end to end, both engines)",
    "git add dvc.yaml ": "tests/test_workflow.py::test_pipeline_end_to_end_keyed_cached_and_tracked (DVC baseline)",
    "dvc exp ": "tests/test_workflow.py::test_pipeline_end_to_end_keyed_cached_and_tracked (exp run -S, exp show)",
    "mlflow ui ": "tests/test_mlflow_server.py",
    "snakemake --profile profiles/slurm": "tests/test_slurm.py (real one-node cluster; paper dry run)",
    "tvt import ": "tests/test_official_{tvt,osediff,stablesr}.py (mini-size files laid out like the releases)",
    "tvt push ": "tests/test_hub.py (the HfApi network calls intercepted; --weights OWNER/NAME from a Hub-cache copy)",
    "snakemake --report ": "tests/test_workflow.py::test_pipeline_end_to_end_keyed_cached_and_tracked",
    "apt-get download ": "not run by the suite: fetches a Debian package of held-out photos for a benchmark",
    "python bench/": "benchmarks run by hand, never by the suite (tests/test_mini_claims.py covers tvt.claims)",
}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        for line in block.splitlines():
            command = line.split(" #", 1)[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_every_readme_command_is_classified():
    commands = readme_commands()
    assert len(commands) >= 10
    unclassified = [c for c in commands if not c.startswith(RUN_HERE + tuple(COVERED_ELSEWHERE))]
    assert not unclassified, f"README commands neither run here nor covered elsewhere: {unclassified}"


def _dry(command: str) -> str:
    words = shlex.split(command)
    return shlex.join([words[0], "-n", *words[1:]]) if words[0] == "snakemake" else command


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    project = _project_copy(tmp_path)
    (project / "README.md").write_text((ROOT / "README.md").read_text())
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVT_") and k != "MLFLOW_TRACKING_URI"}
    env["PATH"] = os.pathsep.join([str(BIN), *(p for p in env["PATH"].split(os.pathsep) if Path(p) != BIN)])
    env["PYTHONPATH"] = str(project)  # the clone's package, as an editable install of it would be
    ran = []
    for command in readme_commands():
        if not command.startswith(RUN_HERE) or command.startswith("source "):
            continue
        proc = subprocess.run(["bash", "-c", _dry(command)], cwd=project, env=env, capture_output=True, text=True,
                              check=False, timeout=300)
        assert proc.returncode == 0, f"README: `{command}` failed ({proc.returncode}):\n{proc.stderr[-2000:]}"
        ran.append(command)
        if command.startswith("tvt config validate "):
            assert proc.stdout.strip().endswith(": ok")
        if command.startswith("snakemake"):
            assert "Job stats:" in proc.stdout or "Nothing to be done" in proc.stdout
    assert any(c.startswith("snakemake --cores 2 all --config ") for c in ran)  # overrides, as documented
    assert len(ran) >= 6, ran


@pytest.mark.slow
@pytest.mark.parametrize("command", ["tvt --version", "tvt where --config config/ci.yaml degrade"])
def test_small_commands_answer_fast(command):
    proc = subprocess.run(shlex.split(command.replace("tvt", f"{sys.executable} -m tvt", 1)), cwd=ROOT,
                          capture_output=True, text=True, check=True, timeout=120)
    assert proc.stdout.strip()
    if "where" in command:
        assert re.fullmatch(r"resources/store/degrade/[0-9a-f]{16}", proc.stdout.strip())
