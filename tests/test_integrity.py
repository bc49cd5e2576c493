"""Issue 23 items 1-3 and issue 19 item 5: work dirs owned by their recipe, checkpoints that prove their
integrity, evaluation that matches training, evaluation from a checkpoint alone; through ./train.sh and
./test.sh as users run them."""
import json
import os
import shutil
import subprocess

import pytest
import torch

from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from engine.checkpoint_manager import BEST_META, CheckpointManager
from engine.config import default_work_dir
from tests.engine_helpers import ROOT, launch_env, run_train_sh
from tests.fault_inject import flip_tensor_bit


def _state(epoch, value=None):
    return {'model': {'w': torch.full((64, 64), float(epoch if value is None else value))}, 'epoch': epoch,
            'config': {'train': {'lr': 0.1}}}


# ----------------------------------------------------------------------------- integrity

def test_a_flipped_bit_in_a_tensor_is_refused(tmp_path):
    path = tmp_path / 'a.pth'
    save_checkpoint(_state(1), path)
    assert 'integrity' not in load_checkpoint(path)  # checked and removed
    flip_tensor_bit(path)
    with pytest.raises(CheckpointError, match=r'a\.pth fails its integrity check .*use another checkpoint'):
        load_checkpoint(path)


def test_a_changed_non_tensor_value_is_refused(tmp_path):
    from engine.integrity import seal
    sealed = seal(_state(1))
    sealed['epoch'] = 2  # what a flipped bit in data.pkl can do without breaking the pickle
    torch.save(sealed, tmp_path / 'b.pth')
    with pytest.raises(CheckpointError, match='fails its integrity check'):
        load_checkpoint(tmp_path / 'b.pth')


def test_a_foreign_file_is_checked_by_its_zip_crc(tmp_path):
    path = tmp_path / 'resnet-0123abcd.pth'
    torch.save({'fc.weight': torch.randn(64, 64)}, path)  # as torchvision's files: no hash inside
    assert set(load_checkpoint(path)) == {'fc.weight'}
    flip_tensor_bit(path)
    with pytest.raises(CheckpointError, match=r'resnet-0123abcd\.pth is corrupt: member .* fails its zip CRC'):
        load_checkpoint(path)


def test_best_pth_is_an_independent_copy(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=None)
    m.save(_state(1), 'epoch_1', metric=50.0)
    epoch = m.path('epoch_001.pth')
    assert os.stat(epoch).st_ino != os.stat(m.best_path).st_ino
    flip_tensor_bit(epoch)  # damage to the epoch file does not reach best.pth
    assert load_checkpoint(m.best_path)['epoch'] == 1


def test_best_pth_is_rewritten_when_its_source_is_rewritten_with_a_tie(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=None)
    m.save(_state(1), 'epoch_1', metric=50.0)
    m.save(_state(2), 'epoch_2', metric=60.0)
    m.save(_state(2, value=7.0), 'epoch_2', metric=60.0)  # epoch 2 trained again after a fallback, same metric
    assert torch.equal(load_checkpoint(m.best_path)['model']['w'], torch.full((64, 64), 7.0))
    m.save(_state(2, value=8.0), 'epoch_2', metric=55.0)  # rewritten worse: best.pth keeps the better model
    assert torch.equal(load_checkpoint(m.best_path)['model']['w'], torch.full((64, 64), 7.0))


def test_best_metric_is_recovered_from_the_checkpoints_without_best_json(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=None)
    m.save(_state(1), 'epoch_1', metric=90.0)
    m.save(_state(2), 'epoch_2', metric=80.0)
    assert load_checkpoint(m.path('epoch_001.pth'))['metric'] == 90.0
    os.remove(m.path(BEST_META))
    m = CheckpointManager(tmp_path, keep_last=None)
    assert m.recover_best(resumed_best=None) == 90.0  # from best.pth's stored metric
    m.save(_state(3), 'epoch_3', metric=85.0)  # worse than the best: best.pth stays epoch 1
    assert load_checkpoint(m.best_path)['epoch'] == 1
    assert json.loads(open(m.path(BEST_META)).read())['metric'] == 90.0


# ----------------------------------------------------------------------------- work dirs

def _shipped_configs():
    return sorted(os.path.relpath(os.path.join(d, n), ROOT) for d, _, names in os.walk(os.path.join(ROOT, 'configs'))
                  for n in names if n.endswith('.yaml') and '_base_' not in d)


