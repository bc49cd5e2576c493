"""Trying a combination (issue 19 item 3): python -m tools.check / tools.train --check build the model, show the
blocks placed and their cost against the plain backbone, run a few steps on synthetic data and write nothing."""
import os

import pytest

from tools import check, train


def _run(tmp_path, capsys, *args, main=check.main):
    cwd = os.getcwd()
    os.chdir(tmp_path)  # nothing may appear here (no work_dirs/)
    try:
        code = main([os.path.join(train.__file__.rsplit("/tools/", 1)[0], args[0]), *args[1:]])
    finally:
        os.chdir(cwd)
    out, err = capsys.readouterr()
    assert os.listdir(tmp_path) == [], "the check wrote files"
    return code, out, err


@pytest.mark.parametrize("main", [check.main, train.main], ids=["tools.check", "tools.train --check"])
def test_ce_combination_shows_its_blocks_cost_and_steps(tmp_path, capsys, main):
    args = ["configs/default.yaml"] + (["--check"] if main is train.main else [])
    if main is train.main:
        with pytest.raises(SystemExit) as e:
            _run(tmp_path, capsys, *args, main=main)
        return _assert_default(e.value.code, capsys.readouterr().out)
    code, out, _ = _run(tmp_path, capsys, *args)
    _assert_default(code, out)


def _assert_default(code, out):
    assert code == 0, out
    assert "cifar_resnet20, 10 classes, 32x32 input; blocks: ce after_norm in stages [1, 2, 3]" in out
    assert "placed 9 modules:" in out
    assert "3 x CE(32, groups=2x16, newton_iters=3" in out and "layer2.0.ce, layer2.1.ce, layer2.2.ce" in out
    assert "params 0.278 M (+0.008, +3.1%)" in out and "vs the plain cifar_resnet20 at 32x32" in out
    assert "ok: 3 steps on one batch of 2 synthetic 32x32 images (CPU, fp32), loss " in out
    assert out.rstrip().endswith("; nothing written")


def test_a_conv_type_is_shown_where_it_replaced_the_convs(tmp_path, capsys):
    code, out, _ = _run(tmp_path, capsys, "configs/ablation/we_resnet20.yaml", "data.input_size=16", "--steps", "2")
    assert code == 0, out
    assert "blocks: conv we (lwe=True, mwe=True)" in out
    assert " x WEConv2d(" in out and "layer1.0.conv1" in out
    assert "ok: 2 steps" in out


def test_a_refused_combination_is_one_line_and_exit_2(tmp_path, capsys):
    code, out, err = _run(tmp_path, capsys, "configs/default.yaml", "model.plugins=[{type: ce, nope: 1}]")
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ") and "nope" in err, err
