"""Set-up files agree with each other: one dependency list, pinned CPU torch, CI entry."""

from __future__ import annotations

import re
import tomllib

import yaml

from tvt.config import REPO_ROOT


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"]} | {_name(r) for r in project["optional-dependencies"]["dev"]}
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    conda = {_name(d).replace("pytorch", "torch") for d in env["dependencies"] if isinstance(d, str)}
    pip = {_name(d) for d in next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))}
    missing = wanted - conda - pip
    assert not missing, f"environment.yml lacks {sorted(missing)}"


def test_constraints_pin_the_local_cpu_torch_everywhere():
    for name in ("constraints.txt", "build-constraints.txt"):
        lines = (REPO_ROOT / name).read_text().splitlines()
        assert "torch==2.13.0" in lines, name
        assert "setuptools<82" in lines, name


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    first_block = readme.split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["make demo", "make test"]
    assert "make test" in (REPO_ROOT / ".ci" / "run").read_text()
    makefile = (REPO_ROOT / "Makefile").read_text()
    assert "rc -eq 5" in makefile  # pytest's "no tests collected" must fail CI
    assert "-c constraints.txt" in makefile and "--build-constraint build-constraints.txt" in makefile