def test_every_shipped_config_has_its_own_default_work_dir():
    from core.config import read_tree  # the merged YAML (with _base_): enough to see runtime.work_dir
    dirs = {}
    for rel in _shipped_configs():
        tree = read_tree(os.path.join(ROOT, rel))
        dirs.setdefault((tree.get('runtime') or {}).get('work_dir') or default_work_dir(rel), []).append(rel)
    shared = {d: c for d, c in dirs.items() if len(c) > 1}
    assert not shared, shared
    assert default_work_dir('configs/imagenet/cenet/resnet50.yaml') == os.path.join('work_dirs', 'imagenet', 'cenet',
                                                                                     'resnet50')
    assert default_work_dir(os.path.join(ROOT, 'configs/cifar/cifar100/resnet56.yaml')) == \
        os.path.join('work_dirs', 'cifar', 'cifar100', 'resnet56')
    assert default_work_dir('/home/me/my_exp.yaml') == os.path.join('work_dirs', 'my_exp')


def test_recipe_diff_ignores_what_may_change_on_resume():
    from engine.ownership import describe_diff, recipe_diff
    old = {'model': {'backbone': 'resnet50'}, 'train': {'lr': 0.1, 'epochs': 90},
           'data': {'root': '/a', 'workers': 4}, 'runtime': {'max_steps': 0}}
    new = {'model': {'backbone': 'resnet101'}, 'train': {'lr': 0.1, 'epochs': 100},
           'data': {'root': '/b', 'workers': 8}, 'runtime': {'max_steps': 5}}
    diff = recipe_diff(old, new)
    assert describe_diff(diff) == 'model.backbone: resnet50 -> resnet101'


# ----------------------------------------------------------------------------- the user's path

