"""Kill a small training run again and again, resume it each time, and check nothing was lost.

    python -m tests.fault_inject                       # 20 SIGKILLs (6 in checkpoint writes, 2 in setup) + 2 SIGTERMs
    python -m tests.fault_inject --kills 3 --save-kills 1 --terms 1 --epochs 1 --train-size 96  # tests

1. Trains a tiny CIFAR ResNet-20 on synthetic 16x16 images on the CPU (deterministic,
   one thread, a checkpoint every 2 steps, EMA on, PCA lighting noise drawn from the
   global RNG) without interruption: the reference.
2. Trains the same config in a second work directory and strikes each start once its
   log reaches the next of a set of random target steps spread over the whole run (plus
   a random fraction of a step); ``--setup-kills`` land during setup/resume instead.
   ``--save-kills`` of the SIGKILLs are aimed inside a checkpoint write: that child runs
   with its checkpoint renames held (``os.replace`` of a ``.pth`` waits ``--sleep-in-save``
   seconds), so ``atomic_write`` pauses between fsyncing its temporary file and renaming
   it, and the kill lands as soon as a temporary file
   appears. ``--terms`` starts are stopped with SIGTERM instead (they must save and
   exit 75). Each time the same command is started again and auto-resumes.
3. After every kill, loads every checkpoint in the work directory (and the
   ``latest`` pointer's target) with ``load_checkpoint``: any failure is a corrupt checkpoint.
4. Compares the final checkpoints of both runs tensor by tensor.

Runs are forked from this process after the imports, so a restart costs no
import time. Prints kills survived, corrupt checkpoints (goal 0) and whether the
final weights are bit-identical; exits 0 only when all of that holds.

``--real`` strikes the path users run instead: ``./train.sh CONFIG 2`` (two
processes through tools/launch.py, gloo) with ``data.workers=2``, stopped in turn
by SIGTERM to the script, SIGTERM to every process group of the job (as SLURM
does), SIGINT to the script's process group (as a terminal's Ctrl-C does) and
SIGKILL of rank 1, SIGSTOP of rank 1 and SIGSTOP of one of its data workers
(hung processes: the watchdog must end the run); each start is resumed by the
same command. For each strike it reports the exit code (75, 75, 75, 76, 76, 76),
the checkpoint left (the stop step's, or the previous one intact after a kill
or a stall), and at the end whether the final
state is bit-identical to an uninterrupted ``./train.sh`` run (run alongside).
Two damage strikes stop the run with SIGTERM, then damage the checkpoint it
saved on disk (mtime kept, as bit rot does): ``bit-flip`` flips one bit inside a
tensor, ``truncate`` cuts the file to half its size in place. ``./test.sh`` on it
must refuse it in one line (exit 2), and the next start must resume from the
newest intact checkpoint and name the damaged one it skipped.

    python -m tests.fault_inject --real                     # all strikes
    python -m tests.fault_inject --real --strikes group-term,kill-rank --epochs 1   # tests
"""
import os

os.environ.setdefault('OMP_NUM_THREADS', '1')  # before torch: one thread per run, for speed and determinism

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

from engine.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from engine.checkpoint_manager import CheckpointManager  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP_DONE = 'world size'  # the trainer logs this line once built and resumed, before the first step
CONFIG = """# written by tests/fault_inject.py
model: {{backbone: cifar_resnet20, num_classes: 4}}
data:
  dataset: synthetic
  input_size: 16
  workers: {workers}
  synthetic: {{train_size: {train_size}, val_size: 16, num_classes: 4}}
  augment: {{lighting: 0.1}}   # drawn from the global torch RNG on the device: resume must restore it
train: {{epochs: {epochs}, batch_size: 8, lr: 0.05, schedule: cosine, warmup_epochs: 0.5, weight_decay: 0.0005,
        label_smoothing: 0.1, ema: true, ema_decay: 0.9}}
eval: {{batch_size: 16}}
runtime: {{device: cpu, deterministic: true, seed: 3, log_interval: 1, tensorboard: false,
          ckpt_interval_steps: 2, keep_last: 2}}
dist: {{watchdog_s: 10}}   # the stop-rank/stop-worker strikes: a stall ends the run in seconds
"""


# ----------------------------------------------------------------------------- child runs

def hold_renames(seconds):
    """In this process, hold every rename onto a ``.pth`` for ``seconds``: a kill can then land inside a
    checkpoint write, after its temporary file is written and before it is renamed into place."""
    rename = os.replace

    def held(src, dst, *args, **kwargs):
        if os.fspath(dst).endswith('.pth'):
            time.sleep(seconds)
        return rename(src, dst, *args, **kwargs)
    os.replace = held


