"""The four distributions, one a folder, read from their pyproject.toml files (nothing is built here).

tests/test_dockerfile.py builds the images' wheels and checks what each image holds; this module checks,
in milliseconds, that the four pyproject.toml files agree with each other and with the folders: one version,
the pins between them, every package of a folder in its wheel (and its data files), each llmgw subcommand
shipped by the distribution whose code it runs, and the repository's tools pointed at all four folders.
"""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {
    "common": "llm-gateway-common",
    "proxy_image": "llm-gateway-proxy",
    "operator": "llm-gateway-operator",
    "dev": "llm-gateway-dev",
}
# Which distributions each one pins (the proxy and the operator each go into an image with common alone).
PINS = {
    "llm-gateway-common": set(),
    "llm-gateway-proxy": {"llm-gateway-common"},
    "llm-gateway-operator": {"llm-gateway-common"},
    "llm-gateway-dev": {"llm-gateway-common", "llm-gateway-proxy", "llm-gateway-operator"},
}
COMMANDS = {
    "llm-gateway-common": set(),
    "llm-gateway-proxy": {"proxy"},
    "llm-gateway-operator": {"operator", "status"},
    "llm-gateway-dev": {"fake-provider", "demo", "cluster"},
}


def pyproject(folder: str) -> dict[str, Any]:
    return tomllib.loads((ROOT / folder / "pyproject.toml").read_text())


def top_level_packages(folder: str) -> set[str]:
    return {p.parent.name for p in (ROOT / folder).glob("*/__init__.py")}


def packages(folder: str) -> set[str]:
    """The packages setuptools puts in the folder's wheel (its packages.find include patterns)."""
    include = pyproject(folder)["tool"]["setuptools"]["packages"]["find"]["include"]
    found = set()
    for init in (ROOT / folder).rglob("__init__.py"):
        if "__pycache__" in init.parts or ".egg-info" in str(init) or "build" in init.relative_to(ROOT).parts:
            continue
        dotted = ".".join(init.parent.relative_to(ROOT / folder).parts)
        if any(fnmatch.fnmatchcase(dotted, pattern) for pattern in include):
            found.add(dotted)
    return found


def requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match is not None, requirement
    return match[0].lower()


def test_one_version_and_license_everywhere() -> None:
    projects = [pyproject(folder)["project"] for folder in FOLDERS]
    assert [p["name"] for p in projects] == list(FOLDERS.values())
    assert {p["version"] for p in projects} == {"0.1.0"}
    assert {p["license"] for p in projects} == {"Apache-2.0"}
    assert {p["requires-python"] for p in projects} == {">=3.11"}
    # The images' label and the version they install.
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG VERSION=0\.1\.0$", dockerfile, re.M)
    # The root pyproject.toml configures the tools and builds nothing.
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "project" not in root and "build-system" not in root


@pytest.mark.parametrize("folder", FOLDERS)
def test_pins_between_the_distributions(folder: str) -> None:
    project = pyproject(folder)["project"]
    ours = [r for r in project["dependencies"] if requirement_name(r).startswith("llm-gateway")]
    assert sorted(ours) == sorted(f"{name}=={project['version']}" for name in PINS[project["name"]])
    assert "optional-dependencies" not in project


@pytest.mark.parametrize("folder", FOLDERS)
def test_each_wheel_holds_its_folders_packages_and_their_data(folder: str) -> None:
    config = pyproject(folder)["tool"]["setuptools"]
    # Editable installs put the folder itself on sys.path: it may hold nothing else that imports.
    assert config["package-dir"] == {"": "."}
    in_wheel = packages(folder)
    assert {name.split(".")[0] for name in in_wheel} == top_level_packages(folder)
    # Every package below those, and every file in them that is not Python (py.typed, .pyi, the CRD, the
    # example configuration) is package data.
    package_data: dict[str, list[str]] = config.get("package-data", {})
    for top in top_level_packages(folder):
        for path in (ROOT / folder / top).rglob("*"):
            if path.is_dir() or "__pycache__" in path.parts or path.suffix in (".py", ".pyc"):
                continue
            parent = path.parent
            while not (parent / "__init__.py").exists():
                parent = parent.parent
            package = ".".join(parent.relative_to(ROOT / folder).parts)
            relative = path.relative_to(parent).as_posix()
            patterns = package_data.get(package, [])
            assert any(fnmatch.fnmatchcase(relative, p) for p in patterns), f"{folder}: {package}: {relative}"


def test_package_data_the_code_reads() -> None:
    assert (ROOT / "operator" / "llmgw_operator" / "data" / "crd.yaml").is_file()
    assert (ROOT / "dev" / "llmgw_dev" / "data" / "local.yaml").is_file()
    # The quick-start configuration is the dev package's file, linked.
    example = ROOT / "examples" / "proxy" / "local.yaml"
    assert example.resolve() == (ROOT / "dev" / "llmgw_dev" / "data" / "local.yaml").resolve()
    assert (ROOT / "proxy_image" / "llmgw" / "py.typed").is_file()


@pytest.mark.parametrize("folder", FOLDERS)
def test_subcommands_come_with_their_code(folder: str) -> None:
    project = pyproject(folder)["project"]
    commands = project.get("entry-points", {}).get("llmgw.commands", {})
    assert set(commands) == COMMANDS[project["name"]]
    for target in commands.values():
        module = target.split(":")[0]
        assert module.split(".")[0] in top_level_packages(folder), target
        assert (ROOT / folder / (module.replace(".", "/") + ".py")).is_file(), target
    # One `llmgw` command, from the distribution every image has.
    scripts = project.get("scripts", {})
    assert scripts == ({"llmgw": "llmgw_common.cli:main"} if folder == "common" else {})


def test_tools_see_all_four_folders() -> None:
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]
    assert tool["mypy"]["mypy_path"].split(":") == list(FOLDERS)
    tops = set().union(*(top_level_packages(folder) for folder in FOLDERS))
    assert tops <= set(tool["ruff"]["lint"]["isort"]["known-first-party"])
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^PACKAGES := common proxy_image operator dev$", makefile, re.M)
    assert "$(VENV)/.installed: $(addsuffix /pyproject.toml,$(PACKAGES))" in makefile
    dev = pyproject("dev")["project"]["dependencies"]
    assert any(re.fullmatch(r"import-linter==[\d.]+", r) for r in dev)