TINY = """
model: {{backbone: cifar_resnet20, num_classes: 4}}
data: {{dataset: synthetic, input_size: 8, workers: 0, synthetic: {{train_size: 32, val_size: 9}}}}
train: {{epochs: 2, batch_size: 8, lr: 0.05}}
eval: {{interval: 1}}
runtime: {{device: cpu, work_dir: {work}, log_interval: 4, tensorboard: false}}
"""


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A finished 2-epoch run (./train.sh, one process): its folder holds tiny.yaml and run/."""
    root = tmp_path_factory.mktemp('trained')
    (root / 'tiny.yaml').write_text(TINY.format(work=root / 'run'))
    r = run_train_sh(root / 'tiny.yaml', 1, cwd=root)
    assert r.returncode == 0, r.out
    return root


@pytest.fixture
def run_copy(trained, tmp_path):
    """A private copy of the trained run (tiny.yaml points at it)."""
    shutil.copytree(trained / 'run', tmp_path / 'run')
    (tmp_path / 'tiny.yaml').write_text(TINY.format(work=tmp_path / 'run'))
    return tmp_path


def _tree(work):
    return {os.path.relpath(os.path.join(d, n), work): os.stat(os.path.join(d, n)).st_mtime_ns
            for d, _, names in os.walk(work) for n in names}


def test_train_sh_refuses_another_recipe_and_writes_nothing(run_copy):
    work = run_copy / 'run'
    before = _tree(work)
    r = run_train_sh(run_copy / 'tiny.yaml', 2, 'train.lr=0.1', 'model.backbone=cifar_resnet32', cwd=run_copy)
    assert r.returncode == 2, r.out
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and 'Traceback' not in r.out, r.out
    assert f'work_dir {work} holds a run of another recipe (model.backbone: cifar_resnet20 -> cifar_resnet32, ' \
           'train.lr: 0.05 -> 0.1); pick another runtime.work_dir, or set runtime.resume_mismatch=allow' in errors[0]
    assert _tree(work) == before
    # where and how it runs may change: more epochs, workers, max_steps are a continuation of the same run
    r = run_train_sh(run_copy / 'tiny.yaml', 1, 'train.epochs=3', 'data.workers=1', 'runtime.log_interval=1',
                     cwd=run_copy)
    assert r.returncode == 0 and f'resumed from {work}/checkpoints/epoch_002.pth' in r.out, r.out


def test_resume_and_test_sh_refuse_a_flipped_bit_two_processes(run_copy):
    """The newest checkpoint rots on disk: ./test.sh refuses it in one line, best.pth (a copy) is intact, and
    ./train.sh with 2 processes and data workers resumes from the newest intact checkpoint and says so."""
    work = run_copy / 'run'
    newest = work / 'checkpoints' / 'epoch_002.pth'
    flip_tensor_bit(newest)
    t = subprocess.run([os.path.join(ROOT, 'test.sh'), str(newest)], cwd=run_copy, env=launch_env(),
                       capture_output=True, text=True, timeout=300)
    assert t.returncode == 2 and t.stdout == '', t.stdout + t.stderr
    assert t.stderr.strip().splitlines() == [f'error: checkpoint {newest} fails its integrity check ' +
                                             t.stderr.split('fails its integrity check ', 1)[1].strip()]
    assert load_checkpoint(work / 'checkpoints' / 'best.pth')['epoch'] in (1, 2)  # independent of the epoch file
    r = run_train_sh(run_copy / 'tiny.yaml', 2, 'train.epochs=3', 'data.workers=2', cwd=run_copy)
    assert r.returncode == 0, r.out
    line = [x for x in r.out.splitlines() if 'newest intact checkpoint' in x]
    assert len(line) == 1, r.out  # said once, not once per rank
    assert f'resuming from {work}/checkpoints/epoch_001.pth, the newest intact checkpoint; skipped 1 newer: ' \
           f'checkpoint {newest} fails its integrity check' in line[0]
    assert load_checkpoint(newest)['epoch'] == 2  # trained again and rewritten


def test_test_sh_from_a_work_dir_alone_two_processes(run_copy):
    """./test.sh WORK_DIR 2 uses the config stored in the checkpoint and best.pth; the result names the file."""
    work = run_copy / 'run'
    os.remove(run_copy / 'tiny.yaml')  # the config is not needed
    r = subprocess.run([os.path.join(ROOT, 'test.sh'), str(work), '2'], cwd=run_copy, env=launch_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f'{work} ({work}/checkpoints/best.pth): top1 ' in r.stdout and '(9/9 images)' in r.stdout
    assert 'warning' not in r.stdout + r.stderr
    record = json.loads((work / 'test_best.json').read_text())
    assert record['world_size'] == 2 and record['differences'] == []


def test_evaluation_reports_every_difference_from_the_training_config(run_copy, capsys):
    from tools import test as test_tool
    work = run_copy / 'run'
    latest = str(work / 'checkpoints' / 'latest')
    assert test_tool.run([latest, 'data.input_size=12']) == 0  # a pointer file; an explicit override
    err = capsys.readouterr().err
    assert "warning: data.input_size: 8 in the checkpoint's config, 12 used here (an explicit override)" in err
    other = run_copy / 'other.yaml'
    other.write_text(TINY.format(work=work).replace('input_size: 8,', 'input_size: 8, normalize: imagenet,'))
    assert test_tool.run([str(other), str(work / 'checkpoints' / 'epoch_001.pth')]) == 0
    out = capsys.readouterr()
    assert f"warning: data.mean/normalize: (0.5, 0.5, 0.5) in the checkpoint's config, (0.485, 0.456, 0.406) " \
           f"used here (from {other})" in out.err
    assert 'data.std/normalize' in out.err
    # a config that builds another model: the message names the file and the fix for evaluation
    ckpt = str(work / 'checkpoints' / 'epoch_001.pth')
    assert test_tool.run([str(other), ckpt, 'model.backbone=cifar_resnet32']) == 2
    err = capsys.readouterr().err
    assert f'weights in {ckpt} (blocklab format) do not fit the model' in err
    assert f'drop {other} to use the config stored in the checkpoint (./test.sh {ckpt})' in err
    assert '<state dict>' not in err and 'pretrained_ignore' not in err


def test_run_checkpoint_resolves_work_dirs_and_pointers(run_copy):
    from engine.checkpoint_manager import run_checkpoint
    work = run_copy / 'run'
    assert run_checkpoint(work) == str(work / 'checkpoints' / 'best.pth')
    assert run_checkpoint(work / 'checkpoints' / 'latest') == str(work / 'checkpoints' / 'epoch_002.pth')
    os.remove(work / 'checkpoints' / 'best.pth')
    assert run_checkpoint(work / 'checkpoints') == str(work / 'checkpoints' / 'epoch_002.pth')
    assert run_checkpoint(work / 'config.yaml') is None
    shutil.rmtree(work / 'checkpoints')
    os.makedirs(work / 'checkpoints')
    with pytest.raises(CheckpointError, match='holds no readable checkpoint'):
        run_checkpoint(work)
