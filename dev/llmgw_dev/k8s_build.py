"""Build a Kubernetes control plane (kube-apiserver, etcd) from Kubernetes' own Go modules.

No binaries can be downloaded here and there is no Docker, kind or k3s, so the local control plane is
built the way a Go user builds any command from a module: a small *wrapper module* requires
``k8s.io/kubernetes`` at a pinned release and ``go build``\\ s ``k8s.io/kubernetes/cmd/kube-apiserver`` and ``cmd/kube-controller-manager`` (whose
garbage collector makes owner references cascade, and whose deployment controller fills in
Deployment status).

``k8s.io/kubernetes`` is not meant to be a dependency: its ``go.mod`` points each ``k8s.io/<staging>``
module (``k8s.io/api``, ``k8s.io/apiserver``, ...) at ``./staging/src/...`` with ``v0.0.0`` versions, and
those ``replace`` lines are ignored in a dependency. The wrapper therefore replaces every staging module
with its published ``v0.<minor>.<patch>`` release, which is the same source cut from the same tag.

etcd is built the same way: a wrapper ``main`` that calls ``go.etcd.io/etcd/server/v3/etcdmain.Main``,
at the etcd release the chosen Kubernetes requires for its etcd client.

Binaries land in ``~/.cache/llmgw/k8s/<k8s version>-etcd<etcd version>/`` and are reused while present.
Users who already have binaries point ``$LLMGW_K8S_BIN`` (or ``$KUBEBUILDER_ASSETS``) at them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "v1.36.3"
ETCD_VERSION = "v3.6.8"  # the etcd client release k8s.io/kubernetes v1.36.3 requires
KUBE_COMMANDS = ("kube-apiserver", "kube-controller-manager")
BINARIES = (*KUBE_COMMANDS, "etcd")


@dataclass(frozen=True)
class Binaries:
    """Paths of the control-plane binaries, and where they came from."""

    kube_apiserver: Path
    etcd: Path
    kube_controller_manager: Path | None  # optional for user-supplied binaries (envtest ships none)
    source: str  # "env:LLMGW_K8S_BIN", "env:KUBEBUILDER_ASSETS", or "cache"


class BuildError(RuntimeError):
    """A step of the build failed; the message names the step and carries the tool's own error."""


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llmgw" / "k8s" / f"{KUBERNETES_VERSION}-etcd{ETCD_VERSION}"


def _from_dir(directory: str, source: str, require_all: bool) -> Binaries | None:
    path = Path(directory)
    apiserver, etcd, kcm = path / "kube-apiserver", path / "etcd", path / "kube-controller-manager"
    if not (apiserver.is_file() and etcd.is_file()) or (require_all and not kcm.is_file()):
        return None
    return Binaries(apiserver, etcd, kcm if kcm.is_file() else None, source)


def find() -> Binaries | None:
    """Binaries a user supplied, else the cached build, else None."""
    for env in ("LLMGW_K8S_BIN", "KUBEBUILDER_ASSETS"):
        if os.environ.get(env):
            found = _from_dir(os.environ[env], f"env:{env}", require_all=False)
            if found is None:
                raise BuildError(f"${env}={os.environ[env]} has no kube-apiserver and etcd binaries")
            return found
    return _from_dir(str(cache_dir() / "bin"), "cache", require_all=True)


def ensure(log: Callable[[str], None] = print) -> Binaries:
    """Return usable binaries, building them (with progress on ``log``) when none are found."""
    found = find()
    if found is not None:
        return found
    build(log)
    built = find()
    assert built is not None
    return built


