"""engine/hub.py and the model zoo: resolving paths, names and URLs; hashes; export round trip."""
import hashlib
import os

import pytest
import torch
import yaml

from engine import hub
from engine import zoo_table
from engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from engine.hub import HubError, resolve_checkpoint
from tools import zoo_table as zoo_table_tool


def _weights(tmp_path, name='net', value=1.0):
    """A small state dict saved under ``<name>-<sha256[:8]>.pth``; returns (path, full sha256)."""
    tmp = tmp_path / 'src.pth'
    torch.save({'w': torch.full((16,), value)}, tmp)
    sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
    path = tmp_path / f'{name}-{sha[:8]}.pth'
    tmp.rename(path)
    return path, sha


def _no_tmp(directory):
    return not any(n.endswith('.tmp') for n in os.listdir(directory)) if os.path.isdir(directory) else True


def test_existing_path_is_returned_as_is(tmp_path):
    path, _ = _weights(tmp_path)
    assert resolve_checkpoint(str(path)) == str(path)
    with pytest.raises(HubError, match='is a directory'):
        resolve_checkpoint(str(tmp_path))
    with pytest.raises(HubError, match=r'checkpoint .*nope\.pth not found'):
        resolve_checkpoint(str(tmp_path / 'nope.pth'))


def test_file_url_is_downloaded_verified_and_cached(tmp_path):
    path, _ = _weights(tmp_path)
    cache = tmp_path / 'cache'
    local = resolve_checkpoint(path.as_uri(), cache_dir=str(cache))
    assert local == hub.cache_path(path.as_uri(), str(cache))
    assert os.path.dirname(os.path.dirname(local)) == str(cache / 'checkpoints') and local.endswith(path.name)
    assert torch.equal(load_checkpoint(local)['w'], torch.ones(16))
    path.unlink()  # the second call is served from the cache
    assert resolve_checkpoint(path.as_uri(), cache_dir=str(cache)) == local


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    path, _ = _weights(tmp_path)
    monkeypatch.setenv('BLOCKLAB_CACHE', str(tmp_path / 'envcache'))
    assert resolve_checkpoint(path.as_uri()).startswith(str(tmp_path / 'envcache'))


def test_hash_mismatch_deletes_and_refuses(tmp_path):
    path, sha = _weights(tmp_path)
    bad = tmp_path / 'net-deadbeef.pth'
    path.rename(bad)
    cache = tmp_path / 'cache'
    with pytest.raises(HubError, match=r'sha256 mismatch for .*net-deadbeef\.pth: expected deadbeef.*deleted'):
        resolve_checkpoint(bad.as_uri(), cache_dir=str(cache))
    assert not os.path.exists(hub.cache_path(bad.as_uri(), str(cache))) and not os.listdir(cache / 'checkpoints')
    with pytest.raises(HubError, match='sha256 mismatch'):  # a #sha256= fragment is checked as well
        resolve_checkpoint(bad.as_uri() + '#sha256=' + 'ab' * 32, cache_dir=str(cache))
    local = resolve_checkpoint(bad.as_uri() + '#sha256=' + sha, cache_dir=str(cache))
    assert os.path.isfile(local)


def test_same_file_name_at_two_urls_is_cached_twice(tmp_path):
    """Issue 10.4: .../A/best.pth and .../B/best.pth are different files, whatever their names."""
    cache = str(tmp_path / 'cache')
    for run, value in (('A', 1.0), ('B', 2.0)):
        (tmp_path / run).mkdir()
        torch.save({'w': torch.full((16,), value)}, tmp_path / run / 'best.pth')
    a = resolve_checkpoint((tmp_path / 'A' / 'best.pth').as_uri(), cache_dir=cache)
    b = resolve_checkpoint((tmp_path / 'B' / 'best.pth').as_uri(), cache_dir=cache)
    assert a != b
    assert torch.equal(load_checkpoint(a)['w'], torch.full((16,), 1.0))
    assert torch.equal(load_checkpoint(b)['w'], torch.full((16,), 2.0))


def test_tampered_cache_is_downloaded_again(tmp_path):
    path, _ = _weights(tmp_path)
    cache = tmp_path / 'cache'
    local = resolve_checkpoint(path.as_uri(), cache_dir=str(cache))
    with open(local, 'r+b') as f:
        f.seek(100)
        f.write(b'XX')
    assert resolve_checkpoint(path.as_uri(), cache_dir=str(cache)) == local
    assert hashlib.sha256(open(local, 'rb').read()).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()


def test_url_without_hash_warns(tmp_path, caplog):
    plain = tmp_path / 'plain.pth'
    torch.save({'w': torch.ones(1)}, plain)
    assert os.path.isfile(resolve_checkpoint(plain.as_uri(), cache_dir=str(tmp_path / 'c')))
    assert 'not verified' in caplog.text