def start(config, work_dir, log_path, hold_s=0.0):
    """Fork a child that runs ``tools.train`` on ``config`` (checkpoint renames held ``hold_s``); returns its pid."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:  # child
        fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        if hold_s:
            hold_renames(hold_s)
        torch.set_num_threads(1)
        from tools.train import run
        code = run([config, f'runtime.work_dir={work_dir}'])
    except BaseException:  # noqa: BLE001 - report and exit without running the parent's cleanup
        import traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


_FINISHED = {}  # pid -> wait status of children reaped early


def _code(status):
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def wait(pid):
    if pid in _FINISHED:
        return _code(_FINISHED.pop(pid))
    return _code(os.waitpid(pid, 0)[1])


def poll(pid):
    """Exit code if the child has finished, else None."""
    if pid in _FINISHED:
        return _code(_FINISHED.pop(pid))
    done, status = os.waitpid(pid, os.WNOHANG)
    return _code(status) if done else None


def wait_setup(pid, log, timeout):
    """Seconds until the child's log shows the trainer is set up (resumed), None if it exited first."""
    begin = time.time()
    while time.time() - begin < timeout:
        try:
            with open(log, errors='replace') as f:
                if SETUP_DONE in f.read():
                    return time.time() - begin
        except FileNotFoundError:
            pass
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:  # exited: put the status back for wait()/poll() by re-raising nothing; caller polls again
            _FINISHED[pid] = status
            return None
        time.sleep(0.005)
    return None


_STEP_LINE = re.compile(r'epoch (\d+)/\d+ \[(\d+)/(\d+)\]')


def logged_step(log):
    """The last optimizer step a run's log reports (the config logs every step), 0 if none yet."""
    try:
        with open(log, errors='replace') as f:
            matches = _STEP_LINE.findall(f.read())
    except FileNotFoundError:
        return 0
    if not matches:
        return 0
    epoch, it, per_epoch = map(int, matches[-1])
    return (epoch - 1) * per_epoch + it


def ckpt_dir(work_dir):
    return os.path.join(work_dir, 'checkpoints')


def tmp_files(work_dir):
    try:
        return {n for n in os.listdir(ckpt_dir(work_dir)) if n.endswith('.tmp')}
    except FileNotFoundError:
        return set()


# ----------------------------------------------------------------------------- checks

def scan(work_dir, damaged=()):
    """(checkpoints checked, list of problems) for every checkpoint and the latest pointer.

    ``damaged``: paths damaged on purpose (the damage strikes), not counted as long as they are there."""
    d = ckpt_dir(work_dir)
    if not os.path.isdir(d):
        return 0, []
    problems, checked = [], 0
    for name in sorted(os.listdir(d)):
        if name.endswith('.pth') and not name.startswith('.') and os.path.join(d, name) not in damaged:
            checked += 1
            try:
                load_checkpoint(os.path.join(d, name))
            except CheckpointError as exc:
                problems.append(str(exc))
    manager = CheckpointManager(work_dir, keep_last=None)
    pointer = manager.read_pointer()
    if os.path.exists(os.path.join(d, 'latest')) and (pointer is None or not os.path.isfile(pointer)):
        problems.append(f'latest pointer in {d} names a missing checkpoint ({pointer})')
    if checked and manager.latest() is None and not damaged:
        problems.append(f'no resumable checkpoint found in {d}')
    return checked, problems


