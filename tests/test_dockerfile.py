"""The Dockerfile, checked without a Docker engine: its documented run command, pins and user.

What is checked: the config the header runs exists and is copied to the working directory; every
relative path that config (with its __base__ chain) reads or writes is under a mounted folder; every
pip requirement is pinned with ==, torch as in pyproject.toml; the extras it names exist; it ends as
a non-root user. Not checked here: that the image builds (no engine on the CI machine).
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TEXT = (ROOT / "Dockerfile").read_text()


def _run_command() -> str:
    header = " ".join(line.lstrip("# ").rstrip("\\ ") for line in TEXT.splitlines() if line.startswith("#"))
    match = re.search(r"docker run (.*?--config (\S+))", header)
    assert match, "the header documents a `docker run ... --config X` command"
    return match.group(1)


def _chain(path: Path) -> list[dict]:
    data = yaml.safe_load(path.read_text())
    base = data.pop("__base__", None)
    return (_chain(path.parent / base) if base else []) + [data]


def test_documented_run_command_paths_are_mounted() -> None:
    cmd = _run_command()
    config = re.search(r"--config (\S+)", cmd).group(1)
    assert (ROOT / config).is_file() and config.startswith("configs/")
    assert re.search(r"^COPY\b.*\bconfigs /work/configs$", TEXT, re.M) and re.search(r"^WORKDIR /work$", TEXT, re.M)
    mounts = re.findall(r"-v \"?\$PWD/(\w+):/work/(\w+)\"?", cmd)
    assert all(a == b for a, b in mounts)
    mounted = {a for a, _ in mounts}
    merged: dict = {}
    for level in _chain(ROOT / config):
        merged = _merge(merged, level)
    paths = [merged["trainer"]["default_root_dir"], merged["data"]["train"],
             merged["model"]["model"]["text_tower"]["init_args"]["tokenizer"]]
    for p in paths:
        assert not Path(p).is_absolute() and p.split("/")[0] in mounted, (p, mounted)
    assert "runs" in mounted  # outputs leave the container


def _merge(a: dict, b: dict) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def test_image_dependencies_are_pinned_and_extras_exist() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    torch_pins = [d for d in project["dependencies"] if d.startswith(("torch==", "torchvision=="))]
    installs = [m.group(1) for m in re.finditer(r"RUN pip install ((?:\\\n|[^\n])*)", TEXT)]
    reqs = [r for block in installs for r in block.replace("\\\n", " ").split()
            if not r.startswith("-") and not r.startswith("&&") and r not in ("pip", "check")]
    reqs = [r for r in reqs if not r.startswith('".') and r not in ("&&", "\\")]
    assert reqs and all("==" in r for r in reqs), [r for r in reqs if "==" not in r]
    for pin in torch_pins:
        assert pin in reqs
    assert any(r.startswith("open-clip-torch==") for r in reqs) and any(r.startswith("tensorboard==") for r in reqs)
    extras = re.search(r'pip install --no-deps "\.\[([^\]]+)\]"', TEXT).group(1).split(",")
    assert set(extras) <= set(project["optional-dependencies"]), extras


def test_runs_as_a_non_root_user() -> None:
    users = re.findall(r"^USER (\S+)$", TEXT, re.M)
    assert users and users[-1] not in ("root", "0")
    assert TEXT.rfind("USER ") < TEXT.rfind("ENTRYPOINT")