def test_unreachable_url(tmp_path):
    with pytest.raises(HubError, match=r'could not download file://.*missing-12345678\.pth'):
        resolve_checkpoint((tmp_path / 'missing-12345678.pth').as_uri(), cache_dir=str(tmp_path / 'c'))
    assert _no_tmp(tmp_path / 'c' / 'checkpoints')


def _index(tmp_path, entries):
    index = tmp_path / 'zoo' / 'index.yaml'
    index.parent.mkdir(exist_ok=True)
    hub.save_index(entries, str(index))
    return str(index)


def test_zoo_name_file_and_url_entries(tmp_path):
    (tmp_path / 'zoo').mkdir()
    path, sha = _weights(tmp_path / 'zoo', 'tiny')
    index = _index(tmp_path, {'tiny': {'file': path.name, 'sha256': sha},
                              'remote': {'url': path.as_uri(), 'sha256': sha},
                              'broken': {'file': 'gone.pth'}})
    assert resolve_checkpoint('tiny', index=index) == str(path)
    cache = str(tmp_path / 'cache')
    assert resolve_checkpoint('remote', cache_dir=cache, index=index).startswith(cache)
    with pytest.raises(HubError, match="did you mean 'tiny'"):
        resolve_checkpoint('tiyn', index=index)
    with pytest.raises(HubError, match="entry 'broken' has no url and its file 'gone.pth' is missing"):
        resolve_checkpoint('broken', index=index)


def test_zoo_file_with_wrong_hash_is_deleted(tmp_path):
    (tmp_path / 'zoo').mkdir()
    path, sha = _weights(tmp_path / 'zoo', 'tiny')
    index = _index(tmp_path, {'tiny': {'file': path.name, 'sha256': '0' * 64}})
    with pytest.raises(HubError, match="sha256 mismatch for model zoo entry 'tiny'"):
        resolve_checkpoint('tiny', index=index)
    assert not path.exists()


def test_bad_index(tmp_path):
    index = tmp_path / 'index.yaml'
    index.write_text('models: [a, b]\n')
    with pytest.raises(HubError, match='`models` must be a mapping'):
        resolve_checkpoint('a', index=str(index))
    index.write_text('models: {a: 1\n')
    with pytest.raises(HubError, match='is not valid YAML'):
        resolve_checkpoint('a', index=str(index))


def test_repository_zoo_table_is_in_sync():
    """model_zoo/MODEL_ZOO.md must be what tools.zoo_table generates from model_zoo/index.yaml."""
    assert zoo_table.in_sync(hub.DEFAULT_INDEX), 'run python -m tools.zoo_table'
    for name, entry in hub.load_index(hub.DEFAULT_INDEX).items():
        assert {'config', 'sha256', 'metrics', 'params', 'gflops'} <= set(entry), name
        assert entry.get('file') or entry.get('url'), name
        assert os.path.isfile(os.path.join(hub.REPO_ROOT, entry['config'])), name


def test_zoo_table_render(tmp_path):
    index = _index(tmp_path, {'m': {'config': 'configs/x.yaml', 'file': 'weights/m-12345678.pth',
                                    'sha256': '12345678' + '0' * 56, 'metrics': {'top1': 76.13},
                                    'params': 25557032, 'gflops': 4.09, 'published': {'top1': 76.1}}})
    zoo_table.write(index)
    text = (tmp_path / 'zoo' / 'MODEL_ZOO.md').read_text()
    assert '| m | [configs/x.yaml](../configs/x.yaml) | 76.13 | - | 76.10 | 25.56 | 4.09 |' in text
    assert zoo_table.in_sync(index)
    hub.save_index({}, index)
    assert not zoo_table.in_sync(index)
    assert zoo_table_tool.main(['--index', index, '--check']) == 1


# ----------------------------------------------------------------------------- export round trip

TINY_CONFIG = """
model: {backbone: cifar_resnet20, num_classes: 10}
data: {dataset: synthetic, input_size: 32}
"""


