"""Set-up files agree with each other: one dependency list, pinned CPU torch, CI entry."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from tvt.config import REPO_ROOT


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_installs_the_project_under_the_tested_pins():
    """conda-forge only (the pytorch/nvidia channels are dead); pip installs the package with its dev
    extra under constraints.txt, so the cluster gets the versions the tests run with."""
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    assert env["channels"] == ["conda-forge"]
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "--constraint constraints.txt" in pip and "--editable .[dev]" in pip


def _lock() -> dict[str, tuple[str, str]]:
    entries = {}
    for line in (REPO_ROOT / "constraints.lock.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            found = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+) --hash=sha256:([0-9a-f]{64})", line)
            assert found, f"constraints.lock.txt: not `name==version --hash=sha256:...`: {line!r}"
            entries[_name(found.group(1))] = (found.group(2), found.group(3))
    return entries


def test_the_lock_covers_every_dependency_with_the_constrained_versions():
    lock = _lock()
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    assert not wanted - set(lock), f"constraints.lock.txt lacks {sorted(wanted - set(lock))}"
    for line in (REPO_ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            assert lock[_name(name)][0].split("+")[0] == version, f"{name}: lock {lock[_name(name)][0]} != {version}"
    assert lock["torch"][0] == "2.13.0+cpu"  # the local CPU wheel, by its own hash


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
    assert "--require-hashes" in makefile and "-r constraints.lock.txt" in makefile  # the lock, nothing resolved
    assert "--build-constraint build-constraints.txt" in makefile


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name.replace("-", "_"), REPO_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lock_leaves_out_exactly_the_omitted_packages_and_says_why():
    write_lock = _script("write-lock")
    text = (REPO_ROOT / "constraints.lock.txt").read_text()
    assert text.startswith(write_lock.header()), "the lock's header is not what `make lock` writes"
    assert set(write_lock.OMITTED) == {"bitsandbytes"}
    assert not set(write_lock.OMITTED) & set(_lock())
    assert _script("check-install").omitted(text) == set(write_lock.OMITTED)

    def item(name):
        return {"metadata": {"name": name, "version": "1.0"},
                "download_info": {"url": "u", "archive_info": {"hashes": {"sha256": "0" * 64}}}}

    lines = write_lock.lock_lines({"install": [item("tvt"), item("BitsAndBytes"), item("pyiqa")]})
    assert lines == [f"pyiqa==1.0 --hash=sha256:{'0' * 64}"]


def test_no_module_of_the_declaring_package_imports_what_the_lock_omits():
    """Omitting bitsandbytes is safe only while pyiqa (whose metadata requires it) never imports it: a pyiqa
    release that starts to would fail here, not in a user's evaluation."""
    import importlib.util

    root = Path(importlib.util.find_spec("pyiqa").origin).parent
    users = [p for p in root.rglob("*.py") if "bitsandbytes" in p.read_text(errors="replace")]
    assert len(list(root.rglob("*.py"))) > 50 and not users, users


def test_the_install_check_passes_only_what_the_lock_omits():
    check = _script("check-install")
    report = """pyiqa 0.1.16 requires bitsandbytes, which is not installed.
basicsr 1.4.2 requires lmdb, which is not installed.
mlflow 3.17.2 has requirement pandas<3, but you have pandas 3.1.1."""
    assert check.problems(report, {"bitsandbytes"}) == report.splitlines()[1:]
    assert check.problems(report.splitlines()[0], {"bitsandbytes"}) == []
    assert check.problems(report.splitlines()[0], set()) == report.splitlines()[:1]
