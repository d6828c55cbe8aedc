"End-to-end tests of the `fastreid-rollback` command line: demo, train (and resume), eval, and its errors."
import json, os, signal, subprocess, sys, time
from pathlib import Path
import pandas as pd, pytest, torch
from fastreid_rollback.test_utils import make_pretrained
from fastreid_rollback.experiment import read_checkpoint, train_reid
from fastreid_rollback.synthetic import synthetic_reid
from fastreid_rollback.data import market1501, reid_dls
from fastai.callback.core import Callback

def cli(*args, cwd=None):
    "Run `python -m fastreid_rollback.cli *args`; return the completed process"
    return subprocess.run([sys.executable, '-W', 'ignore', '-m', 'fastreid_rollback.cli', *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=900)

@pytest.fixture(scope='module')
def backbone_file(tmp_path_factory):
    "A local resnet18 backbone file standing in for pre-trained weights (nothing may be downloaded)"
    return make_pretrained(tmp_path_factory.mktemp('weights')/'resnet18.pth', bn_stats=False)

plots = ['loss.png', 'cmc.png', 'block_grads.png', 'ranked.png']

def check_modes(*files):
    "Each file has the mode the umask gives a new file (0666 less the umask)"
    umask = os.umask(0); os.umask(umask)
    assert {str(f): oct(Path(f).stat().st_mode & 0o777) for f in files} == {str(f): oct(0o666 & ~umask) for f in files}

def check_report(out, runs):
    "results.json, results.csv and the plots exist and hold metrics in [0, 1] for `runs`"
    for f in ['results.json', 'results.csv', *plots]: assert (out/f).stat().st_size > 0, f
    check_modes(*[out/f for f in ['results.json', 'results.csv', *plots]])
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
    check_modes(*(tmp_path/'cache').iterdir(), *[out/f for f in ['results.json', 'results.csv', *plots]])
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
    check_modes(*ckpts.iterdir(), tmp_path/'full'/'model.pth')
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
    check_modes(tmp_path/'ev'/'eval.json')
    for k in ['rank1', 'mAP', 'mINP']: assert ev[k] == pytest.approx(doc['runs']['rollback'][k], abs=1e-4)
    # a checkpoint evaluates too (the help says so): the last one holds the final weights
    p = cli('eval', '--model', ckpts/'last.pth', '--data', data, '--dataset', 'synthetic', '--out', tmp_path/'ev2')
    assert p.returncode == 0, p.stderr[-3000:]
    ev2 = json.loads((tmp_path/'ev2'/'eval.json').read_text())
    for k in ['rank1', 'mAP', 'mINP']: assert ev2[k] == pytest.approx(ev[k], abs=1e-6)
    # with AQE and re-ranking: the same plain metrics, and those after each post-processing
    p = cli('eval', '--model', tmp_path/'full'/'model.pth', '--data', data, '--dataset', 'synthetic', '--out', tmp_path/'ev3', '--rerank', '--aqe')
    assert p.returncode == 0, p.stderr[-3000:]
    ev3 = json.loads((tmp_path/'ev3'/'eval.json').read_text())
    for k in ['rank1', 'mAP', 'mINP']: assert ev3[k] == ev[k]
    assert list(ev3['postprocessed']) == ['AQE', 'AQE + re-ranked'] and 'postprocessed' not in ev
    assert all(0 <= r['mAP'] <= 1 for r in ev3['postprocessed'].values()) and 'AQE + re-ranked: ReIDResult(mAP=' in p.stdout
    # resuming the finished run reports the run, not the instant it took to notice it was finished
    before = read_checkpoint(ckpts/'last.pth')['meta']
    p = cli(*train_args(data, tmp_path/'full', backbone_file, '--resume'))
    assert p.returncode == 0, p.stderr[-3000:]
    again = json.loads((tmp_path/'full'/'results.json').read_text())['runs']['rollback']
    assert again['train_time_s'] >= round(before['train_time_s'], 2) > 0 and again['rollback_epochs'] == [2]
    # resuming with another architecture: one line naming both
    p = cli(*train_args(data, tmp_path/'full', backbone_file, '--resume', '--arch', 'resnet34', '--pretrained', 'none'))
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr[-3000:]
    assert "arch='resnet18'" in p.stderr and "arch='resnet34'" in p.stderr

class CtrlC(Callback):
    "Ctrl-C once epoch `epoch` is over (and checkpointed)"
    order = 100
    def __init__(self, epoch): self.stop = epoch
    def after_epoch(self):
        if self.epoch == self.stop: raise KeyboardInterrupt()

def test_resumed_run_reports_the_whole_run(tmp_path, backbone_file):
    "Interrupted after the roll-back then resumed: the roll-backs, gradient records and training time of the whole run"
    root = synthetic_reid(tmp_path/'syn', n_ids=12, n_cams=2, imgs_per_id_cam=2, size=(32, 16), n_distractors=2, n_junk=1)
    dls = reid_dls(market1501(root), size=(32, 16), bs=8, seed=0)
    kw = dict(arch='resnet18', pretrained=backbone_file, n_periods=2, epochs_per_period=2, checkpoint_every=1)
    full = train_reid(dls, out=tmp_path/'full', **kw)
    with pytest.raises(KeyboardInterrupt): train_reid(dls, out=tmp_path/'cut', cbs=[CtrlC(2)], **kw)
    cut = read_checkpoint(tmp_path/'cut'/'checkpoints'/'last.pth')['meta']
    assert cut['epoch'] == 2 and [e['epoch'] for e in cut['rollback_events']] == [2] and cut['train_time_s'] > 0
    resumed = train_reid(dls, out=tmp_path/'cut', resume=True, **kw)
    assert resumed.rollback_epochs == full.rollback_epochs == [2]
    assert resumed.train_time > cut['train_time_s']
    assert list(resumed.grads.df.index) == list(full.grads.df.index) == [0, 1, 2, 3] and resumed.grads.rollback_epochs == [2]
    for k in full.learn.model.state_dict():
        assert torch.equal(full.learn.model.state_dict()[k], resumed.learn.model.state_dict()[k]), k
    with pytest.raises(FileNotFoundError, match='nothing to resume'): train_reid(dls, out=tmp_path/'none', resume=True, **kw)
    with pytest.raises(ValueError, match=r"n_periods=2.*n_periods=1"): train_reid(dls, out=tmp_path/'full', resume=True, **{**kw, 'n_periods': 1, 'epochs_per_period': 4})

def test_ctrl_c_exits_130_then_resumes(tmp_path, backbone_file):
    "A real Ctrl-C (SIGINT) after the roll-back: one line, exit status 130; --resume then reports the whole run"
    data = synthetic_reid(tmp_path/'syn', n_ids=12, n_cams=2, imgs_per_id_cam=2, n_distractors=2, n_junk=1)
    args = train_args(data, tmp_path/'run', backbone_file)
    args[args.index('--epochs-per-period')+1] = 6                  # 2 periods of 6 epochs: the signal comes with 5 epochs to go, time to land under load
    # a shell without job control starts background commands with SIGINT ignored, and children inherit that:
    # give the run the default disposition, as a terminal's Ctrl-C finds it
    p = subprocess.Popen([sys.executable, '-W', 'ignore', '-m', 'fastreid_rollback.cli', *map(str, args)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpts, t0 = tmp_path/'run'/'checkpoints', time.time()
    while not ((ckpts/'period1.pth').exists() and (ckpts/'last.pth').stat().st_mtime > (ckpts/'period1.pth').stat().st_mtime):
        assert p.poll() is None and time.time() - t0 < 600, 'the run ended before it could be interrupted'
        time.sleep(0.1)
    p.send_signal(signal.SIGINT)                                   # during epoch 8 of 12: after the roll-back at epoch 6
    err = p.communicate(timeout=300)[1]
    assert p.returncode == 130 and err.strip().splitlines() == ['fastreid-rollback train: interrupted (train --resume continues from the last checkpoint)'], err[-3000:]
    cut = read_checkpoint(ckpts/'last.pth')['meta']
    assert cut['epoch'] >= 6 and [e['epoch'] for e in cut['rollback_events']] == [6]
    q = cli(*args, '--resume')
    assert q.returncode == 0, q.stderr[-3000:]
    run = json.loads((tmp_path/'run'/'results.json').read_text())['runs']['rollback']
    assert run['rollback_epochs'] == [6] and run['train_time_s'] >= round(cut['train_time_s'], 2)

@pytest.mark.parametrize('args,expected', [
    (['train', '--data', '/nonexistent/market', '--dataset', 'market1501'], '/nonexistent/market'),
    (['train', '--data', '.', '--dataset', 'imagenet'], 'imagenet'),
    (['train', '--data', '{syn}', '--dataset', 'synthetic', '--arch', 'vgg16', '--pretrained', 'none'], 'vgg16'),
    (['train', '--data', '{empty}/new', '--dataset', 'synthetic', '--arch', 'no_such_net'], "arch='no_such_net' is not an architecture"),
    (['train', '--data', '{empty}/new', '--dataset', 'synthetic', '--pool', 'mean'], "--pool 'mean'"),
    (['train', '--data', '{empty}/new', '--dataset', 'synthetic', '--last-stride', '3'], '--last-stride 3'),
    (['train', '--data', '{syn}', '--dataset', 'synthetic', '--arch', 'resnet18', '--pretrained', 'imagenet'], 'torch hub cache'),
    (['train', '--data', '{syn}', '--dataset', 'market1501', '--pretrained', '/nonexistent/w.pth'], '/nonexistent/w.pth'),
    (['train', '--data', '{syn}', '--dataset', 'synthetic', '--arch', 'resnet18', '--pretrained', '{bb}', '--periods', '6', '--epochs-per-period', '1'], 'n_periods=6'),
    (['train', '--data', '{syn}', '--dataset', 'synthetic', '--arch', 'resnet18', '--pretrained', 'none', '--out', '{empty}', '--resume'], 'nothing to resume'),
    (['train', '--data', '{syn}', '--dataset', 'synthetic', '--out', '{file}'], 'is a file'),
    (['train', '--data', '{syn}', '--dataset', 'synthetic', '--out', '/sys/fastreid_rollback_test'], 'cannot write there'),
    (['train', '--bs', 'x'], 'argument --bs'),
    (['train', '--size', '64'], 'argument --size'),
    (['train', '--periods', '0'], '--periods must be >= 1, got 0'),
    (['train', '--data', '{syn}', '--dataset', 'synthetic', '--bs', '1', '--arch', 'resnet18', '--pretrained', '{bb}'], 'bs=1'),
    (['eval', '--model', '/nonexistent/model.pth', '--data', '.'], '/nonexistent/model.pth'),
    (['eval', '--data', '.'], '--model is required'),
    (['eval', '--model', '{garbage}', '--data', '{syn}', '--dataset', 'synthetic'], '{garbage}'),
    (['eval', '--model', '{file}', '--data', '{syn}', '--dataset', 'synthetic'], '{file}'),
    (['eval', '--model', '{bb}', '--data', '{syn}', '--dataset', 'synthetic'], 'not a checkpoint'),
    (['demo', '--out', '{userdir}'], 'holds files no demo wrote'),
    (['demo', '--out', '{file}'], 'is a file'),
    (['demo', '--out', '{file}/sub'], 'is a file'),
    (['train', '--data', '{broken}', '--dataset', 'market1501', '--arch', 'resnet18', '--pretrained', 'none', '--periods', '1',
      '--epochs-per-period', '1', '--size', '32', '16', '--out', '{empty}'], '{bad}'),
    (['fly'], "unknown command 'fly'"),
    ([], 'no command'),
])
def test_errors(tmp_path, backbone_file, args, expected, monkeypatch, capsys):
    "User errors end with one clear line on stderr and exit status 2, not a traceback (`main` in this process: quicker)"
    syn = synthetic_reid(tmp_path, n_ids=8, n_cams=2, imgs_per_id_cam=1, n_distractors=1, n_junk=1)
    (tmp_path/'notes.txt').write_text('a text file\n')
    (tmp_path/'garbage.pth').write_bytes(bytes(range(256))*8)
    (tmp_path/'empty').mkdir(); (tmp_path/'mine').mkdir(); (tmp_path/'mine'/'results.csv').write_text('my results\n')
    broken = synthetic_reid(tmp_path/'broken', n_ids=8, n_cams=2, imgs_per_id_cam=1, n_distractors=1, n_junk=1)
    bad = sorted((broken/'bounding_box_train').glob('*.jpg'))[0]; bad.write_bytes(b'not a jpeg')   # an unreadable image
    names = dict(syn=syn, broken=broken, bad=bad, bb=backbone_file, file=tmp_path/'notes.txt', garbage=tmp_path/'garbage.pth', empty=tmp_path/'empty', userdir=tmp_path/'mine')
    monkeypatch.chdir(tmp_path)
    from fastreid_rollback.cli import main
    code, err = main([a.format(**names) for a in args]), capsys.readouterr().err
    assert code == 2, (code, err[-2000:])
    lines = err.strip().splitlines()
    assert len(lines) == 1 and 'weights_only' not in err, err
    assert lines[0].startswith('fastreid-rollback') and expected.format(**names) in lines[0], lines[0]
    assert (tmp_path/'mine'/'results.csv').read_text() == 'my results\n' and (tmp_path/'notes.txt').read_text() == 'a text file\n'
    assert not (tmp_path/'runs').exists()                         # a refused command leaves no output folder behind
    assert not (tmp_path/'empty'/'new').exists()                  # nor a generated dataset

def test_errors_exit_status(tmp_path):
    "The console process itself: one line, status 2, no traceback"
    for args in (['fly'], ['train', '--data', tmp_path/'nowhere', '--dataset', 'market1501', '--out', tmp_path/'o'], ['eval', '--bs', 'x']):
        p = cli(*args)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and 'Traceback' not in p.stderr, p.stderr

def test_help_lists_commands():
    p = cli('--help')
    assert p.returncode == 0
    from fastreid_rollback.cli import commands
    for name,f in commands.items(): assert f"  {name}" in p.stdout and f.__doc__.splitlines()[0] in p.stdout, p.stdout

def test_demo_refuses_other_settings(tmp_path):
    "The folder of a demo made with other settings is not replaced without --overwrite (which the message names)"
    from fastreid_rollback.cli import _is_demo_output
    synthetic_reid(tmp_path/'old'/'data', n_ids=4, imgs_per_id_cam=1, seed=5)   # what an earlier demo leaves first
    assert _is_demo_output(tmp_path/'old')
    p = cli('demo', '--out', tmp_path/'old', '--quick')
    assert p.returncode == 2 and '--overwrite' in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr

@pytest.fixture(scope='module')
def reid_files(tmp_path_factory):
    "A checkpoint as `train` writes it (resnet18, untrained), and a small embedded dataset"
    from fastreid_rollback.synthetic import synthetic_reid
    from fastreid_rollback.data import market1501, reid_dls
    from fastreid_rollback.learner import reid_learner
    from fastreid_rollback.experiment import save_checkpoint
    d = tmp_path_factory.mktemp('reid')
    data = synthetic_reid(d, n_ids=8, n_cams=2, imgs_per_id_cam=2, size=(64, 32), n_distractors=2, n_junk=1)
    torch.manual_seed(0)
    learn = reid_learner(reid_dls(market1501(data), size=(64, 32), bs=8), 'resnet18', pretrained=False)
    return save_checkpoint(learn, d/'model.pth', with_opt=False, arch='resnet18', size=[64, 32]), data

def test_export_index_search(tmp_path, reid_files):
    "export -> index -> search on the command line gives the table and picture the Python API gives"
    from fastreid_rollback.inference import ReIDIndex
    ckpt, data = reid_files
    p = cli('export', '--checkpoint', ckpt, '--out', tmp_path/'model.reid')
    assert p.returncode == 0, p.stderr[-3000:]
    p = cli('index', '--model', tmp_path/'model.reid', '--images', data/'bounding_box_test', '--out', tmp_path/'gallery.idx')
    assert p.returncode == 0, p.stderr[-3000:]
    assert 'Indexed 11 images' in p.stdout
    queries = sorted((data/'query').iterdir())[:2]
    p = cli('search', '--index', tmp_path/'gallery.idx', '--query', *queries, '--k', 3, '--show', tmp_path/'ranked.png')
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path/'ranked.png').stat().st_size > 0
    want = ReIDIndex.load(tmp_path/'gallery.idx').search(queries, k=3)
    lines = p.stdout.splitlines()
    assert lines[0].split() == ['query', 'rank', 'path', 'distance', 'pid', 'camid']
    assert [l.split()[2] for l in lines[1:7]] == list(want.path)

@pytest.fixture(scope='module')
def inference_files(reid_files, tmp_path_factory):
    "A model file and a gallery index made from `reid_files`, a model file of another model, and broken files"
    from fastreid_rollback.inference import checkpoint_to_reid, load_reid, save_reid, ReIDIndex
    from fastreid_rollback.model import create_reid_model
    ckpt, data = reid_files
    d = tmp_path_factory.mktemp('inference')
    model = checkpoint_to_reid(ckpt, d/'model.reid')
    ReIDIndex.build(load_reid(model), data/'bounding_box_test').save(d/'gallery.idx')
    save_reid(create_reid_model('resnet18', n_ids=4), d/'other.reid', size=(64, 32))
    (d/'garbage.bin').write_bytes(b'garbage' * 10)
    (d/'bad.jpg').write_text('not an image')
    (d/'folder').mkdir()
    return dict(garbage=d/'garbage.bin', data=data, model=model, index=d/'gallery.idx', bad=d/'bad.jpg',
                query=next((data/'query').iterdir()), other=d/'other.reid', folder=d/'folder')

@pytest.mark.parametrize('args,expected', [
    (['export', '--checkpoint', '/nonexistent/model.pth'], '/nonexistent/model.pth'),
    (['export', '--checkpoint', '{garbage}'], 'garbage.bin'),
    (['index', '--model', '{garbage}', '--images', '{data}'], 'garbage.bin'),
    (['index', '--model', '{model}', '--images', '/nonexistent/gallery'], '/nonexistent/gallery'),
    (['index', '--model', '{model}', '--images', '{data}', '--threads', '0'], 'threads must be >= 1, got 0'),
    (['search', '--index', '{index}', '--query', '{bad}'], 'bad.jpg'),
    (['search', '--index', '{index}', '--query', '{query}', '--model', '{other}'], 'built with another model'),
    (['search', '--index', '{index}'], '--query'),
    (['index', '--model', '{model}', '--images', '{data}', '--out', '{folder}'], "--out '{folder}' is a folder"),
    (['index', '--model', '{model}', '--images', '{data}', '--out', '{garbage}/g.idx'], "'{garbage}/g.idx': {garbage} is a file, not a folder"),
    (['export', '--checkpoint', '{garbage}', '--out', '{folder}'], "--out '{folder}' is a folder"),
    (['search', '--index', '{index}', '--query', '{query}', '--show', '{garbage}/ranked.png'], "--show '{garbage}/ranked.png'"),
])
def test_inference_errors(inference_files, args, expected):
    "Mistakes with export, index and search end with one line on stderr naming the file or flag, and exit status 2"
    p = cli(*[a.format(**inference_files) for a in args])
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in p.stderr, p.stderr
    assert lines[0].startswith('fastreid-rollback ') and expected.format(**inference_files) in lines[0], lines[0]


def test_index_uses_the_fast_path(inference_files, tmp_path):
    "`fastreid-rollback index` computes the gallery's features with `load_reid`'s defaults: BatchNorms folded, ReLUs fused, channels-last"
    from fastreid_rollback.cli import index_images
    from fastreid_rollback.inference import load_reid
    from fastreid_rollback.model import _ConvAct
    idx = index_images(model=str(inference_files['model']), images=str(inference_files['data']/'bounding_box_test'), out=str(tmp_path/'g.idx'))
    p = idx.predictor
    assert p.fold_bn and p.channels_last and p.fuse_relu and any(isinstance(m, _ConvAct) for m in p.net.modules())
    plain = load_reid(inference_files['model'], fold_bn=False, channels_last=False, fuse_relu=False)(idx.paths)
    assert (idx.feats - plain).abs().max() < 1e-4
    one = index_images(model=str(inference_files['model']), images=str(inference_files['data']/'bounding_box_test'), out=str(tmp_path/'g1.idx'), threads=1)
    assert one.predictor.threads == 1 and (one.feats - idx.feats).abs().max() < 1e-5   # --threads: the same features


@pytest.mark.skipif(torch.cuda.is_available(), reason='fp16 runs where there is a CUDA GPU')
def test_index_fp16_needs_a_gpu(inference_files, tmp_path):
    "index --fp16 without a CUDA GPU: one line naming fp16 and the device, exit status 2, no index written"
    p = cli('index', '--model', inference_files['model'], '--images', inference_files['data']/'bounding_box_test', '--out', tmp_path/'g.idx', '--fp16')
    assert p.returncode == 2 and 'fp16=True: half precision runs on a CUDA device, not on cpu' in p.stderr, p.stderr[-2000:]
    assert len(p.stderr.strip().splitlines()) == 1 and not (tmp_path/'g.idx').exists()

def test_index_skip_bad_images(inference_files, tmp_path):
    "index --skip-bad-images leaves a broken link out and names it on stderr; without it, the error names the link as it is in the folder"
    gal = tmp_path/'gallery'; gal.mkdir()
    for p in sorted((inference_files['data']/'bounding_box_test').iterdir())[:3]: (gal/p.name).symlink_to(p)
    (gal/'0099_c1s1_000001_00.jpg').symlink_to(tmp_path/'moved_away.jpg')
    p = cli('index', '--model', inference_files['model'], '--images', gal, '--out', tmp_path/'g.idx')
    assert p.returncode == 2 and f"{gal/'0099_c1s1_000001_00.jpg'}' (a symbolic link to" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    p = cli('index', '--model', inference_files['model'], '--images', gal, '--out', tmp_path/'g.idx', '--skip-bad-images')
    assert p.returncode == 0 and 'Indexed 3 images' in p.stdout, p.stderr[-2000:]
    assert p.stderr.strip() == f"fastreid-rollback index: skipping 1 unreadable image(s): {gal/'0099_c1s1_000001_00.jpg'}", p.stderr
    umask = os.umask(0); os.umask(umask)
    assert (tmp_path/'g.idx').stat().st_mode & 0o777 == 0o666 & ~umask

heavy = {'torch', 'fastai', 'torchvision', 'timm', 'pandas', 'matplotlib', 'faiss', 'onnx'}  # not numpy: a newer fastcore may import it

@pytest.mark.parametrize('args,code', [(['--help'], 0), (['export', '--help'], 0), (['train', '--help'], 0), (['train', '--bs', 'x'], 2),
                                       (['search', '--k'], 2), (['fly'], 2), ([], 2), (['eval', '--data', '.'], 2),
                                       (['eval', '--model', '/nonexistent/model.pth'], 2), (['index', '--images', '.'], 2),
                                       (['export', '--checkpoint', 'model.pth', '--out', '/'], 2), (['search', '--index', 'g.idx'], 2)])
def test_help_and_argument_errors_import_nothing_heavy(args, code):
    "`--help`, a command's `--help`, argument errors and missing or misplaced files answer without importing torch, fastai or pandas"
    probe = f"""
import sys
from fastreid_rollback.cli import main
try: code = main({args!r})
except SystemExit as e: code = e.code
print('CODE', code, sorted({{m.split('.')[0] for m in sys.modules}} & {heavy!r}))
"""
    p = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True, timeout=120)
    assert p.stdout.splitlines()[-1] == f"CODE {code} []", (p.stdout[-500:], p.stderr[-2000:])

def test_train_lr_default_is_the_reference():
    "The CLI writes the reference LR out (its --help imports no torch): it is `reference_lr`"
    import inspect
    from fastreid_rollback.cli import train
    from fastreid_rollback.learner import reference_lr
    assert inspect.signature(train).parameters['lr'].default == reference_lr

def test_train_size_default_is_the_library_one():
    "The CLI writes the default input size out (its --help imports no torch): it is `reid_size`"
    import inspect
    from fastreid_rollback.cli import train
    from fastreid_rollback.data import reid_size
    assert inspect.signature(train).parameters['size'].default == reid_size
