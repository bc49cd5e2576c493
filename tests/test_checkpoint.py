"""engine/checkpoint.py: atomic saves, safe loading, the checkpoint manager, work-dir checks."""
import builtins
import errno
import io
import json
import logging
import os
import pickle
import random

import numpy as np
import pytest
import torch

from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from engine.checkpoint_manager import CheckpointManager
from engine.state import capture_rng_state, restore_rng_state
import engine.checkpoint as ck
import engine.checkpoint_manager as ckm


def _state(value=1.0, n=8):
    return {'model': {'w': torch.full((n,), float(value))}, 'epoch': int(value)}


def _listing(d):
    return sorted(os.listdir(d))


# ----------------------------------------------------------------------------- save / load

def test_roundtrip_converts_mappings_and_numpy(tmp_path):
    class Cfg(dict):
        pass
    path = tmp_path / 'a.pth'
    save_checkpoint({'config': Cfg(train=Cfg(lr=0.1)), 'metric': np.float64(0.5), 'arr': np.arange(3)}, path)
    state = load_checkpoint(path)
    assert type(state['config']) is dict and type(state['config']['train']) is dict
    assert state['metric'] == 0.5 and isinstance(state['metric'], float)
    assert torch.equal(state['arr'], torch.arange(3))


def test_unsavable_object_is_refused_before_writing(tmp_path):
    path = tmp_path / 'a.pth'
    with pytest.raises(CheckpointError, match=r"state\['hook'\] of type builtins.function"):
        save_checkpoint({'hook': lambda: 0}, path)
    assert _listing(tmp_path) == []


@pytest.mark.parametrize('fail', ['torch.save', 'os.replace', 'fsync'])
def test_exception_mid_write_keeps_old_file(tmp_path, monkeypatch, fail):
    path = tmp_path / 'a.pth'
    save_checkpoint(_state(1), path)
    before = _listing(tmp_path)

    def half_save(obj, f, *a, **k):
        f.write(b'PK\x03\x04 half a checkpoint')
        raise RuntimeError('boom')

    def boom(*a, **k):
        raise RuntimeError('boom')
    if fail == 'torch.save':
        monkeypatch.setattr(ck.torch, 'save', half_save)
    elif fail == 'os.replace':
        monkeypatch.setattr(ck.os, 'replace', boom)
    else:
        monkeypatch.setattr(ck.os, 'fsync', boom)
    with pytest.raises(CheckpointError, match=r'could not write .*a\.pth.*boom.*previous file.*intact'):
        save_checkpoint(_state(2), path)
    monkeypatch.undo()
    assert _listing(tmp_path) == before  # no temporary file left behind
    assert load_checkpoint(path)['epoch'] == 1


def test_disk_full_keeps_old_file_and_says_so(tmp_path, monkeypatch):
    path = tmp_path / 'a.pth'
    save_checkpoint(_state(1), path)
    real_open = builtins.open

    class FullDisk(io.RawIOBase):
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, b):
            self.n += len(b)
            if self.n > 64:
                raise OSError(errno.ENOSPC, 'No space left on device')
            return self.f.write(b)

        def fileno(self):
            return self.f.fileno()

        def writable(self):
            return True

        def close(self):
            self.f.close()
            super().close()

    monkeypatch.setattr(ck, 'open', lambda *a, **k: FullDisk(real_open(*a, **k)), raising=False)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(_state(2, n=10000), path)
    monkeypatch.undo()
    msg = str(info.value)
    assert 'no space left on device' in msg and str(path) in msg and '\n' not in msg
    assert _listing(tmp_path) == ['a.pth']
    assert load_checkpoint(path)['epoch'] == 1


@pytest.mark.parametrize('how', ['torch.save', 'pickle2', 'pickle4', 'pickle0'])
def test_malicious_pickle_is_not_executed(tmp_path, how):
    marker = tmp_path / 'pwned'

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), 'w'))
    path = tmp_path / 'evil.pth'
    if how == 'torch.save':
        torch.save({'model': Evil()}, path)
    else:
        path.write_bytes(pickle.dumps({'model': Evil()}, protocol=int(how[-1])))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    msg = str(info.value)
    assert f'refusing to unpickle code from {path}' in msg and 'tools.convert_pickle --trust' in msg
    assert '\n' not in msg
    assert not marker.exists()


