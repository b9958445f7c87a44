"""binder/: what the Binder image installs, how it starts, and where it opens."""

import ast
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BINDER = ROOT / "binder"
QUICKSTART = "notebooks/01_quickstart.ipynb"
# imported only by the script that trains the embedded model, which never runs on Binder
BUILD_ONLY = {"matplotlib"}
# installed with another requirement (llvmlite with numba)
COMES_WITH = {"llvmlite"}


def _requirements() -> dict[str, str]:
    out = {}
    for line in (BINDER / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("--"):
            continue
        name = re.split(r"[<>=!~\[ ;]", line, maxsplit=1)[0]
        out[re.sub(r"[-_.]+", "-", name.lower())] = line
    return out


def test_cpu_torch_from_the_cpu_index_and_no_local_paths():
    text = (BINDER / "requirements.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"^torch==2\.13\.0\+cpu$", text, re.M)
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        assert not line.startswith(("-e", ".", "/", "file:")), line


def test_every_third_party_import_of_the_package_is_installed():
    reqs = _requirements()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in project:
        name = re.sub(r"[-_.]+", "-", re.split(r"[<>=!~\[ ]", dep, maxsplit=1)[0].lower())
        assert name in reqs, f"pyproject dependency {name} is not in binder/requirements.txt"
    import importlib.metadata as md

    dists = md.packages_distributions()
    imported = set()
    for path in (ROOT / "ciuic_lab").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third = {m for m in imported if m not in sys.stdlib_module_names and m != "ciuic_lab"}
    for module in sorted(third - BUILD_ONLY - COMES_WITH):
        names = {re.sub(r"[-_.]+", "-", d.lower()) for d in dists.get(module, [module])}
        assert names & set(reqs), f"ciuic_lab imports {module}, which binder/requirements.txt does not install"
    assert {"jupyterlab", "ipykernel", "torch"} <= set(reqs)


def test_runtime_postbuild_and_start():
    assert re.fullmatch(r"python-3\.\d+\n?", (BINDER / "runtime.txt").read_text())
    post = (BINDER / "postBuild").read_text()
    assert post.startswith("#!/bin/bash") and "set -euo pipefail" in post and os.access(BINDER / "postBuild", os.X_OK)
    assert "pip install --no-deps -e ." in post  # never lets pip swap the CPU torch for another
    start = BINDER / "start"
    assert start.read_text().rstrip().endswith('exec "$@"') and os.access(start, os.X_OK)
    env = subprocess.run(["bash", str(start), "env"], capture_output=True, text=True, timeout=30,
                         env={"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp")}).stdout
    got = dict(line.split("=", 1) for line in env.splitlines() if "=" in line)
    assert 1 <= int(got["NUMBA_NUM_THREADS"]) <= os.cpu_count() and got["OMP_NUM_THREADS"] == got["NUMBA_NUM_THREADS"]
    assert got["HF_HUB_OFFLINE"] == "1" and got["TRANSFORMERS_OFFLINE"] == "1"
    assert got["NUMBA_CACHE_DIR"].endswith(".cache/numba")


def test_the_launch_opens_the_quickstart():
    assert (ROOT / QUICKSTART).is_file()
    readme = (ROOT / "README.md").read_text()
    badge = re.search(r"\[!\[[^\]]*\]\(https://mybinder\.org/badge_logo\.svg\)\]\((https://mybinder\.org/v2/gh/[^)]+)\)",
                      readme)
    assert badge, "README has no Binder launch badge"
    assert badge.group(1).endswith("?urlpath=lab/tree/" + QUICKSTART)
