"""engine/guard.py (preemption, nan/inf losses) and the quick fault-injection run of tests/fault_inject.py."""
import math
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

from core import exits
from engine.checkpoint_manager import CheckpointManager
from engine.guard import NonFiniteError, NonFiniteGuard, PreemptionGuard
from tests.fault_inject import compare

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_exit_codes_are_distinct_and_documented():
    codes = {n: getattr(exits, n) for n in dir(exits) if n.startswith('EXIT_')}
    assert codes == {'EXIT_OK': 0, 'EXIT_ERROR': 1, 'EXIT_USAGE': 2, 'EXIT_NONFINITE': 3, 'EXIT_IO': 74,
                     'EXIT_PREEMPTED': 75, 'EXIT_PEER_LOST': 76}
    for name, code in codes.items():
        assert f'{code:<4}  {name}' in exits.__doc__


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_preemption_guard_sets_a_flag_and_restores_handlers(sig):
    before = signal.getsignal(sig)
    with PreemptionGuard() as g:
        assert not g.requested
        os.kill(os.getpid(), sig)
        assert g.requested and g.signum == sig
        assert g.requested  # stays set
    assert signal.getsignal(sig) == before


@pytest.mark.skipif(not hasattr(os, 'fork'), reason='needs fork')
def test_second_signal_kills_at_once():
    pid = os.fork()
    if pid == 0:  # child: the first SIGTERM only sets the flag, a later one is fatal
        try:
            g = PreemptionGuard(repeat_after=0.05).install()
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)  # the same request delivered twice (group + launcher): ignored
            time.sleep(0.1)
            os.kill(os.getpid(), signal.SIGTERM)  # SLURM/torchrun repeat SIGTERM, then send SIGKILL: ignored
            if g.requested and g.signum == signal.SIGTERM:
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C again: stop now
        finally:
            os._exit(7)  # reached only if the second signal did not kill us
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGINT


def test_nonfinite_guard_skips_then_stops_naming_step_and_checkpoint(tmp_path):
    manager = CheckpointManager(tmp_path)
    manager.save({'model': {'w': torch.ones(2)}}, 'step_10')
    g = NonFiniteGuard(max_skips=2, checkpoints=manager)
    assert g.step_ok(torch.tensor(1.0), 11)
    assert not g.step_ok(torch.tensor(float('nan')), 12)
    assert g.step_ok(1.5, 13)  # a good step resets the run of bad ones
    assert not g.step_ok(torch.tensor(float('inf')), 14)
    assert not g.step_ok(float('nan'), 15)
    with pytest.raises(NonFiniteError) as info:
        g.step_ok(torch.tensor(float('nan')), 16)
    msg = str(info.value)
    assert 'at step 16, 3 steps in a row' in msg and 'train.max_nonfinite=2' in msg
    assert 'last finite step 13' in msg and 'step_0000010.pth' in msg and '\n' not in msg
    assert g.total == 4
    with pytest.raises(NonFiniteError, match='last good checkpoint: none saved yet'):
        NonFiniteGuard(0).step_ok(math.inf, 1)


def test_compare_finds_a_one_ulp_difference():
    a = {'model': {'w': torch.ones(3)}, 'step': 4, 'rng': [(1, (2, 3))]}
    b = {'model': {'w': torch.ones(3)}, 'step': 4, 'rng': [(1, (2, 3))]}
    assert compare(a, b) == []
    b['model']['w'][1] = torch.nextafter(torch.tensor(1.0), torch.tensor(2.0))
    b['rng'] = [(1, (2, 4))]
    assert compare(a, b) == ['model.w', 'rng[0][1][1]']


def test_quick_fault_injection(tmp_path):
    """3 SIGKILLs (one inside a checkpoint write) and a SIGTERM; resumed run is bit-identical."""
    p = subprocess.run([sys.executable, '-m', 'tests.fault_inject', '--kills', '3', '--save-kills', '1',
                        '--terms', '1', '--epochs', '1', '--train-size', '96', '--work-dir', str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    assert re.search(r'kills survived: 3 SIGKILL \(1 inside a checkpoint write, \d during setup\/resume\), '
                     r'1 SIGTERM \(1 saved and exited 75\)', out), out
    assert 'checkpoints found corrupt: 0' in out
    assert 'bit-identical to the uninterrupted run: yes' in out


def test_second_run_on_a_work_dir_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path):
    """Item 3 of issue 10: one run per work directory (engine/lock.py); the OS frees the lock of a dead run."""
    work = tmp_path / 'run'
    holder = subprocess.Popen([sys.executable, '-c', 'import sys, time; from engine.lock import WorkDirLock; '
                               f'lock = WorkDirLock({str(work)!r}).acquire(); print("locked", flush=True); '
                               'time.sleep(600)'],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'locked'
        cmd = [sys.executable, '-m', 'tools.train', 'runtime.device=cpu', f'runtime.work_dir={work}',
               'runtime.max_steps=1', 'data.dataset=synthetic', 'data.input_size=8', 'data.synthetic.train_size=16',
               'data.synthetic.val_size=8', 'train.batch_size=8', 'runtime.tensorboard=false']
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, p.stdout + p.stderr
        assert p.stderr.count('\n') == 1 and 'is in use by another run' in p.stderr, p.stderr
        assert f'pid {holder.pid} on ' in p.stderr and 'Traceback' not in p.stderr
        assert sorted(os.listdir(work)) == ['.lock'], 'the refused run wrote into the work directory'
    finally:
        holder.kill()
        holder.wait()
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    assert (work / 'log.txt').is_file()


def test_trainer_holds_the_work_dir_lock_for_the_whole_run(tmp_path):
    from engine.lock import WorkDirBusy, WorkDirLock
    from engine.trainer import Trainer
    from tests.engine_helpers import tiny_cfg, tiny_model
    cfg = tiny_cfg(tmp_path, 'train.epochs=1', 'eval.interval=0')
    trainer = Trainer(cfg, model_fn=tiny_model)
    with pytest.raises(WorkDirBusy, match='in use by another run'):
        WorkDirLock(tmp_path).acquire()
    trainer.train()
    WorkDirLock(tmp_path).acquire().release()  # released at the end


def test_a_forked_child_does_not_keep_a_dead_runs_lock(tmp_path):
    """A data loader worker outliving its killed trainer (up to 5 s) must not hold the work dir for it."""
    from engine.lock import WorkDirLock
    code = ('import os, signal, time; from engine.lock import WorkDirLock\n'
            f'lock = WorkDirLock({str(tmp_path)!r}).acquire()\n'
            'child = os.fork()\n'
            'if child == 0:\n    os.close(1); os.close(2); time.sleep(60); os._exit(0)\n'
            'print(child, flush=True); os.kill(os.getpid(), signal.SIGKILL)\n')
    p = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == -signal.SIGKILL, p.stderr
    child = int(p.stdout)
    try:
        os.kill(child, 0)  # the forked child still runs ...
        WorkDirLock(tmp_path).acquire().release()  # ... and the lock is free
    finally:
        os.kill(child, signal.SIGKILL)
