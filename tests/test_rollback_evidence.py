"benchmarks/rollback_evidence.py's analysis on made-up records: block names come from the records (any backbone), the budget sets the period"
import importlib.util, json
from pathlib import Path
import numpy as np, pytest

root = Path(__file__).resolve().parent.parent

@pytest.fixture(scope='module')
def ev():
    spec = importlib.util.spec_from_file_location('rollback_evidence', root/'benchmarks'/'rollback_evidence.py')
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    return mod

BLOCKS = ['stem', 'stage1', 'stage2', 'stage3', 'stage4']   # not ResNet's names
CFG = dict(seeds=[0, 1, 2], n_periods=2, min_period=1, probe_epochs=200, sources={'a': {'settings': ['shift']}, 'b': {'settings': ['shift', 'no_shift']}})

def record(rng, arm, P, n=2):
    epochs = P if arm == 'period1' else n*P
    per_block = lambda: {b: list(rng.uniform(0.5, 2, epochs)*10.**-i) for i, b in enumerate([*BLOCKS, 'head'])}
    windows = [1] if arm == 'period1' else range(1, n+1)
    return {'mAP': rng.uniform(.3, .6), 'rank1': rng.uniform(.5, .8), 'mINP': rng.uniform(.1, .3), 'rollback_epochs': [P] if arm in ('control', 'rollback') else [],
            'evals': {(k+1)*P-1: {'mAP': rng.uniform(.3, .6)} for k in range(epochs//P)}, 'epoch_loss': list(rng.uniform(0, 1, epochs)),
            'block_grads': per_block(), 'block_rel_grads': per_block(), 'weight_change': {b: rng.uniform(.01, .1) for b in BLOCKS},
            'period_weight_change': {k: {b: rng.uniform(.01, .1) for b in BLOCKS} for k in windows}}

def test_analysis_reads_block_names(ev, tmp_path):
    rng, P = np.random.default_rng(0), 3
    recs = {(a, 'shift', s): record(rng, a, P) for a in ('baseline', 'control', 'rollback', 'period1') for s in CFG['seeds']}
    settings = ev.analyse(recs, CFG, ['shift'], P)
    assert settings['shift']['block_grads']['blocks'] == BLOCKS and set(settings['shift']['block_grads']['baseline_relative_to_top']) == set(BLOCKS)
    assert settings['shift']['decision']['outcome'] in ('rolling back wins', 'rolling back loses', 'no clear result')
    gm = ev.grad_measures({(a, s): r for (a, _, s), r in recs.items()}, CFG)
    assert gm['blocks'] == BLOCKS and set(gm['starved']) == {'mean_sq_grad', 'grad_norm_over_weight_norm', 'weight_change_per_period'}
    assert gm['mean_sq_grad']['relative_to_top']['stage4'] == pytest.approx(1) and gm['mean_sq_grad']['relative_to_top']['stem'] > 1
    assert sorted(gm['weight_change_per_period']['by_arm']['rollback']) == [1, 2]
    json.dumps(gm); json.dumps(settings)
    ev.plot_all(recs, settings, CFG, P, tmp_path, prefix='t')
    assert sorted(f.name for f in tmp_path.iterdir()) == ['t_block_grads.png', 't_map.png']
    curves = {'a': {'shift': {'val_mAP': [.1, .2, .3, .3], 'train_loss': [1., .5, .4, .4]}}}
    ev.plot_period_rule(curves, {'a': {'epochs': 2, 'converged': True}}, tmp_path/'rule.png')
    assert (tmp_path/'rule.png').is_file()

def test_budget_periods(ev):
    "What is left after the probes sets the periods: a converged source keeps its rule's period, the others share the rest"
    timing = {'a': {'epoch_s': 1., 'eval_s': 1.}, 'b': {'epoch_s': 2., 'eval_s': 1.}}
    study = lambda ps: sum(ev.cost(P, CFG, timing, [n], probe=False) for n, P in ps.items())
    ps, cap, est = ev.budget_periods(CFG, timing, {'a': None, 'b': None}, seconds_left=3600, workers=2)
    assert ps == {'a': cap, 'b': cap} and study(ps) <= 0.9*3600*2 < study({'a': cap+1, 'b': cap+1})
    assert est == pytest.approx(study(ps)/(0.9*2))
    ps2, cap2, _ = ev.budget_periods(CFG, timing, {'a': 3, 'b': None}, 3600, 2)   # a converged at 3: b gets a's share
    assert ps2['a'] == 3 and ps2['b'] == cap2 > cap
    assert ev.budget_periods(CFG, timing, {'a': None}, 3600, 2)[1] > cap          # one source: longer periods
    assert ev.budget_periods(CFG, timing, {'a': 3, 'b': 5}, 10**6, 2)[0] == {'a': 3, 'b': 5}   # room for both rules
    assert ev.budget_periods(CFG, timing, {'a': 30, 'b': None}, 1, 2)[0] == {'a': 1, 'b': 1}   # no budget: min_period
    assert ev.budget_periods({**CFG, 'probe_epochs': 10}, timing, {'a': None}, 10**6, 2)[0] == {'a': 5}   # no longer than the probe can judge
    assert ev.cost(4, CFG, timing, ['a']) - ev.cost(4, CFG, timing, ['a'], probe=False) == pytest.approx(CFG['probe_epochs']*2.)
    own = {**CFG, 'probe_epochs': 10, 'sources': {**CFG['sources'], 'b': {**CFG['sources']['b'], 'probe_epochs': 40}}}   # a source's own probe length
    assert ev.probe_len(own, 'a') == 10 and ev.probe_len(own, 'b') == 40
    assert ev.cost(4, own, timing, ['b']) - ev.cost(4, own, timing, ['b'], probe=False) == pytest.approx(2*40*3.)   # two settings, 40 epochs, 2+1 s each
    assert ev.budget_periods(own, timing, {'a': None, 'b': None}, 10**6, 2)[0] == {'a': 5, 'b': 20}   # each probe bounds its own source

def test_help_documents_the_sources(ev, capsys):
    with pytest.raises(SystemExit): ev.parse_args(['--help'])
    out = capsys.readouterr().out
    assert all(s in out for s in ('--source', 'synthetic', 'imagenet_mobilenet_v2', 'both', '--budget', '--small', '--probe-epochs', '--probe-only'))

def test_merge_previous(ev, tmp_path):
    "One source at a time: a later run adds its source and keeps the other; the synthetic source stays at the top level"
    out = tmp_path/'r.json'
    syn, mob = {'zero_shot_mAP': .3, 'runs': {'shift/baseline/seed0': {}}}, {'zero_shot_mAP': .02, 'runs': {'x': {}}}
    doc = ev.merge_previous({'synthetic': syn}, {'config': 1}, out)
    assert doc['zero_shot_mAP'] == .3 and doc['sources']['synthetic']['runs'] == 'see the top-level runs' and doc['config'] == 1
    out.write_text(json.dumps(doc))
    doc = ev.merge_previous({'imagenet_mobilenet_v2': mob}, {'config': 2}, out)
    assert doc['zero_shot_mAP'] == .3 and doc['runs'] == syn['runs'] and doc['config'] == 2
    assert sorted(doc['sources']) == ['imagenet_mobilenet_v2', 'synthetic'] and doc['sources']['imagenet_mobilenet_v2'] == mob
    assert ev.merge_previous({'imagenet_mobilenet_v2': mob}, {'config': 3}, tmp_path/'none.json') == {'config': 3, 'sources': {'imagenet_mobilenet_v2': mob}}

def test_reuse_probes(ev, tmp_path):
    "A --probe-only run's curves are reused only when the run is the same: configuration, architecture, size, probe length, zero-shot mAPs"
    cfg = {'bs': 32, 'lr': .01, 'target': {'n_ids': 9}, 'seeds': [0, 1, 2], 'probe_epochs': 4, 'sources': {'a': {'settings': ['shift']}}}
    srcs = {'a': {'arch': 'resnet18', 'size': [64, 32], 'settings': ['shift']}}
    zs = {'a': {0.: {'mAP': .3}, 1.0: {'mAP': .2}}}
    curve = {'shift': {'val_mAP': [.1, .2, .3, .3], 'train_loss': [2., 1., .5, .4], 'curve_of': 'the probe'}}
    prev = {'probe_only': True, 'config': {**cfg}, 'sources': {'a': {'arch': 'resnet18', 'size': [64, 32], 'period_len': {'curve': curve},
                                                                     'zero_shot_by_shift': {'0.0': {'mAP': .3}, '1.0': {'mAP': .2}}}}}
    fn = tmp_path/'probe.json'; fn.write_text(json.dumps(prev))
    assert ev.reuse_probes(fn, cfg, srcs, zs) == {'a': {'shift': {'val_mAP': [.1, .2, .3, .3], 'train_loss': [2., 1., .5, .4]}}}
    assert ev.reuse_probes(fn, cfg, {'b': srcs['a']}, {'b': zs['a']}) == {}                    # a source it did not probe: probed again
    with pytest.raises(ValueError, match='lr'): ev.reuse_probes(fn, {**cfg, 'lr': .02}, srcs, zs)
    with pytest.raises(ValueError, match='not this run'): ev.reuse_probes(fn, cfg, {'a': {**srcs['a'], 'size': [128, 64]}}, zs)
    with pytest.raises(ValueError, match='not this run'): ev.reuse_probes(fn, cfg, srcs, {'a': {0.: {'mAP': .31}, 1.0: {'mAP': .2}}})
    with pytest.raises(ValueError, match='not this run'): ev.reuse_probes(fn, {**cfg, 'probe_epochs': 6}, srcs, zs)
    with pytest.raises(ValueError, match='not this run'): ev.reuse_probes(fn, cfg, {'a': {**srcs['a'], 'channels_last': True}}, zs)

def test_replot_from_the_results_file(ev, tmp_path):
    "--replot draws every source's plots again from the records the results file holds, without training"
    ev.replot(root/'benchmarks'/'results'/'rollback_evidence.json', tmp_path)
    doc = json.loads((root/'benchmarks'/'results'/'rollback_evidence.json').read_text())
    want = {'evidence_period_rule.png', *(f'{ev.PREFIX[n]}_{k}.png' for n in doc['sources'] for k in ('map', 'block_grads'))}
    assert {p.name for p in tmp_path.glob('*.png')} == want and all((tmp_path/f).stat().st_size > 10_000 for f in want)
