"""pyproject.toml bounds every runtime dependency, and constraints.txt pins what it declares.

constraints.txt holds the exact versions CI last passed with (README, .ci/run); a dependency
added to pyproject.toml without a pin there, or with a pin outside its bounds, fails here.
"""

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _runtime() -> list[Requirement]:
    return [Requirement(r) for r in _project()["dependencies"]]


def _test_extra() -> list[Requirement]:
    return [Requirement(r) for r in _project()["optional-dependencies"]["test"]]


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for number, raw in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        # Only plain `name==version` lines: no URLs, local paths or editable installs.
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;@+]+)", line)
        assert match, f"constraints.txt:{number}: not a plain name==version pin: {raw!r}"
        name = canonicalize_name(match[1])
        assert name not in pins, f"constraints.txt:{number}: {name} pinned twice"
        pins[name] = Version(match[2])
    return pins


def test_constraints_are_exact_pins():
    pins = _pins()
    assert pins, "constraints.txt pins nothing"
    assert "tokenmill" not in pins  # the project itself is installed editable


@pytest.mark.parametrize("requirement", _runtime() + _test_extra(), ids=str)
def test_dependency_pinned_within_bounds(requirement):
    pins = _pins()
    name = canonicalize_name(requirement.name)
    assert name in pins, f"{requirement} is not pinned in constraints.txt"
    assert requirement.specifier.contains(pins[name], prereleases=True), (
        f"constraints.txt pins {name}=={pins[name]}, outside pyproject.toml's {requirement}"
    )


@pytest.mark.parametrize("requirement", _runtime(), ids=str)
def test_runtime_dependency_has_upper_bound(requirement):
    assert any(spec.operator in {"<", "<=", "==", "~=", "==="} for spec in requirement.specifier), (
        f"{requirement}: runtime dependencies need an upper bound (next major, or <1 for 0.x)"
    )


def test_readme_test_command_is_ci_first_pass():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if "python -m pytest" in line]
    assert len(commands) == 1, commands
    assert "-c constraints.txt" in commands[0]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands[0] in ci, "the README's test command is not a line of .ci/run"


def test_readme_names_the_pinned_versions():
    readme = (ROOT / "README.md").read_text()
    pins = _pins()
    assert f"torch=={pins['torch']}" in readme  # the install lines' torch is the pinned one
    paragraph = readme[readme.index("Tested versions:") :].split("\n\n", 1)[0]
    named = re.findall(
        r"\b(torch|transformers|fastapi|uvicorn|pydantic|xgrammar|openai)\s+(\d\S*\d)", paragraph
    )
    assert len(named) == 7, named
    for name, version in named:
        assert Version(version) == pins[name], (
            f"README says {name} {version}, constraints.txt {pins[name]}"
        )