def _go() -> str:
    for candidate in (shutil.which("go"), "/usr/local/go/bin/go"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise BuildError("no Go toolchain found: install Go 1.26+ (https://go.dev/dl/) or set $LLMGW_K8S_BIN")


def _run(step: str, argv: list[str], cwd: Path, env: dict[str, str]) -> str:
    proc = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise BuildError(f"{step} failed ({' '.join(argv)}):\n{proc.stderr.strip()[-4000:]}")
    return proc.stdout


def _build_with_progress(
    step: str, argv: list[str], cwd: Path, env: dict[str, str], log: Callable[[str], None]
) -> None:
    """``go build -v`` prints each package as it compiles: count them so a long build shows it is alive."""
    started = time.monotonic()
    proc = subprocess.Popen(
        argv, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    tail: list[str] = []
    packages = 0
    last_report = started
    for line in proc.stderr:
        tail = [*tail[-60:], line.rstrip()]
        packages += 1
        now = time.monotonic()
        if now - last_report >= 15:
            log(f"  {step}: {packages} packages compiled, {now - started:.0f}s")
            last_report = now
    if proc.wait() != 0:
        raise BuildError(f"{step} failed ({' '.join(argv)}):\n" + "\n".join(tail[-40:]))
    log(f"  {step}: done in {time.monotonic() - started:.0f}s ({packages} packages)")


def _kubernetes_go_mod(go: str, work: Path, env: dict[str, str]) -> str:
    """The go.mod of k8s.io/kubernetes at the pinned release (downloading the module)."""
    argv = [go, "mod", "download", "-json", f"k8s.io/kubernetes@{KUBERNETES_VERSION}"]
    info = json.loads(_run("download k8s.io/kubernetes", argv, work, env))
    return Path(info["GoMod"]).read_text()


def _staging_modules(go_mod: str) -> list[str]:
    return sorted(set(re.findall(r"^\s*(k8s\.io/[\w.-]+)\s+=>\s+\./staging/", go_mod, re.MULTILINE)))


def _go_directive(go_mod: str) -> str:
    match = re.search(r"^go (\S+)$", go_mod, re.MULTILINE)
    return match.group(1) if match else "1.26.0"


def _version_ldflags() -> str:
    major, minor = KUBERNETES_VERSION.lstrip("v").split(".")[:2]
    pkg = "k8s.io/component-base/version"
    values = {
        "gitVersion": KUBERNETES_VERSION,
        "gitMajor": major,
        "gitMinor": minor,
        "gitTreeState": "clean",
        "buildDate": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    flags = " ".join(f"-X {pkg}.{key}={value}" for key, value in values.items())
    return f"-s -w {flags}"


def build(log: Callable[[str], None] = print) -> Path:
    """Build kube-apiserver and etcd into the cache; return the bin directory."""
    go = _go()
    root = cache_dir()
    work, bin_dir = root / "src", root / "bin"
    work.mkdir(parents=True, exist_ok=True)
    bin_dir.mkdir(parents=True, exist_ok=True)
    # Private Go caches (about 4 GB) next to the build, removed once it succeeds: only the binaries
    # (about 220 MB) stay in ~/.cache.
    env = {
        **os.environ,
        "CGO_ENABLED": "0",
        "GOFLAGS": "-mod=mod -buildvcs=false",
        "GOTOOLCHAIN": "local",
        "GOCACHE": str(root / "go-build"),
        "GOMODCACHE": str(root / "go-mod"),
    }
    started = time.monotonic()
    log(
        f"building the local control plane: kubernetes {KUBERNETES_VERSION}, etcd {ETCD_VERSION} (first use only)"
    )

    apiserver_mod = work / "kube-apiserver"
    apiserver_mod.mkdir(exist_ok=True)
    staging_minor = "v0." + KUBERNETES_VERSION.split(".", 1)[1]
    go_mod = _kubernetes_go_mod(go, apiserver_mod, env)
    go_version = _go_directive(go_mod)
    staging = _staging_modules(go_mod)
    replaces = "\n".join(f"\t{module} => {module} {staging_minor}" for module in staging)
    (apiserver_mod / "go.mod").write_text(
        f"module llmgw.local/kube-apiserver\n\ngo {go_version}\n\ngodebug default=go{'.'.join(go_version.split('.')[:2])}\n\n"
        f"require k8s.io/kubernetes {KUBERNETES_VERSION}\n\nreplace (\n{replaces}\n)\n"
    )
    imports = "".join(f'\t_ "k8s.io/kubernetes/cmd/{command}"\n' for command in KUBE_COMMANDS)
    (apiserver_mod / "tools.go").write_text(f"//go:build tools\n\npackage tools\n\nimport (\n{imports})\n")
    log(f"  resolving modules ({len(staging)} staging modules pinned at {staging_minor})")
    _run("go mod tidy (kube-apiserver)", [go, "mod", "tidy"], apiserver_mod, env)
    for command in KUBE_COMMANDS:
        _build_with_progress(
            command,
            [
                go,
                "build",
                "-v",
                "-trimpath",
                "-tags",
                "providerless",
                "-ldflags",
                _version_ldflags(),
                "-o",
                str(bin_dir / f"{command}.tmp"),
                f"k8s.io/kubernetes/cmd/{command}",
            ],
            apiserver_mod,
            env,
            log,
        )

    etcd_mod = work / "etcd"
    etcd_mod.mkdir(exist_ok=True)
    (etcd_mod / "go.mod").write_text(
        f"module llmgw.local/etcd\n\ngo {go_version}\n\nrequire go.etcd.io/etcd/server/v3 {ETCD_VERSION}\n"
    )
    (etcd_mod / "main.go").write_text(
        'package main\n\nimport (\n\t"os"\n\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\n\n'
        "func main() { etcdmain.Main(os.Args) }\n"
    )
    _run("go mod tidy (etcd)", [go, "mod", "tidy"], etcd_mod, env)
    _build_with_progress(
        "etcd",
        [go, "build", "-v", "-trimpath", "-ldflags", "-s -w", "-o", str(bin_dir / "etcd.tmp"), "."],
        etcd_mod,
        env,
        log,
    )
    # Rename last, so an interrupted build never leaves a binary that looks complete.
    for name in BINARIES:
        if (bin_dir / f"{name}.tmp").exists():
            (bin_dir / f"{name}.tmp").rename(bin_dir / name)
    _run("go clean -modcache", [go, "clean", "-modcache"], work, env)
    shutil.rmtree(root / "go-build", ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - started
    (root / "build-seconds").write_text(f"{elapsed:.0f}\n")
    log(f"control plane built in {elapsed / 60:.1f} min: {bin_dir}")
    return bin_dir


if __name__ == "__main__":
    try:
        print(ensure())
    except BuildError as exc:
        sys.exit(str(exc))