def compare(a, b, where=''):
    """Keys (dotted) where two nested states differ; tensors must be bit-identical."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += compare(a.get(k), b.get(k), f'{where}.{k}' if where else str(k))
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in compare(x, y, f'{where}[{i}]')]
    return [] if a == b else [where]


def final_state(work_dir):
    state, path = CheckpointManager(work_dir).load_latest()
    if state is None:
        raise SystemExit(f'error: no final checkpoint in {work_dir}')
    state.pop('config', None)  # holds the work directory, which differs on purpose
    return state, path


# ----------------------------------------------------------------------------- the real path: ./train.sh

STRIKES = {  # name: (what it does, the exit code it must give)
    'script-term': ('SIGTERM to train.sh', 75),
    'group-term': ('SIGTERM to every process group of the job, as SLURM', 75),
    'group-int': ("SIGINT to train.sh's process group, as a terminal's Ctrl-C", 75),
    'kill-rank': ('SIGKILL of rank 1', 76),
    'bit-flip': ('SIGTERM, then one bit flipped inside a tensor of the newest checkpoint', 75),
    'truncate': ('SIGTERM, then the newest checkpoint truncated in place to half its size', 75),
    'stop-rank': ('SIGSTOP of rank 1 (a hung rank; dist.watchdog_s=10)', 76),
    'stop-worker': ('SIGSTOP of a data worker of rank 1 (a hung worker; dist.watchdog_s=10)', 76),
}
DAMAGES = ('bit-flip', 'truncate')  # strikes that damage the checkpoint the stop saved (see damage_checkpoint)


def process_tree(pid):
    """``pid`` and all its descendants (from /proc)."""
    parents = {int(n): _parent(int(n)) for n in os.listdir('/proc') if n.isdigit()}
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += [c for c, pp in parents.items() if pp == p]
    return tree


def _environ(pid):
    try:
        with open(f'/proc/{pid}/environ', 'rb') as f:
            return f.read().split(b'\0')
    except OSError:
        return []


def _parent(pid):
    try:
        with open(f'/proc/{pid}/stat') as f:
            return int(f.read().rsplit(')', 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def rank_pid(launcher, rank):
    """The trainer process of ``rank`` under ``launcher`` (not its data loader workers, which share its RANK)."""
    mark = f'RANK={rank}'.encode()
    for p in process_tree(launcher):
        if mark in _environ(p) and mark not in _environ(_parent(p)):
            return p
    return None


def strike(kind, pid):
    if kind == 'script-term' or kind in DAMAGES:
        os.kill(pid, signal.SIGTERM)
    elif kind == 'group-term':
        for group in {os.getpgid(p) for p in process_tree(pid) if _exists(p)}:
            os.killpg(group, signal.SIGTERM)
    elif kind == 'group-int':
        os.killpg(pid, signal.SIGINT)  # started in its own session: its group is the terminal's foreground group
    elif kind == 'kill-rank':
        os.kill(rank_pid(pid, 1), signal.SIGKILL)
    elif kind == 'stop-rank':  # the watchdog (core/watchdog.py) must end the run in seconds, naming it
        os.kill(rank_pid(pid, 1), signal.SIGSTOP)
    elif kind == 'stop-worker':
        rank1 = rank_pid(pid, 1)
        os.kill(next(p for p in process_tree(rank1) if _parent(p) == rank1), signal.SIGSTOP)


def _exists(pid):
    try:
        os.getpgid(pid)
        return True
    except OSError:
        return False


def flip_tensor_bit(path):
    """Flip one bit in the middle of the largest tensor storage of a torch zip checkpoint, in place."""
    import zipfile
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)
    with open(path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = int.from_bytes(f.read(2), 'little'), int.from_bytes(f.read(2), 'little')
        where = info.header_offset + 30 + name_len + extra_len + info.file_size // 2
        f.seek(where)
        byte = f.read(1)[0]
        f.seek(where)
        f.write(bytes([byte ^ 0x10]))
    return where


def damage_checkpoint(kind, path):
    """Damage ``path`` in place as ``kind`` says, keeping its modification time (bit rot does not touch it)."""
    st = os.stat(path)
    if kind == 'bit-flip':
        flip_tensor_bit(path)
    else:
        os.truncate(path, st.st_size // 2)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def check_damaged(path, root):
    """'' when ./test.sh refuses the damaged checkpoint in one line naming it (exit 2), else what went wrong."""
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR')}
    p = subprocess.run([os.path.join(REPO, 'test.sh'), path, '1', f'runtime.work_dir={root}'], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=300)
    lines = (p.stdout + p.stderr).strip().splitlines()
    if p.returncode == 2 and len(lines) == 1 and path in lines[0]:
        return ''
    return f'./test.sh on it exited {p.returncode}: {" | ".join(lines[-3:])[:200]}'


def fallback_line(text, damaged):
    """The resume line that names the intact checkpoint and the damaged one it skipped ('' if none)."""
    return next((line for line in text.splitlines() if 'the newest intact checkpoint; skipped' in line
                 and os.path.basename(damaged) in line), '')


def train_sh(config, work_dir, log_path):
    env = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR')}
    env['PYTHONPATH'] = REPO
    with open(log_path, 'w') as log:
        return subprocess.Popen([os.path.join(REPO, 'train.sh'), config, '2', f'runtime.work_dir={work_dir}'],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def prepare(args, workers):
    """(root directory, config path): the runs' directory with logs/ and the config written."""
    root = args.work_dir or tempfile.mkdtemp(prefix='blocklab_fault_')
    os.makedirs(os.path.join(root, 'logs'), exist_ok=True)
    config = os.path.join(root, 'fault.yaml')
    with open(config, 'w') as f:
        f.write(CONFIG.format(epochs=args.epochs, train_size=args.train_size, workers=workers))
    return root, config