def test_convert_pickle_tool_makes_a_trusted_file_loadable(tmp_path):
    from tools.convert_pickle import main
    src, dst = tmp_path / 'old.pth.tar', tmp_path / 'plain.pth'
    torch.save({'state_dict': {'w': torch.ones(2)}, 'best_prec1': np.float64(76.1)}, src)
    with pytest.raises(CheckpointError, match='refusing'):
        load_checkpoint(src)
    with pytest.raises(SystemExit):
        main([str(src), str(dst)])  # --trust is required
    assert main(['--trust', str(src), str(dst)]) == 0
    assert load_checkpoint(dst)['best_prec1'] == pytest.approx(76.1)


@pytest.mark.parametrize('damage, expect', [
    (lambda b: b[:len(b) // 2], 'is truncated or corrupt'),
    (lambda b: b[:-30], 'is truncated or corrupt'),
    (lambda b: b[:2], 'is truncated or corrupt'),
    (lambda b: b'', r'is empty \(0 bytes\)'),
    (lambda b: b'model: resnet50\n', 'is not a PyTorch checkpoint'),
    (lambda b: b'<html>404 Not Found</html>', 'is an HTML/XML page, not a PyTorch checkpoint'),
    (lambda b: b'\x80\x02\x8a\x0a\x6c\xfc\x9c\x46', r'is truncated \(EOFError\)'),
    (lambda b: b'\x80\x02K\x01.', 'refusing to unpickle code from .*plain Python pickle'),
])
def test_damaged_or_foreign_file_gives_one_line_error(tmp_path, damage, expect):
    good = io.BytesIO()
    torch.save(_state(1, n=2000), good)
    path = tmp_path / 'bad.pth'
    path.write_bytes(damage(good.getvalue()))
    with pytest.raises(CheckpointError, match=expect) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and '\n' not in str(info.value)


def test_missing_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match='not found'):
        load_checkpoint(tmp_path / 'nope.pth')
    with pytest.raises(CheckpointError, match='is a directory'):
        load_checkpoint(tmp_path)


def test_rng_state_roundtrip(tmp_path):
    save_checkpoint({'rng': capture_rng_state()}, tmp_path / 'r.pth')
    first = (random.random(), np.random.rand(), torch.rand(1).item())
    restore_rng_state(load_checkpoint(tmp_path / 'r.pth')['rng'])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == first


# ----------------------------------------------------------------------------- manager

def test_names():
    assert ckm.checkpoint_name('epoch_3') == 'epoch_003.pth'
    assert ckm.checkpoint_name('step_1200') == 'step_0001200.pth'
    assert ckm.checkpoint_name('preempt') == 'preempt.pth'
    for bad in ('../x', 'best', 'latest', ''):
        with pytest.raises(CheckpointError, match='bad checkpoint tag'):
            ckm.checkpoint_name(bad)


def test_manager_keeps_last_k_and_best(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=2)
    for epoch, metric in enumerate([1.0, 3.0, 2.0, 0.5, 0.7], 1):
        m.save(_state(epoch), f'epoch_{epoch}', metric=metric)
    d = tmp_path / 'checkpoints'
    assert _listing(d) == ['best.json', 'best.pth', 'epoch_004.pth', 'epoch_005.pth', 'latest']
    assert (d / 'latest').read_text().strip() == 'epoch_005.pth'
    assert load_checkpoint(d / 'best.pth')['epoch'] == 2
    assert m.latest() == str(d / 'epoch_005.pth')
    again = CheckpointManager(tmp_path, keep_last=2)  # a restarted run remembers the best metric
    assert again.best_metric == 3.0
    again.save(_state(6), 'epoch_6', metric=2.5)
    assert load_checkpoint(d / 'best.pth')['epoch'] == 2
    again.save(_state(7), 'epoch_7', metric=4.0)
    assert load_checkpoint(d / 'best.pth')['epoch'] == 7


def test_best_json_keeps_best_top1_and_top5_each_over_epochs(tmp_path):
    """ED-Net reports 100 - best top-1 and 100 - best top-5, each maximised on its own."""
    m = CheckpointManager(tmp_path)
    for epoch, (top1, top5) in enumerate([(70.0, 90.0), (71.0, 89.5), (70.5, 90.2)], 1):
        m.record_best_of({'top1': top1, 'top5': top5, 'loss': 1.0})
        m.save(_state(epoch), f'epoch_{epoch}', metric=top1)
    meta = json.loads((tmp_path / 'checkpoints' / 'best.json').read_text())
    assert meta == {'file': 'epoch_002.pth', 'metric': 71.0, 'mode': 'max', 'best_top1': 71.0, 'best_top5': 90.2}
    again = CheckpointManager(tmp_path)   # a restarted run keeps them
    again.record_best_of({'top1': 60.0, 'top5': 90.1})
    assert json.loads((tmp_path / 'checkpoints' / 'best.json').read_text()) == meta


def test_manager_min_mode_and_keep_all(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=None, mode='min')
    for step, loss in [(10, 2.0), (20, 1.0), (30, 1.5)]:
        m.save(_state(step), f'step_{step}', metric=loss)
    assert len(m.checkpoints()) == 3
    assert load_checkpoint(m.best_path)['epoch'] == 20


def test_latest_falls_back_when_newest_is_unreadable(tmp_path, caplog):
    m = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2, 3):
        m.save(_state(step), f'step_{step}')
    newest = tmp_path / 'checkpoints' / 'step_0000003.pth'
    newest.write_bytes(newest.read_bytes()[:100])  # e.g. a bad disk or a partial copy
    with caplog.at_level(logging.WARNING):
        assert m.latest() == str(tmp_path / 'checkpoints' / 'step_0000002.pth')
    assert 'skipping checkpoint' in caplog.text and 'falling back' in caplog.text and 'step_0000003.pth' in caplog.text
    state, path = m.load_latest()
    assert state['epoch'] == 2 and path.endswith('step_0000002.pth')
    # a checkpoint that passes the quick check but fails to unpickle is skipped by load_latest
    m.path('step_0000002.pth')
    torch.save({'x': np.zeros(1)}, m.path('step_0000002.pth'))
    state, path = m.load_latest()
    assert state['epoch'] == 1