def test_export_roundtrip(tmp_path, capsys):
    from engine.config import load_config
    from models import build_model
    from tools import export
    config = tmp_path / 'tiny.yaml'
    config.write_text(TINY_CONFIG)
    model = build_model(load_config(str(config)).model)
    ema = build_model(load_config(str(config)).model)
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    ckpt = tmp_path / 'work' / 'checkpoints' / 'best.pth'
    save_checkpoint({'model': {'module.' + k: v for k, v in model.state_dict().items()},
                     'ema': {'module': ema.state_dict(), 'updates': 3}, 'epoch': 7, 'step': 70}, ckpt)
    (tmp_path / 'zoo').mkdir()
    index = str(tmp_path / 'zoo' / 'index.yaml')
    assert export.main([str(ckpt), '--name', 'tiny_r20', '--config', str(config), '--index', index,
                        '--metrics', 'top1=12.5', '--published', 'top1=91.3', '--ema',
                        '--url-prefix', (tmp_path / 'server').as_uri()]) == 0
    entry = yaml.safe_load(open(index))['models']['tiny_r20']
    assert entry['metrics'] == {'top1': 12.5} and entry['published'] == {'top1': 91.3} and entry['ema'] is True
    assert entry['params'] == sum(p.numel() for p in model.parameters()) and entry['gflops'] > 0
    file = tmp_path / 'zoo' / entry['file']
    assert file.name == f"tiny_r20-{entry['sha256'][:8]}.pth"
    assert hashlib.sha256(file.read_bytes()).hexdigest() == entry['sha256']
    assert zoo_table.in_sync(index)
    # by name: the local file (hash checked), then, once it is gone, the url (downloaded, hash checked)
    server = tmp_path / 'server'
    local = resolve_checkpoint('tiny_r20', index=index)
    assert local == str(file)
    server.mkdir()
    file.rename(server / file.name)
    downloaded = resolve_checkpoint('tiny_r20', index=index, cache_dir=str(tmp_path / 'c'))
    assert downloaded.startswith(str(tmp_path / 'c'))
    for path in (server / file.name, downloaded):
        state = load_checkpoint(path)
        assert set(state) == set(ema.state_dict())
        assert all(torch.equal(state[k], v) for k, v in ema.state_dict().items())
    # same name again needs --force; a checkpoint that does not fit the config is refused
    assert export.main([str(ckpt), '--name', 'tiny_r20', '--config', str(config), '--index', index]) == 2
    other = tmp_path / 'other.yaml'
    other.write_text(TINY_CONFIG.replace('num_classes: 10', 'num_classes: 7'))
    assert export.main([str(ckpt), '--name', 'x', '--config', str(other), '--index', index]) == 2
    capsys.readouterr()
    # a features-only model is not a zoo entry (it was exported, sized without its head, before)
    assert export.main([str(ckpt), '--name', 'x', '--config', str(config), '--index', index,
                        'model.features_only=true']) == 2
    assert 'needs a classifier: set model.features_only=false' in capsys.readouterr().err
    assert list(yaml.safe_load(open(index))['models']) == ['tiny_r20']
    assert not [p for p in (tmp_path / 'zoo').rglob('x-*')]


def test_unwritable_cache_names_blocklab_cache(tmp_path, monkeypatch):
    """Issue 10.7: a read-only cache named runtime.work_dir as the setting to change."""
    import errno
    import tempfile
    path, _ = _weights(tmp_path)
    cache = tmp_path / 'ro_cache'

    def read_only(*args, dir=None, **kwargs):  # root can write anywhere: refuse like a read-only mount would
        raise PermissionError(errno.EACCES, 'Permission denied', dir)
    monkeypatch.setattr(tempfile, 'mkstemp', read_only)
    with pytest.raises(CheckpointError, match=r'could not write .*ro_cache.*: permission denied; set BLOCKLAB_CACHE to a '
                                       r'writable folder') as info:
        resolve_checkpoint(path.as_uri(), cache_dir=str(cache))
    assert 'work_dir' not in str(info.value)


def test_a_bad_cached_download_is_moved_aside_and_fetched_again(tmp_path):
    """An HTML error page or a cut-off file at a URL without a known hash does not stay in the cache."""
    import functools
    import http.server
    import threading
    served = tmp_path / 'www'
    served.mkdir()
    (served / 'net.pth').write_text('<html><body>503 Service Unavailable</body></html>')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url, cache = f'http://127.0.0.1:{server.server_port}/net.pth', str(tmp_path / 'cache')
    try:
        with pytest.raises(HubError, match=r'sent an unusable file \(checkpoint .*net\.pth is an HTML/XML page, not a '
                                           r'PyTorch checkpoint; moved to .*net\.pth\.bad\)'):
            resolve_checkpoint(url, cache_dir=cache)
        local = hub.cache_path(url, cache)
        assert not os.path.exists(local) and os.path.exists(local + '.bad')
        good = tmp_path / 'good.pth'
        torch.save({'w': torch.ones(4)}, good)
        (served / 'net.pth').write_bytes(good.read_bytes()[:300])  # cut off: cached by an older version, say
        os.replace(served / 'net.pth', local)
        (served / 'net.pth').write_bytes(good.read_bytes())  # the server is fixed
        assert resolve_checkpoint(url, cache_dir=cache) == local
        assert torch.equal(load_checkpoint(local)['w'], torch.ones(4))
    finally:
        server.shutdown()
        server.server_close()