def _damage(kind, path, root, damaged, result):
    """Damage strike: spoil the checkpoint the stop saved; ./test.sh must refuse it. True when it did."""
    damage_checkpoint(kind, path)
    refused = check_damaged(path, root)
    damaged['paths'].add(path)
    damaged['pending'] = (path, kind)
    result.update(damaged=path, test_sh_refused=not refused)
    print(f'  {kind}: {os.path.basename(path)} damaged; ./test.sh '
          f'{"refused it in one line (exit 2)" if not refused else "DID NOT REFUSE IT: " + refused}', flush=True)
    return not refused


def _check_fallback(damaged, text, results):
    """The start after a damage strike must resume from an intact checkpoint and name the damaged one."""
    if damaged['pending'] is None:
        return True
    path, kind = damaged['pending']
    damaged['pending'] = None
    line = fallback_line(text, path)
    m = re.search(r'resuming from (\S+), .*?skipped \d+ newer: checkpoint \S+ (.{0,60})', line)
    print(f'  next start after {kind}: ' + (f'resumed from {os.path.basename(m.group(1))}, skipped '
                                            f'{os.path.basename(path)} ({m.group(2)}...)' if m else
                                            f'NO FALLBACK LINE naming {path}'), flush=True)
    next(r for r in reversed(results) if r.get('damaged') == path)['fallback'] = line
    return bool(line)


def main_real(args):
    kinds = [k for k in args.strikes.split(',') if k]
    unknown = [k for k in kinds if k not in STRIKES]
    if unknown:
        print(f'error: unknown strike {unknown[0]!r}; choose from {", ".join(STRIKES)}', file=sys.stderr)
        return 2
    root, config = prepare(args, workers=2)
    t0 = time.time()
    ref_dir, run_dir = os.path.join(root, 'reference'), os.path.join(root, 'faulty')
    ref = train_sh(config, ref_dir, os.path.join(root, 'logs', 'reference.log'))  # runs alongside the strikes
    rng = random.Random(args.seed)
    total = args.epochs * (args.train_size // 8)
    targets = sorted(rng.randint(2, max(total - 2, 2)) for _ in kinds)
    results, ok = [], True
    damaged = {'paths': set(), 'pending': None}  # spoiled by the damage strikes; the one the next start must skip
    for i, (kind, target) in enumerate(zip(kinds, targets)):
        log = os.path.join(root, 'logs', f'strike_{i}_{kind}.log')
        before = CheckpointManager(run_dir).read_pointer()
        p = train_sh(config, run_dir, log)
        while p.poll() is None and logged_step(log) < target:
            time.sleep(0.01)
        step = logged_step(log)
        if p.poll() is None:
            strike(kind, p.pid)
        rc = p.wait(timeout=300)
        checked, problems = scan(run_dir, damaged['paths'])
        latest = CheckpointManager(run_dir).read_pointer()
        want = STRIKES[kind][1]
        if want == 75:  # a checkpoint of the step it stopped at
            saved = latest is not None and latest != before and os.path.basename(latest).startswith('step_')
        else:  # nothing new after the kill; the previous checkpoint intact (scan loads it)
            saved = latest is not None or before is None
        with open(log, errors='replace') as f:
            text = f.read()
        clean = 'Traceback' not in text
        error = '' if clean else next((line for line in reversed(text.splitlines()) if 'Error' in line), '?')
        fell_back = _check_fallback(damaged, text, results)
        good = rc == want and saved and not problems and clean and fell_back
        ok &= good
        results.append(dict(strike=kind, at_step=step, exit=rc, expected=want, checkpoint=latest,
                            corrupt=problems, traceback=not clean))
        print(f'{STRIKES[kind][0]} at step {step}: exit {rc} (want {want}); checkpoint '
              f'{os.path.basename(latest) if latest else "none"}{"" if saved else " (WRONG)"}; {checked} readable, '
              f'{len(problems)} corrupt; {"no traceback" if clean else f"TRACEBACK in {log}: {error[:160]}"}',
              flush=True)
        if kind in DAMAGES and saved:
            ok &= _damage(kind, latest, root, damaged, results[-1])
    rc = train_sh(config, run_dir, os.path.join(root, 'logs', 'finish.log')).wait(timeout=600)
    with open(os.path.join(root, 'logs', 'finish.log'), errors='replace') as f:
        ok &= _check_fallback(damaged, f.read(), results)
    ref_rc = ref.wait(timeout=600)
    if rc != 0 or ref_rc != 0:
        print(f'error: the final start exited {rc}, the reference {ref_rc}; see {root}/logs', file=sys.stderr)
        return 1
    diff = compare(final_state(ref_dir)[0], final_state(run_dir)[0])
    print(f'resumed result bit-identical to the uninterrupted ./train.sh run: {"yes" if not diff else "NO"}'
          f'{"" if not diff else " (differ: " + ", ".join(diff[:8]) + ")"}')
    print(f'time: {time.time() - t0:.1f}s' + (f'; runs in {root}' if args.work_dir else ''))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'strikes': results, 'identical': not diff, 'differing': diff[:20]}, f, indent=1)
    if not args.work_dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if ok and not diff else 1


