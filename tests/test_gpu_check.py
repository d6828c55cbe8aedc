"benchmarks/gpu_check.py in its CPU mode: every section runs (or says why it cannot) with sane figures, so the GPU check cannot rot"
import importlib.util, json, os, subprocess, sys
from pathlib import Path
import pytest, torch

root = Path(__file__).resolve().parent.parent
script = root/'benchmarks'/'gpu_check.py'

def load_gpu_check():
    spec = importlib.util.spec_from_file_location('gpu_check', script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

@pytest.fixture(scope='module')
def run(tmp_path_factory):
    "The command CI runs: `gpu_check.py --device cpu --quick`; its JSON and printed table"
    out = tmp_path_factory.mktemp('gpu_check')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join([str(root), os.environ.get('PYTHONPATH', '')])}
    res = subprocess.run([sys.executable, str(script), '--device', 'cpu', '--quick', '--out', str(out)],
                         capture_output=True, text=True, timeout=900, env=env)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    return json.loads((out/'gpu_check.json').read_text()), res.stdout

def test_every_section_ran_or_says_why(run):
    r, printed = run
    gc = load_gpu_check()
    assert set(gc.SECTIONS) <= set(r)
    assert r['metric_agreement']['status'] == 'not run on CPU' and r['metric_agreement']['skipped'] == 1
    assert r['rerank_aqe']['status'] == 'ok'
    for s in ('metric_timings', 'rollback_fit', 'training_throughput', 'feature_extraction'): assert r[s]['status'] == 'ok', r[s]
    for s in gc.SECTIONS: assert s in printed and r[s]['seconds'] >= 0
    env = r['environment']
    assert env['device'] == 'cpu' and env['quick'] and env['torch'] == torch.__version__ and env['total_s'] > 0

def test_metric_timings(run):
    m = run[0]['metric_timings']
    for kind, row in m['market'].items():
        assert row['library_ms'] > 0 and row['one_sort_ms'] > 0 and row['same_as_cpu'] is True and 0 <= row['mAP'] <= 1, kind
    assert m['market']['trained_like']['mAP'] > 0.5 > m['market']['random']['mAP']
    ms = m['msmt']
    assert ms['library_ms'] > 0 and ms['one_sort_of_the_distances_ms'] > 0 and ms['same_as_cpu_on_256_queries'] is True
    assert ms['peak_gpu_gb'] is None and 'market_goal_met' not in m      # no GPU memory, no goal at tiny sizes

def test_rollback_fit_state_check(run):
    f = run[0]['rollback_fit']
    assert f['state_check_passed']
    for p in ('fp32', 'fp16'):
        r = f[p]
        assert r['rolled_back_blocks_changed_in_period_1'] and r['rolled_back_blocks_equal_pretrained'] and r['kept_blocks_keep_trained_state']
        assert r['bn_buffers_compared'] > 0 and r['epochs'] == 2 and r['loss_finite'] and r['images_per_s'] > 0
        assert r['kept'] == ['stem'] and r['rolled_back'] == ['layer1', 'layer2', 'layer3', 'layer4']
        assert 0 < r['rollback_s'] < r['fit_s']
    assert f['fp16']['amp'] is False and 'fp32' in f['fp16']['note']     # autocast('cuda') cannot run on the CPU

def test_training_throughput(run):
    t = run[0]['training_throughput']
    arms = ('plain_pytorch', 'learner', 'learner_progress_bar', 'learner_fastai_tensor_types')
    for a in arms: assert t['fp32'][a]['images_per_s'] > 0 and t['fp32'][a]['vs_plain'] > 0
    assert t['fp32']['plain_pytorch']['vs_plain'] == 1 and t['fp16'] == {'status': 'not run on CPU'}

def test_feature_extraction(run):
    f = run[0]['feature_extraction']
    assert f['gallery_images'] > 0 and f['feature_dim'] == 512                # resnet18 at the quick size
    assert f['reid_features_flip']['images_per_s'] > 0 and f['model_fp32']['images_per_s'] > 0
    assert f['model_fp16_autocast'] == {'status': 'not run on CPU'}
    assert f['reid_features_flip_plain']['images_per_s'] > 0
    p = f['predictor']
    assert p['old']['images_per_s'] > 0 and p['new']['images_per_s'] > 0 and p['old']['max_abs_diff'] == 0
    assert p['new']['within_tolerance'] and p['fp16'] == {'status': 'not run on CPU'}

def test_rerank_section(run):
    "The library's re-ranking and AQE are timed, and the metrics after each are those of their own output"
    r = run[0]['rerank_aqe']
    assert r['status'] == 'ok', r
    for f in ('reid_rerank', 'aqe'): assert r[f]['ms'] > 0 and 0 < r[f]['mAP'] <= 1
    assert r['reid_rerank']['mAP'] != r['mAP_plain'] or r['aqe']['mAP'] != r['mAP_plain']   # post-processing changed something

def test_a_failing_section_is_recorded_and_fails_the_run(monkeypatch, tmp_path):
    gc = load_gpu_check()
    def broken(ctx): raise RuntimeError('out of memory, say')
    monkeypatch.setattr(gc, 'feature_extraction', broken)
    assert gc.main(['--device', 'cpu', '--quick', '--out', str(tmp_path), '--only', 'rerank_aqe,feature_extraction']) == 1
    r = json.loads((tmp_path/'gpu_check.json').read_text())
    assert r['feature_extraction']['status'] == 'failed' and 'out of memory, say' in r['feature_extraction']['error']
    assert r['rerank_aqe']['status'] == 'ok' and r['rollback_fit']['status'] == 'not selected'

def test_bad_arguments(tmp_path, capsys):
    gc = load_gpu_check()
    with pytest.raises(SystemExit): gc.main(['--device', 'cpu', '--out', str(tmp_path), '--only', 'fit'])
    assert '--only' in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit): gc.main(['--out', str(tmp_path)])
        assert 'no CUDA device' in capsys.readouterr().err
