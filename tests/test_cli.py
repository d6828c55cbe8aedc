"End-to-end tests of the `fastreid-rollback` command line: demo, train (and resume), eval, and its errors."
import json, os, subprocess, sys
from pathlib import Path
import pandas as pd, pytest, torch
from fastreid_rollback.model import ReIDModel, save_backbone
from fastreid_rollback.experiment import read_checkpoint

def cli(*args, cwd=None):
    "Run `python -m fastreid_rollback.cli *args`; return the completed process"
    return subprocess.run([sys.executable, '-W', 'ignore', '-m', 'fastreid_rollback.cli', *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=900)

@pytest.fixture(scope='module')
def backbone_file(tmp_path_factory):
    "A local resnet18 backbone file standing in for pre-trained weights (nothing may be downloaded)"
    torch.manual_seed(0)
    return save_backbone(ReIDModel('resnet18', n_ids=2), tmp_path_factory.mktemp('weights')/'resnet18.pth')

plots = ['loss.png', 'cmc.png', 'block_grads.png', 'ranked.png']

def check_report(out, runs):
    "results.json, results.csv and the plots exist and hold metrics in [0, 1] for `runs`"
    for f in ['results.json', 'results.csv', *plots]: assert (out/f).stat().st_size > 0, f
    doc = json.loads((out/'results.json').read_text())
    assert sorted(doc['runs']) == sorted(runs)
    for r in doc['runs'].values():
        for k in ['rank1', 'rank5', 'rank10', 'mAP', 'mINP']: assert 0 <= r[k] <= 1, (k, r)
        assert r['train_time_s'] > 0
    table = pd.read_csv(out/'results.csv', index_col='run')
    assert sorted(table.index) == sorted(runs)
    return doc

def test_demo_quick(tmp_path):
    "The quick demo: four rows (period1 read from the rolling-back run), the source backbone built into the cache given by the environment"
    env = {**os.environ, 'FASTREID_ROLLBACK_CACHE': str(tmp_path/'cache')}
    p = subprocess.run([sys.executable, '-W', 'ignore', '-m', 'fastreid_rollback.cli', 'demo', '--out', str(tmp_path/'demo'), '--quick'],
                       capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    out = tmp_path/'demo'
    for f in ['results.json', 'results.csv', *plots]: assert (out/f).stat().st_size > 0, f
    doc = json.loads((out/'results.json').read_text())
    assert list(doc['runs']) == ['baseline', 'control', 'rollback', 'period1']
    for r in doc['runs'].values():
        for k in ['rank1', 'rank5', 'rank10', 'mAP', 'mINP']: assert 0 <= r[k] <= 1, (k, r)
    runs = doc['runs']
    assert runs['baseline']['rollback_epochs'] == [] and runs['rollback']['rollback_epochs'] == runs['control']['rollback_epochs'] == [1]
    assert all(runs[a]['train_time_s'] > 0 for a in ('baseline', 'control', 'rollback'))
    table = pd.read_csv(out/'results.csv', index_col='run')
    assert list(table.index) == ['baseline', 'control', 'rollback', 'period1']
    assert [f.suffix for f in (tmp_path/'cache').iterdir()] and sorted(f.suffix for f in (tmp_path/'cache').iterdir()) == ['.json', '.pth']
    assert 'pre-training the backbone' in p.stdout and 'Zero-shot mAP' in p.stdout and 'period1' in p.stdout

def train_args(data, out, backbone, *extra):
    return ['train', '--data', data, '--dataset', 'synthetic', '--arch', 'resnet18', '--periods', 2, '--epochs-per-period', 2,
            '--bs', 16, '--size', 64, 32, '--pretrained', backbone, '--out', out, '--checkpoint-every', 1, *extra]

def test_train_resume_eval(tmp_path, backbone_file):
    from fastreid_rollback.synthetic import synthetic_reid
    data = synthetic_reid(tmp_path/'syn', n_ids=16, n_cams=3, imgs_per_id_cam=2, n_distractors=2, n_junk=2)
    p = cli(*train_args(data, tmp_path/'full', backbone_file))
    assert p.returncode == 0, p.stderr[-3000:]
    doc = check_report(tmp_path/'full', ['rollback'])
    assert doc['runs']['rollback']['rollback_epochs'] == [2]
    ckpts = tmp_path/'full'/'checkpoints'
    assert {'last.pth', 'period1.pth', 'period2.pth'} <= {f.name for f in ckpts.iterdir()}
    assert not list(ckpts.glob('*.tmp'))
    assert read_checkpoint(ckpts/'period1.pth')['meta']['epoch'] == 1
    # Resume from the end of period 1 in a fresh folder: same final weights as the uninterrupted run
    (tmp_path/'resumed'/'checkpoints').mkdir(parents=True)
    (tmp_path/'resumed'/'checkpoints'/'last.pth').write_bytes((ckpts/'period1.pth').read_bytes())
    p = cli(*train_args(data, tmp_path/'resumed', backbone_file, '--resume'))
    assert p.returncode == 0, p.stderr[-3000:]
    full, resumed = read_checkpoint(tmp_path/'full'/'model.pth')['model'], read_checkpoint(tmp_path/'resumed'/'model.pth')['model']
    assert full.keys() == resumed.keys()
    for k in full: assert torch.equal(full[k], resumed[k]), k
    # eval of the saved model gives the metrics train reported
    p = cli('eval', '--model', tmp_path/'full'/'model.pth', '--data', data, '--dataset', 'synthetic', '--out', tmp_path/'ev')
    assert p.returncode == 0, p.stderr[-3000:]
    ev = json.loads((tmp_path/'ev'/'eval.json').read_text())
    for k in ['rank1', 'mAP', 'mINP']: assert ev[k] == pytest.approx(doc['runs']['rollback'][k], abs=1e-4)

@pytest.mark.parametrize('args,expected', [
    (['train', '--data', '/nonexistent/market', '--dataset', 'market1501'], '/nonexistent/market'),
    (['train', '--data', '.', '--dataset', 'imagenet'], 'imagenet'),
    (['train', '--data', '{syn}', '--dataset', 'synthetic', '--arch', 'vgg16', '--pretrained', 'none'], 'vgg16'),
    (['train', '--data', '{syn}', '--dataset', 'synthetic', '--arch', 'resnet18', '--pretrained', 'imagenet'], 'torch hub cache'),
    (['train', '--data', '{syn}', '--dataset', 'market1501', '--pretrained', '/nonexistent/w.pth'], '/nonexistent/w.pth'),
    (['eval', '--model', '/nonexistent/model.pth', '--data', '.'], '/nonexistent/model.pth'),
])
def test_errors(tmp_path, args, expected):
    "User errors end with one clear line on stderr and exit status 2, not a traceback"
    from fastreid_rollback.synthetic import synthetic_reid
    syn = synthetic_reid(tmp_path, n_ids=8, n_cams=2, imgs_per_id_cam=1, n_distractors=1, n_junk=1)
    p = cli(*[a.format(syn=syn) for a in args])
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in p.stderr, p.stderr
    assert lines[0].startswith('fastreid-rollback ') and expected in lines[0], lines[0]

def test_unknown_command():
    p = cli('fly')
    assert p.returncode == 2 and 'usage: fastreid-rollback' in p.stderr
