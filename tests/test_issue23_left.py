"""The items left open in issue 23: a full disk while logging (74), a tiny /dev/shm (74), an enormous
input_size (2), the path forms users type, a damaged best.pth at start, and a non-zero rank's error
without tools/launch.py. Each case is refused in one line, writes nothing it should not, and keeps
the last good checkpoint."""
import errno
import os
import re
import subprocess
import sys

import pytest

from tests.test_bad_inputs import BASE, snapshot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_error(err):
    lines = [line for line in err.strip().splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


def test_enormous_input_size_is_refused_at_config_time(tmp_path, capsys, monkeypatch):
    """data.input_size=100000 used to allocate 57 TB (a DefaultCPUAllocator traceback, exit 1)."""
    from tools.train import run
    (tmp_path / "base.yaml").write_text(BASE)
    monkeypatch.chdir(REPO)
    for key in ("data.input_size", "data.eval_resize"):
        assert run([str(tmp_path / "base.yaml"), f"{key}=100000", f"runtime.work_dir={tmp_path}/work"]) == 2
        line = one_error(capsys.readouterr().err)
        assert re.search(rf"{key}=100,000 is larger than 8,192 .* 120\.0 GB as float32", line), line
        assert not (tmp_path / "work").exists()
