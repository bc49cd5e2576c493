"""A catalogue of bad inputs to ``tools.train`` / ``tools.test``: each gets its one-line message and exit code,
and nothing in the work directory changes. docs/troubleshooting.md lists the same cases."""
import hashlib
import os
import pickle
import re
import signal
import subprocess
import sys
import zipfile

import pytest
import torch

from engine.checkpoint import save_checkpoint
from engine.checkpoint_manager import CheckpointManager
from tests.engine_helpers import launch_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = """model: {backbone: cifar_resnet20, num_classes: 4}
data: {dataset: synthetic, input_size: 16, workers: 0, synthetic: {train_size: 16, val_size: 8, num_classes: 4}}
train: {epochs: 1, batch_size: 8, lr: 0.05}
runtime: {device: cpu, tensorboard: false, log_interval: 100}
"""


class Evil:
    """Unpickling this creates the file PWNED (if anything ever executes it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, 'w'))


def make_files(t):
    """Every file the cases refer to, under tmp dir ``t``."""
    (t / 'base.yaml').write_text(BASE)
    (t / 'syntax.yaml').write_text('model: {backbone: [\n')
    (t / 'base_missing.yaml').write_text('_base_: [missing_base.yaml]\n')
    (t / 'section.yaml').write_text(BASE.replace('model:', 'modle:'))
    (t / 'empty_root').mkdir()
    (t / 'afile').write_text('not a directory\n')
    torch.save({'model': {'w': torch.ones(100)}}, t / 'foreign.pth')
    data = (t / 'foreign.pth').read_bytes()
    (t / 'trunc.pth').write_bytes(data[:len(data) // 2])
    (t / 'net-deadbeef.pth').write_bytes(data)
    torch.save({'model': Evil(str(t / 'PWNED'))}, t / 'evil.pth')
    (t / 'plain4.pth').write_bytes(pickle.dumps({'model': Evil(str(t / 'PWNED'))}, protocol=4))
    corrupt = CheckpointManager(t / 'w_corrupt')
    corrupt.save({'model': {'w': torch.ones(2)}}, 'step_2')
    (t / 'w_corrupt' / 'checkpoints' / 'step_0000002.pth').write_bytes(b'PK\x03\x04 cut short')
    CheckpointManager(t / 'w_other').save(
        {'model': {'w': torch.ones(2)}, 'config': {'model': {'backbone': 'resnet18', 'num_classes': 4}},
         'epoch': 1, 'step': 2}, 'epoch_1')
    save_checkpoint({'model': {'w': torch.ones(2)}, 'ema': None}, t / 'no_ema.pth')
    # issue 10.7: a config in Latin-1, work dirs whose entries have the wrong kind, weights-only and newer files
    (t / 'latin1.yaml').write_bytes('# café\n'.encode('latin-1') + BASE.encode())
    for name, entry, kind in (('w_tb', 'tb', 'file'), ('w_metrics', 'metrics.jsonl', 'dir'),
                              ('w_ckpts', 'checkpoints', 'file'), ('w_cfg', 'config.yaml', 'dir'),
                              ('w_log', 'log.txt', 'dir')):
        (t / name).mkdir()
        (t / name / entry).mkdir() if kind == 'dir' else (t / name / entry).write_text('x\n')
    from models import build_model
    torch.save(build_model({'backbone': 'cifar_resnet20', 'num_classes': 4}).state_dict(), t / 'weights_only.pth')
    with zipfile.ZipFile(t / 'foreign.pth') as src, zipfile.ZipFile(t / 'newer.pth', 'w') as dst:
        for n in src.namelist():
            dst.writestr(n, b'99\n' if n.endswith('/version') else src.read(n))  # a future torch's format


W = 'runtime.work_dir={work}'
# (id, tool, argv, exit code, regex the one-line message must match, work dir the run would use)
CASES = [
    ('config-missing', 'train', ['{t}/nope.yaml', W], 2, r'config file .*nope\.yaml not found; check the path', 'work'),
    ('config-yaml-syntax', 'train', ['{t}/syntax.yaml', W], 2, r'line 2: invalid YAML', 'work'),
    ('config-base-missing', 'train', ['{t}/base_missing.yaml', W], 2,
     r'missing_base\.yaml not found \(named in .*base_missing\.yaml\)', 'work'),
    ('config-section-typo', 'train', ['{t}/section.yaml', W], 2, r"unknown key 'modle' \(did you mean 'model'\?\)",
     'work'),
    ('override-key-typo', 'train', ['{t}/base.yaml', 'train.lrr=0.1', W], 2,
     r"unknown key 'train\.lrr' \(did you mean 'train\.lr'\?\)", 'work'),
    ('override-no-equals', 'train', ['{t}/base.yaml', 'train.lr', W], 2,
     r"override 'train\.lr' is not of the form key\.sub=value", 'work'),
    ('override-wrong-type', 'train', ['{t}/base.yaml', 'train.lr=abc', W], 2,
     r"train\.lr must be a number, got 'abc'", 'work'),
    ('override-out-of-range', 'train', ['{t}/base.yaml', 'train.epochs=0', W], 2, r'train\.epochs=0 must be >= 1',
     'work'),
    ('backbone-typo', 'train', ['{t}/base.yaml', 'model.backbone=resnet51', W], 2,
     r"unknown backbone 'resnet51' \(did you mean 'resnet50'\?\)", 'work'),
    ('block-typo', 'train', ['{t}/base.yaml', 'model.plugins=[{{type: cee}}]', W], 2,
     r"unknown block type 'cee' \(did you mean 'ce'\?\)", 'work'),
    ('block-option-typo', 'train', ['{t}/base.yaml', 'model.plugins=[{{type: ce, group_chanels: 16}}]', W], 2,
     r"block 'ce' has no option 'group_chanels' \(did you mean 'group_channels'\?\)", 'work'),
    ('block-impossible-place', 'train', ['{t}/base.yaml', 'model.backbone=mobilenet_v2',
                                         'model.plugins=[{{type: ed}}]', W], 2,
     r"block 'ed' needs a 'parallel' place, which backbone 'mobilenet_v2' does not offer", 'work'),
    ('dataset-typo', 'train', ['{t}/base.yaml', 'data.dataset=imagenet', W], 2,
     r"data\.dataset='imagenet' is not one of .*did you mean", 'work'),
    ('dataset-root-missing', 'train', ['{t}/base.yaml', 'data.dataset=imagenet_folder', 'data.root={t}/nowhere', W],
     2, r'nowhere does not exist or is not a folder', 'work'),
    ('dataset-folder-empty', 'train', ['{t}/base.yaml', 'data.dataset=imagenet_folder', 'data.root={t}/empty_root',
                                       W], 2, r'image folder .*empty_root/train does not exist', 'work'),
    ('dataset-cifar-files-missing', 'train', ['{t}/base.yaml', 'data.dataset=cifar10', 'data.root={t}/empty_root',
                                              'model.num_classes=10', W], 2,
     r'cifar10 files not found: expected .*cifar-10-batches-py', 'work'),
    ('dataset-classes-mismatch', 'train', ['{t}/base.yaml', 'model.num_classes=5', W], 2,
     r'synthetic has 4 classes but num_classes=5', 'work'),
    ('batch-larger-than-dataset', 'train', ['{t}/base.yaml', 'train.batch_size=64', W], 2,
     r'fewer than one batch of 64', 'work'),
    ('batch-not-divisible', 'train', ['{t}/base.yaml', 'train.accum_steps=3', W], 2,
     r'train\.batch_size=8 is not divisible by train\.accum_steps=3', 'work'),
    ('resume-missing', 'train', ['{t}/base.yaml', 'runtime.resume_from={t}/missing.pth', W], 2,
     r'checkpoint .*missing\.pth not found', 'work'),
    ('resume-truncated', 'train', ['{t}/base.yaml', 'runtime.resume_from={t}/trunc.pth', W], 2,
     r'checkpoint .*trunc\.pth is truncated or corrupt \(incomplete zip archive', 'work'),
    ('resume-malicious-pickle', 'train', ['{t}/base.yaml', 'runtime.resume_from={t}/evil.pth', W], 2,
     r'refusing to unpickle code from .*evil\.pth \(it needs io\.open\).*tools\.convert_pickle --trust', 'work'),
    ('resume-plain-pickle', 'train', ['{t}/base.yaml', 'runtime.resume_from={t}/plain4.pth', W], 2,
     r'refusing to unpickle code from .*plain4\.pth: it is a plain Python pickle \(protocol 4\)', 'work'),
    ('autoresume-all-corrupt', 'train', ['{t}/base.yaml', 'runtime.work_dir={t}/w_corrupt'], 2,
     r'none of the 1 checkpoints in .*w_corrupt/checkpoints can be read .*auto_resume=false', 'w_corrupt'),
    ('autoresume-other-model', 'train', ['{t}/base.yaml', 'runtime.work_dir={t}/w_other'], 2,
     r'epoch_001\.pth was trained with a different model \(backbone.*differ\)', 'w_other'),
    ('init-unknown-zoo-name', 'train', ['{t}/base.yaml', 'model.pretrained=resnet50_ce_typo', W], 2,
     r"checkpoint 'resnet50_ce_typo' is not a file, a URL or a model-zoo name", 'work'),
    ('init-url-hash-mismatch', 'train', ['{t}/base.yaml', 'model.pretrained=file://{t}/net-deadbeef.pth', W], 2,
     r'sha256 mismatch for file://.*net-deadbeef\.pth: expected deadbeef.*deleted', 'work'),
    ('work-dir-is-a-file', 'train', ['{t}/base.yaml', 'runtime.work_dir={t}/afile'], 74,
     r'work_dir .*afile is a file, not a directory', 'afile'),
    ('config-not-utf8', 'train', ['{t}/latin1.yaml', W], 2, r'latin1\.yaml: not UTF-8 text .*; save it as UTF-8',
     'work'),
    ('synthetic-size-huge', 'train', ['{t}/base.yaml', 'data.synthetic.train_size=100000000000', W], 2,
     r'data\.synthetic\.train_size=100000000000 must be in \[1, 10,000,000\]', 'work'),
    ('work-dir-tb-is-a-file', 'train', ['{t}/base.yaml', 'runtime.tensorboard=true', 'runtime.work_dir={t}/w_tb'],
     74, r'w_tb/tb is a file where the run writes its tb folder; move it away', 'w_tb'),
    ('work-dir-metrics-is-a-folder', 'train', ['{t}/base.yaml', 'runtime.work_dir={t}/w_metrics'], 74,
     r'w_metrics/metrics\.jsonl is a folder where the run writes its metrics\.jsonl file', 'w_metrics'),
    ('work-dir-checkpoints-is-a-file', 'train', ['{t}/base.yaml', 'runtime.work_dir={t}/w_ckpts'], 74,
     r'w_ckpts/checkpoints is a file where the run writes its checkpoints folder', 'w_ckpts'),
    ('work-dir-config-is-a-folder', 'train', ['{t}/base.yaml', 'runtime.work_dir={t}/w_cfg'], 74,
     r'w_cfg/config\.yaml is a folder where the run writes its config\.yaml file', 'w_cfg'),
    ('work-dir-log-is-a-folder', 'train', ['{t}/base.yaml', 'runtime.work_dir={t}/w_log'], 74,
     r'w_log/log\.txt is a folder where the run writes its log\.txt file', 'w_log'),
    ('resume-weights-only', 'train', ['{t}/base.yaml', 'runtime.resume_from={t}/weights_only.pth', W], 2,
     r'cannot resume from .*weights_only\.pth: it holds weights only .*set model\.pretrained=.*weights_only', 'work'),
    ('resume-newer-torch', 'train', ['{t}/base.yaml', 'runtime.resume_from={t}/newer.pth', W], 2,
     r'newer\.pth was written by a newer PyTorch \(file format version 99; .*\): upgrade torch', 'work'),
    ('test-output-not-writable', 'test', ['{t}/base.yaml', '{t}/weights_only.pth', 'runtime.work_dir={t}/afile'], 2,
     r'could not write .*afile/test_weights_only\.json: .*afile is a file, not a folder; pass --out FILE', 'afile'),
    ('test-checkpoint-missing', 'test', ['{t}/base.yaml', '{t}/missing.pth', W], 2,
     r'checkpoint .*missing\.pth not found', 'work'),
    ('test-no-ema', 'test', ['{t}/base.yaml', '{t}/no_ema.pth', W, '--ema'], 2, r'no_ema\.pth holds no EMA weights',
     'work'),
    ('test-weights-do-not-fit', 'test', ['{t}/base.yaml', '{t}/foreign.pth', W], 2,
     r'do not fit the model: 9\d missing \(conv1\.weight.*1 unexpected \(w\)', 'work'),
    ('test-malicious-pickle', 'test', ['{t}/base.yaml', '{t}/evil.pth', W], 2,
     r'refusing to unpickle code from .*evil\.pth', 'work'),
    ('init-weights-do-not-fit', 'train', ['{t}/base.yaml', 'model.pretrained={t}/foreign.pth', W], 2,
     r'do not fit the model', 'work'),
]


def snapshot(path):
    """Everything under ``path`` (names, sizes, mtimes, contents), or None when it does not exist."""
    if not os.path.exists(path):
        return None
    if os.path.isfile(path):
        return ('file', os.stat(path).st_mtime_ns, hashlib.sha256(open(path, 'rb').read()).hexdigest())
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            st = os.stat(p)
            digest = hashlib.sha256(open(p, 'rb').read()).hexdigest() if os.path.isfile(p) else 'dir'
            out[os.path.relpath(p, path)] = (st.st_size, st.st_mtime_ns, digest)
    return out


@pytest.fixture
def restore_signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.parametrize('case, tool, argv, code, message, work', CASES, ids=[
    c.values[0] if hasattr(c, 'marks') else c[0] for c in CASES])
def test_bad_input(tmp_path, capsys, monkeypatch, restore_signals, case, tool, argv, code, message, work):
    make_files(tmp_path)
    monkeypatch.setenv('BLOCKLAB_CACHE', str(tmp_path / 'cache'))
    monkeypatch.chdir(REPO)
    argv = [a.format(t=tmp_path, work=tmp_path / 'work') for a in argv]
    work_dir = tmp_path / work
    before = snapshot(work_dir)
    if tool == 'train':
        from tools.train import run
    else:
        from tools.test import run
    assert run(argv) == code
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith('error: ')]
    assert len(errors) == 1, err
    assert re.search(message, errors[0]), errors[0]
    assert snapshot(work_dir) == before, 'the work directory changed'
    assert not (tmp_path / 'PWNED').exists()
    cached = tmp_path / 'cache' / 'checkpoints'
    assert not cached.exists() or not os.listdir(cached)  # a refused download leaves nothing behind


def test_command_line_exit_code(tmp_path):
    """The same refusal through ``python -m tools.train`` (exit code and stderr)."""
    make_files(tmp_path)
    p = subprocess.run([sys.executable, '-m', 'tools.train', str(tmp_path / 'base.yaml'),
                        f'runtime.resume_from={tmp_path}/evil.pth', f'runtime.work_dir={tmp_path}/work'],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith('error: refusing to unpickle code from')
    assert 'Traceback' not in p.stderr
    assert not (tmp_path / 'work').exists() and not (tmp_path / 'PWNED').exists()


def test_late_refusals_through_train_sh_with_two_processes_and_workers(tmp_path):
    """Issue 10.7/10.8 on the path users run: ./train.sh, 2 processes, data workers; nothing is written."""
    from PIL import Image
    root = tmp_path / 'images'
    lines = []
    for i in range(12):
        (root / 'train' / f'c{i % 2}').mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (20, 20), (i * 20, 0, 0)).save(root / 'train' / f'c{i % 2}' / f'{i}.png')
        lines.append(f'c{i % 2}/{i}.png {i % 2}')
    (root / 'train.txt').write_text('\n'.join(lines) + '\n')
    (root / 'train' / 'c1' / '9.png').unlink()
    (tmp_path / 'w_metrics').mkdir()
    (tmp_path / 'w_metrics' / 'metrics.jsonl').mkdir()
    env = launch_env()  # a user's shell, the scripts run by this test's Python (not a .venv the clone may lack)
    common = [os.path.join(REPO, 'train.sh'), str(tmp_path / 'base.yaml'), '2', 'data.workers=2']
    (tmp_path / 'base.yaml').write_text(BASE)
    cases = [([f'data.dataset=imagenet_list', f'data.root={root}', 'data.val_dir=train', 'data.val_list=train.txt',
               'model.num_classes=2', 'data.input_size=16', f'runtime.work_dir={tmp_path}/w_list'], 2,
              r'1 of 12 listed images are missing, the first .*c1/9\.png \(line 10 of .*train\.txt\)', 'w_list'),
             ([f'runtime.work_dir={tmp_path}/w_metrics'], 74,
              r'w_metrics/metrics\.jsonl is a folder where the run writes its metrics\.jsonl file', 'w_metrics')]
    for extra, code, message, work in cases:
        before = snapshot(tmp_path / work)
        r = subprocess.run(common + extra, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == code, r.stdout + r.stderr
        assert re.search(message, r.stderr), r.stderr
        assert snapshot(tmp_path / work) == before, 'the work directory changed'