# ----------------------------------------------------------------------------- main

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument('--kills', type=int, default=20, help='SIGKILLs in total (default 20)')
    p.add_argument('--save-kills', type=int, default=None, help='of which inside a checkpoint write (default kills/3)')
    p.add_argument('--setup-kills', type=int, default=None,
                   help='of which during setup/resume, before the first step (default kills/10)')
    p.add_argument('--terms', type=int, default=2, help='extra SIGTERM preemptions, each must exit 75 (default 2)')
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--train-size', type=int, default=96, help='synthetic training images (8 per step)')
    p.add_argument('--seed', type=int, default=0, help='seed of the kill schedule')
    p.add_argument('--sleep-in-save', type=float, default=0.3, help='seconds save_checkpoint waits before renaming')
    p.add_argument('--work-dir', help='keep the runs here (default: a temporary directory, removed afterwards)')
    p.add_argument('--json', help='also write the summary as JSON to this file')
    p.add_argument('--real', action='store_true', help='strike ./train.sh with 2 processes and 2 data workers')
    p.add_argument('--strikes', default=','.join(STRIKES), help=f'with --real: which, in order (default all: '
                   f'{",".join(STRIKES)})')
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.real:
        return main_real(args)
    save_kills = args.kills // 3 if args.save_kills is None else min(args.save_kills, args.kills)
    rng = random.Random(args.seed)
    root, config = prepare(args, workers=0)
    import data, engine.trainer, models, tools.train  # noqa: F401,E401 - import once, fork many times
    t0 = time.time()

    # 1. the reference run, timing its setup (until the trainer logs its world size) and its training
    ref = os.path.join(root, 'reference')
    ref_log = os.path.join(root, 'logs', 'reference.log')
    begin = time.time()
    pid = start(config, ref, ref_log)
    setup = wait_setup(pid, ref_log, timeout=600)
    rc = wait(pid)
    ref_time = time.time() - begin
    if rc != 0 or setup is None:
        print(f'error: the reference run failed (exit {rc}); see {ref_log}', file=sys.stderr)
        return 1
    train_time = max(ref_time - setup, 0.1)
    print(f'reference run: {ref_time:.1f}s ({setup:.1f}s setup, {train_time:.1f}s training)', flush=True)

    total_steps = logged_step(ref_log)
    if not total_steps:
        print(f'error: no step lines in {ref_log} (the trainer log format changed?)', file=sys.stderr)
        return 1
    step_time = train_time / total_steps

    # 2. the run that gets killed: each start is struck once its log reaches the next target step
    # (targets spread over the whole run, so kills land in every epoch, in evaluations and epoch-end saves)
    run_dir = os.path.join(root, 'faulty')
    setup_kills = min(args.kills // 10 if args.setup_kills is None else args.setup_kills, args.kills - save_kills)
    plan = ['kill'] * (args.kills - save_kills - setup_kills) + ['save'] * save_kills + ['setup'] * setup_kills \
        + ['term'] * args.terms
    rng.shuffle(plan)
    # strikes land within the step after their target: the last target leaves two steps, so no strike can
    # land after the run has finished (a SIGTERM there would find nothing to stop: the quick test's flake)
    targets = iter(sorted(rng.uniform(1, max(total_steps - 2, 1)) for _ in plan))
    stats = {'kills': 0, 'save_kills': 0, 'terms': 0, 'term_exit_ok': 0, 'attempts': 0, 'finished_early': 0,
             'checked': 0, 'corrupt': 0, 'problems': [], 'tmp_left': 0, 'during_setup': 0, 'kill_steps': []}
    rc = None
    for i, kind in enumerate(plan + ['finish']):
        stats['attempts'] += 1
        log = os.path.join(root, 'logs', f'attempt_{i:02d}_{kind}.log')
        begin = time.time()
        pid = start(config, run_dir, log, args.sleep_in_save if kind == 'save' else 0.0)
        if kind == 'finish':
            rc = wait(pid)
            break
        target = next(targets)
        in_setup = kind == 'setup'  # strike while it builds the model/data and loads the checkpoint
        deadline = begin + rng.uniform(0.1, setup) if in_setup else None
        seen = set(tmp_files(run_dir))
        while (rc := poll(pid)) is None:
            if deadline is None and logged_step(log) >= int(target):
                # reached the target step: strike at a random moment within the next step
                deadline = time.time() + rng.uniform(0.0, step_time)
            if kind == 'save':
                if deadline is not None and tmp_files(run_dir) - seen:  # the first write after the target
                    break
                seen |= tmp_files(run_dir) if deadline is None else set()
            elif deadline is not None and time.time() >= deadline:
                break
            time.sleep(0.002)
        if rc is not None:  # it finished before we struck
            stats['finished_early'] += 1
            print(f'attempt {i:2d} {kind:4s}: finished (exit {rc}) before the signal', flush=True)
            if rc == 0:
                break
            continue
        os.kill(pid, signal.SIGTERM if kind == 'term' else signal.SIGKILL)
        rc = wait(pid)
        if kind == 'term':
            stats['terms'] += 1
            stats['term_exit_ok'] += rc == 75
        else:
            stats['kills'] += 1
            stats['save_kills'] += kind == 'save'
            stats['during_setup'] += in_setup
        stats['kill_steps'].append(None if in_setup else logged_step(log))
        left = tmp_files(run_dir)
        stats['tmp_left'] += bool(left)
        checked, problems = scan(run_dir)
        stats['checked'] += checked
        stats['corrupt'] += len(problems)
        stats['problems'] += problems
        if in_setup:
            what = 'SIGKILL during setup'
        elif kind == 'save':
            what = f'SIGKILL inside a save ({", ".join(sorted(left)) or "after rename"})'
        else:
            what = 'SIGTERM' if kind == 'term' else 'SIGKILL'
        latest = CheckpointManager(run_dir, keep_last=None).latest()
        where = '' if in_setup else f' at step {logged_step(log)}'
        print(f'attempt {i:2d}: {what}{where} -> exit {rc}; {checked} checkpoints readable, {len(problems)} corrupt; '
              f'resumes from {os.path.basename(latest) if latest else "scratch"}', flush=True)
    if rc != 0:
        print(f'error: the killed run did not finish (exit {rc}); see {root}/logs', file=sys.stderr)
        return 1

    # 3. compare
    ref_state, ref_path = final_state(ref)
    run_state, run_path = final_state(run_dir)
    diff = compare(ref_state, run_state)
    stats.update(identical=not diff, differing=diff[:20], seconds=round(time.time() - t0, 1),
                 reference=ref_path, final=run_path)
    print(f'\nkills survived: {stats["kills"]} SIGKILL ({stats["save_kills"]} inside a checkpoint write, '
          f'{stats["during_setup"]} during setup/resume), '
          f'{stats["terms"]} SIGTERM ({stats["term_exit_ok"]} saved and exited 75); '
          f'{stats["attempts"]} starts, {stats["finished_early"]} finished before their signal')
    print(f'checkpoints found corrupt: {stats["corrupt"]} (of {stats["checked"]} loads after the kills)')
    for problem in stats['problems'][:10]:
        print(f'  {problem}')
    print(f'final weights bit-identical to the uninterrupted run: {"yes" if not diff else "NO"} '
          f'(model, optimizer, scheduler, EMA, RNG, step{"" if not diff else "; differ: " + ", ".join(diff[:8])})')
    print(f'time: {stats["seconds"]}s; runs in {root}' if args.work_dir else f'time: {stats["seconds"]}s')
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(stats, f, indent=1)
    if not args.work_dir:
        shutil.rmtree(root, ignore_errors=True)
    ok = not diff and stats['corrupt'] == 0 and stats['term_exit_ok'] == stats['terms']
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