def test_all_checkpoints_unreadable_is_an_error_not_a_fresh_start(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    m.save(_state(1), 'step_1')
    path = tmp_path / 'checkpoints' / 'step_0000001.pth'
    path.write_bytes(b'')
    assert m.latest() is None
    with pytest.raises(CheckpointError, match=r'none of the 1 checkpoints in .* can be read \(newest: checkpoint '
                                              r'.*step_0000001.pth is empty.*auto_resume=false'):
        m.load_latest()


def test_latest_pointer_to_missing_file_and_empty_dir(tmp_path):
    m = CheckpointManager(tmp_path, keep_last=3)
    assert m.latest() is None and m.load_latest() == (None, None)
    m.save(_state(1), 'step_1')
    (tmp_path / 'checkpoints' / 'latest').write_text('step_0000009.pth\n')
    assert m.latest().endswith('step_0000001.pth')


def test_stale_temporary_files_are_cleaned(tmp_path):
    m = CheckpointManager(tmp_path)
    d = tmp_path / 'checkpoints'
    d.mkdir()
    stale = d / f'.step_0000005.pth.abc123.{ck._host()}.999999999.tmp'
    stale.write_bytes(b'half')
    m.save(_state(1), 'step_1')
    assert not stale.exists()


def test_nonfinite_weights_are_not_saved(tmp_path):
    m = CheckpointManager(tmp_path)
    m.save(_state(1), 'step_1')
    bad = _state(2)
    bad['model']['w'][0] = float('nan')
    with pytest.raises(CheckpointError, match=r'model weight w is not finite.*step_0000001\.pth'):
        m.save(bad, 'step_2')
    assert m.latest().endswith('step_0000001.pth')


# ----------------------------------------------------------------------------- work dir

def test_check_writable(tmp_path):
    assert ckm.check_writable(tmp_path / 'new' / 'dir', need_bytes=1) > 0
    assert _listing(tmp_path / 'new' / 'dir') == []
    with pytest.raises(CheckpointError, match=r'GiB free but a checkpoint needs about'):
        ckm.check_writable(tmp_path, need_bytes=1 << 60)
    (tmp_path / 'afile').write_text('x')
    with pytest.raises(CheckpointError, match='is a file, not a directory'):
        ckm.check_writable(tmp_path / 'afile')


@pytest.mark.skipif(os.name != 'posix' or os.geteuid() == 0, reason='root can write anywhere')
def test_check_writable_read_only(tmp_path):
    ro = tmp_path / 'ro'
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(CheckpointError, match='is not writable: permission denied'):
            ckm.check_writable(ro)
    finally:
        ro.chmod(0o700)


def test_state_nbytes():
    assert ck.state_nbytes({'a': torch.zeros(10), 'b': [torch.zeros(2, dtype=torch.float64)], 'c': 3}) == 56
