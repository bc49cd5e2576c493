"""./train.sh and ./test.sh find their interpreter on a fresh machine (tools/find_python.sh)."""
import os
import subprocess
import sys

import pytest

from core.config import dump
from tests.engine_helpers import ROOT, tiny_cfg

PACKAGES = ("analysis", "blocks", "configs", "core", "data", "engine", "models", "tools")


def _wrapper(path, marker=None):
    """An executable ``path`` that runs this test's Python (which has torch), noting each start in ``marker``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    note = f'echo started >> "{marker}"\n' if marker else ""
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\n{note}exec "{sys.executable}" "$@"\n')
    os.chmod(path, 0o755)


def _clone(tmp_path):
    """A repository copy: its scripts and packages (linked), no .venv."""
    root = tmp_path / "repo"
    (root / "tools").mkdir(parents=True)
    for name in ("train.sh", "test.sh"):
        (root / name).symlink_to(os.path.join(ROOT, name))
    for pkg in PACKAGES:
        if pkg != "tools":
            (root / pkg).symlink_to(os.path.join(ROOT, pkg))
    for entry in os.listdir(os.path.join(ROOT, "tools")):
        (root / "tools" / entry).symlink_to(os.path.join(ROOT, "tools", entry))
    return root


def _train(root, tmp_path, path, **env):
    cfg = tmp_path / "tiny.yaml"
    dump(tiny_cfg(tmp_path / "work", "train.epochs=1"), str(cfg))
    # a bare shell: no python on PATH but what the test puts there, no virtual environment active
    env = {"PATH": path, "HOME": str(tmp_path), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([str(root / "train.sh"), str(cfg), "1"], env=env, capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


def test_train_sh_runs_where_only_python3_exists(tmp_path):
    bin_dir = tmp_path / "bin"
    _wrapper(str(bin_dir / "python3"))
    r = _train(_clone(tmp_path), tmp_path, f"{bin_dir}:/usr/bin:/bin")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "work" / "checkpoints").is_dir()


def test_train_sh_prefers_the_repositorys_venv(tmp_path):
    root = _clone(tmp_path)
    marker = tmp_path / "venv_started"
    _wrapper(str(root / ".venv" / "bin" / "python"), marker)
    bin_dir = tmp_path / "bin"
    _wrapper(str(bin_dir / "python3"))  # also has torch: the .venv must still win
    r = _train(root, tmp_path, f"{bin_dir}:/usr/bin:/bin")
    assert r.returncode == 0, r.stderr[-2000:]
    assert marker.read_text().count("started") >= 1


def test_the_active_venv_wins_over_the_repositorys(tmp_path):
    root = _clone(tmp_path)
    _wrapper(str(root / ".venv" / "bin" / "python"), tmp_path / "repo_venv")
    active = tmp_path / "active"
    _wrapper(str(active / "bin" / "python"), tmp_path / "active_venv")
    r = _train(root, tmp_path, "/usr/bin:/bin", VIRTUAL_ENV=str(active))
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "active_venv").exists() and not (tmp_path / "repo_venv").exists()


def _no_torch_on(path):
    probe = "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is None)"
    for name in ("python3", "python"):
        for d in path.split(":"):
            exe = os.path.join(d, name)
            if os.access(exe, os.X_OK) and subprocess.run([exe, "-c", probe]).returncode == 0:
                return False
    return True


@pytest.mark.skipif(not _no_torch_on("/usr/bin:/bin"), reason="the system Python has torch")
@pytest.mark.parametrize("script", ["train.sh", "test.sh"])
def test_no_python_with_torch_is_one_line_with_the_install_command(tmp_path, script):
    root = _clone(tmp_path)  # no .venv (the README's install makes one in the real repository)
    r = subprocess.run([str(root / script), "configs/default.yaml", "x.pth"],
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}, capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "python3 -m venv .venv && .venv/bin/pip install -r requirements.txt" \
        in r.stderr, r.stderr


def test_a_python_without_torch_in_PYTHON_is_refused_in_one_line(tmp_path):
    r = subprocess.run([os.path.join(ROOT, "train.sh")], env={"PATH": "/usr/bin:/bin", "PYTHON": "/bin/false"},
                       capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "PYTHON=/bin/false" in r.stderr, r.stderr
