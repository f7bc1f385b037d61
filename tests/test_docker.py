"""Static checks of docker/Dockerfile.{cpu,cuda} and .dockerignore (no Docker daemon needed).

The Dockerfiles are parsed with ``dockerfile-parse``; the checks: base images
pinned by a version tag, a non-root USER set before the ENTRYPOINT
``["wavedistill"]``, the environment installed from requirements.lock whose
torch/torchaudio pins equal pyproject.toml's, no secret-looking ARG/ENV, and
a .dockerignore that keeps the virtual environment, experiments, data, git
metadata and checkpoint training state out of the build context while
keeping everything the Dockerfiles COPY.
"""

from __future__ import annotations

import io
import json
import os
import re
import shlex
import stat
import tomllib
from pathlib import Path

import pytest

dockerfile_parse = pytest.importorskip("dockerfile_parse", reason="dev dependency dockerfile-parse is not installed")

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = {"cpu": REPO / "docker" / "Dockerfile.cpu", "cuda": REPO / "docker" / "Dockerfile.cuda"}
SECRET_NAME = re.compile(r"TOKEN|PASSW|SECRET|KEY|CREDENTIAL|AUTH", re.IGNORECASE)
SECRET_VALUE = re.compile(r"ghp_[A-Za-z0-9]{20,}|github_pat_|AKIA[0-9A-Z]{16}|hf_[A-Za-z0-9]{30,}|-----BEGIN [A-Z ]*PRIVATE KEY")


def parse(path: Path) -> list[dict]:
    """Instructions (no comments) of a Dockerfile, each ``{"instruction", "value", "stage"}``."""
    parser = dockerfile_parse.DockerfileParser(fileobj=io.BytesIO(path.read_bytes()), env_replace=False)
    out, stage = [], -1
    for item in parser.structure:
        if item["instruction"] == "COMMENT":
            continue
        if item["instruction"] == "FROM":
            stage += 1
        out.append({"instruction": item["instruction"], "value": item["value"].strip(), "stage": stage})
    return out


def final_stage(instructions: list[dict]) -> list[dict]:
    last = max(i["stage"] for i in instructions)
    return [i for i in instructions if i["stage"] == last]


def from_images(instructions: list[dict]) -> list[str]:
    """Image references of every FROM that is not a reference to an earlier stage."""
    stages, images = set(), []
    for i in instructions:
        if i["instruction"] != "FROM":
            continue
        words = [w for w in i["value"].split() if not w.startswith("--")]
        if words[0].lower() not in stages:
            images.append(words[0])
        if len(words) == 3 and words[1].lower() == "as":
            stages.add(words[2].lower())
    return images


def names(instruction: dict) -> list[str]:
    """Variable names an ARG or ENV instruction defines (``K=V ...`` or the legacy ``ENV K V``)."""
    words = shlex.split(instruction["value"].replace("\\\n", " "), posix=True)
    if instruction["instruction"] == "ENV" and words and "=" not in words[0]:
        return [words[0]]
    return [w.split("=", 1)[0] for w in words]


def pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)", line)
        if m:
            out[m.group(1).lower()] = m.group(2)
    return out


def pyproject_pins() -> dict[str, str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return pins(deps)


@pytest.fixture(params=sorted(DOCKERFILES), ids=sorted(DOCKERFILES))
def dockerfile(request) -> tuple[str, Path, list[dict]]:
    path = DOCKERFILES[request.param]
    return request.param, path, parse(path)


def test_base_images_are_pinned_by_version_tag(dockerfile):
    flavour, _, ins = dockerfile
    images = from_images(ins)
    assert images
    for image in images:
        assert "@sha256:" in image or re.search(r":[^/]*\d", image), f"{image} is not pinned by a version tag"
        assert not image.endswith(":latest")
    expected = {"cpu": r"^python:3\.11[.\d]*-slim", "cuda": r"^nvidia/cuda:\d+\.\d+\.\d+-(base|runtime|cudnn-runtime)-"}
    assert re.match(expected[flavour], images[-1]), images[-1]


def test_runs_as_non_root_user_set_before_the_entrypoint(dockerfile):
    _, _, ins = dockerfile
    final = final_stage(ins)
    kinds = [i["instruction"] for i in final]
    assert kinds.count("ENTRYPOINT") == 1 and "USER" in kinds
    users = [i for i in final if i["instruction"] == "USER"]
    user = users[-1]["value"].split(":")[0]
    assert user not in ("root", "0"), user
    assert max(k for k, i in enumerate(final) if i["instruction"] == "USER") < kinds.index("ENTRYPOINT")
    # the user is created in the image (not assumed to exist in the base image)
    created = " ".join(i["value"] for i in final if i["instruction"] == "RUN")
    assert re.search(rf"useradd\b[^&;]*\b{re.escape(user)}\b", created), created
    assert json.loads(final[kinds.index("ENTRYPOINT")]["value"]) == ["wavedistill"]


def test_environment_comes_from_the_lock_with_pyproject_torch_pins(dockerfile):
    _, path, ins = dockerfile
    want = pyproject_pins()
    assert {"torch", "torchaudio"} <= set(want)
    lock = pins((REPO / "requirements.lock").read_text().splitlines())
    for name in ("torch", "torchaudio"):
        assert lock[name] == want[name], (name, lock[name], want[name])
    copies = " ".join(i["value"] for i in ins if i["instruction"] in ("COPY", "ADD"))
    assert "requirements.lock" in copies.split()
    installs = [i["value"] for i in ins if i["instruction"] == "RUN" and "pip install" in i["value"]]
    assert installs
    for run in installs:
        for cmd in re.split(r"&&|;", run):
            if "pip install" in cmd and "--upgrade pip" not in cmd:
                assert re.search(r"(-c|--constraint|-r|--requirement)\s+requirements\.lock", cmd), cmd
    # any version the Dockerfile names itself (comments included) must be pyproject's
    text = path.read_text()
    for name in ("torch", "torchaudio"):
        for version in re.findall(rf"\b{name}\s*==\s*([0-9][0-9A-Za-z.+!-]*[0-9A-Za-z+])", text):
            assert version == want[name], (name, version, want[name])


def test_no_secrets_in_args_or_envs(dockerfile):
    _, path, ins = dockerfile
    defined = [n for i in ins if i["instruction"] in ("ARG", "ENV") for n in names(i)]
    assert "PATH" in defined  # the parser sees the ENV lines at all
    assert not [n for n in defined if SECRET_NAME.search(n)]
    assert not SECRET_VALUE.search(path.read_text())


def test_both_images_share_entrypoint_user_and_lock():
    parsed = {k: final_stage(parse(p)) for k, p in DOCKERFILES.items()}

    def pick(ins, kind):
        return [i["value"] for i in ins if i["instruction"] == kind]

    assert pick(parsed["cpu"], "ENTRYPOINT") == pick(parsed["cuda"], "ENTRYPOINT")
    assert pick(parsed["cpu"], "USER") == pick(parsed["cuda"], "USER")


# --------------------------------------------------------------------------- .dockerignore


def _pattern(p: str) -> re.Pattern:
    p = p.strip().lstrip("/").rstrip("/")
    out, i = "", 0
    while i < len(p):
        if p.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif p.startswith("**", i):
            out, i = out + ".*", i + 2
        elif p[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif p[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(p[i]), i + 1
    return re.compile(out)


def excluded(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matching a directory covers all below it."""
    parts = path.split("/")
    candidates = ["/".join(parts[: k + 1]) for k in range(len(parts))]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        rx = _pattern(raw[1:] if negate else raw)
        if any(rx.fullmatch(c) for c in candidates):
            result = not negate
    return result


def dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


@pytest.mark.parametrize("path", [
    ".venv/bin/python",
    ".venv/lib/python3.11/site-packages/torch/__init__.py",
    "exp/demo-teacher/checkpoints/step-00004000/model.safetensors",
    "data/demo/feats/utt001.safetensors",
    ".git/HEAD",
    ".git/objects/ab/cdef",
    "wavedistill/__pycache__/cli.cpython-311.pyc",
    "tests/__pycache__/test_faults.cpython-311-pytest-9.2.0.pyc",
    "checkpoints/demo/teacher-v1/step-00000400/state/optimizer.safetensors",
    "recipes/demo/exp/teacher/checkpoints/step-00000100/state/params.safetensors",
])
def test_dockerignore_excludes(path):
    assert excluded(path, dockerignore()), path


def test_dockerignore_keeps_what_the_dockerfiles_copy():
    patterns = dockerignore()
    needed = {"wavedistill/cli.py", "wavedistill/generation/csrc/fastgen.cpp", "wavedistill/__init__.py"}
    for path in DOCKERFILES.values():
        for i in parse(path):
            if i["instruction"] in ("COPY", "ADD") and "--from" not in i["value"]:
                sources = i["value"].split()[:-1]
                needed |= set(sources)
    for src in sorted(needed):
        assert (REPO / src).exists(), f"the Dockerfiles COPY {src}, which is not in the repository"
        assert not excluded(src, patterns), f"{src} is COPY'd but excluded by .dockerignore"
        if (REPO / src).is_dir():
            for f in (REPO / src).rglob("*.py"):
                rel = f.relative_to(REPO).as_posix()
                if "__pycache__" not in rel:
                    assert not excluded(rel, patterns), rel


def test_dockerignore_matcher_follows_docker_rules():
    """The small matcher above is itself tested, so that the checks using it can be trusted."""
    assert excluded("exp/a/b", ["exp"])
    assert not excluded("src/exp.py", ["exp"])
    assert excluded("a/b/__pycache__/x.pyc", ["**/__pycache__"])
    assert not excluded("a/keep.txt", ["a/*", "!a/keep.txt"])
    assert excluded("a/drop.txt", ["a/*", "!a/keep.txt"])
    assert excluded("x/step-00000001/state/p", ["**/step-*/state"])
    assert not excluded("x/step-00000001/model.safetensors", ["**/step-*/state"])


# --------------------------------------------------------------------------- files written from inside a container


def test_written_files_respect_the_umask(tmp_path):
    """The image runs as uid 10001 and writes into volumes mounted from the host: feature caches, wavs and reports
    must get the usual ``0666 & ~umask`` permissions, not mkstemp's owner-only 0600, or the host user cannot read them."""
    from wavedistill.data.audio import write_wav
    from wavedistill.fileio import atomic_write_bytes, atomic_write_json

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "m.json", {"a": 1})
        write_wav(tmp_path / "y.wav", [0.0, 0.1, -0.1], 8000)
    finally:
        os.umask(old)
    for name in ("a.bin", "m.json", "y.wav"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name
