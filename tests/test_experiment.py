"Tests of the study pieces of `fastreid_rollback.experiment`: the cached source backbone, the arms, the records, the decision rule."
import inspect, json, os, stat, warnings
import numpy as np, pytest, torch
from torch import nn
from torchvision.models import resnet18
from fastreid_rollback.synthetic import synthetic_reid
from fastreid_rollback.data import market1501, reid_dls
from fastreid_rollback.model import create_reid_model, save_backbone
from fastreid_rollback.test_utils import make_pretrained, StopAfter
from fastreid_rollback.rollback import RollbackCallback
from fastreid_rollback.experiment import (read_checkpoint, source_backbone, rollback_cache, train_arm, arm_periods, train_reid, compare_rollback, arm_names, run_record,
                                          EpochLosses, paired_difference, decide, plateau_epoch, block_weight_change, fork_run, PeriodWeightChange,
                                          converged_period)

torch.set_num_threads(1)
TINY = dict(n_ids=6, n_cams=2, imgs_per_id_cam=1, epochs=1, bs=4)

def quiet(f, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return f(*args, **kwargs)

def test_source_backbone_cached(tmp_path, monkeypatch):
    "Built once into $FASTREID_ROLLBACK_CACHE (umask respected, nothing left behind), found again without training, keyed by its arguments"
    monkeypatch.setenv('FASTREID_ROLLBACK_CACHE', str(tmp_path/'cache'))
    assert rollback_cache() == tmp_path/'cache'
    old = os.umask(0o027)
    try: fn = quiet(source_backbone, **TINY)
    finally: os.umask(old)
    assert fn.parent == tmp_path/'cache' and fn.is_file()
    assert sorted(f.name for f in fn.parent.iterdir()) == sorted([fn.name, fn.with_suffix('.json').name])
    assert stat.S_IMODE(fn.stat().st_mode) == 0o640
    info = json.loads(fn.with_suffix('.json').read_text())
    assert info['n_ids'] == 6 and info['build_time_s'] > 0
    stamp = fn.stat().st_mtime_ns
    assert source_backbone(**TINY) == fn and fn.stat().st_mtime_ns == stamp    # no training the second time
    other = quiet(source_backbone, **{**TINY, 'seed': 1})
    assert other != fn and other.parent == fn.parent
    create_reid_model('resnet18', n_ids=3, pretrained=fn)                             # loads as a backbone
    monkeypatch.delenv('FASTREID_ROLLBACK_CACHE')
    assert rollback_cache() == rollback_cache().home()/'.cache'/'fastreid_rollback'

@pytest.fixture(scope='module')
def small(tmp_path_factory):
    tmp = tmp_path_factory.mktemp('exp')
    root = synthetic_reid(tmp, n_ids=12, n_train_ids=4, n_cams=3, imgs_per_id_cam=2, n_distractors=2, n_junk=2, size=(64, 32), shift=0.5)
    weights = make_pretrained(tmp/'resnet18.pth', bn_stats=False)
    return reid_dls(market1501(root), size=(64, 32), bs=8, seed=0), weights

def test_arms(small):
    "The three arms, with the same seed: the control and rolling back share period 1 exactly, then part"
    dls, weights = small
    losses = {a: EpochLosses() for a in arm_names}
    runs = {a: quiet(train_arm, dls, a, n_periods=2, epochs_per_period=1, arch='resnet18', pretrained=weights, cbs=[losses[a]]) for a in arm_names}
    assert [runs[a].rollback_epochs for a in arm_names] == [[], [1], [1]]
    assert [e['restored'] for e in runs['control'].rollback.events] == [False]
    assert runs['control'].period_end(1).as_dict() == runs['rollback'].period_end(1).as_dict()
    assert losses['control'].losses[0] == losses['rollback'].losses[0] and losses['control'].losses[1] != losses['rollback'].losses[1]
    assert sorted(runs['baseline'].evals) == [0, 1]                         # evaluated at every period length
    rec = {a: run_record(runs[a], losses[a]) for a in arm_names}
    json.dumps(rec)                                                         # JSON-ready
    assert rec['rollback']['evals'][1]['mAP'] == runs['rollback'].result.mAP == rec['rollback']['mAP']
    assert len(rec['baseline']['epoch_loss']) == 2 and list(rec['baseline']['block_grads']) == ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head']
    assert all(v > 0 for a in arm_names for v in rec[a]['weight_change'].values())   # every block trained, from the pre-trained weights
    with pytest.raises(ValueError, match='arm='): train_arm(dls, 'finetune')
    with pytest.raises(ValueError, match='period 3'): runs['rollback'].period_end(3)

def test_baseline_from_random_init(small):
    "The baseline never rolls back, so it trains from a random init too (the study's `scratch` runs: does pretraining help); rolling back cannot"
    dls, _ = small
    run = quiet(train_arm, dls, 'baseline', n_periods=2, epochs_per_period=1, arch='resnet18', pretrained=False)
    assert sorted(run.evals) == [0, 1] and run.rollback.restore is False
    with pytest.raises(ValueError, match='no pre-trained state'): quiet(train_arm, dls, 'rollback', n_periods=2, epochs_per_period=1, arch='resnet18', pretrained=False)

def test_compare_rollback_arms_keep_their_checkpoints(small, tmp_path):
    "With `out`, each arm checkpoints into its own folder: no arm resumes or overwrites another's"
    dls, weights = small
    runs = quiet(compare_rollback, dls, n_periods=2, epochs_per_period=1, arms=('baseline', 'rollback'), arch='resnet18', pretrained=weights, out=tmp_path)
    metas = {a: read_checkpoint(tmp_path/a/'checkpoints'/'last.pth')['meta'] for a in runs}
    assert {a: (m['n_periods'], m['epochs_per_period']) for a, m in metas.items()} == {'baseline': (1, 2), 'rollback': (2, 1)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['baseline', 'rollback']
    with pytest.raises(ValueError, match='finetune'): compare_rollback(dls, arms=('baseline', 'finetune'))

def same_state(a, b): return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

def test_compare_rollback_module_body_per_arm(small, tmp_path):
    "Given a body module, every arm trains its own copy: each run's model holds the weights that arm trained, the caller's module is untouched"
    dls, weights = small
    body = resnet18(); body.fc = nn.Identity()
    given = {k: v.clone() for k, v in body.state_dict().items()}
    runs = quiet(compare_rollback, dls, n_periods=2, epochs_per_period=1, arms=arm_names, arch=body, pretrained=weights, out=tmp_path)
    bbs = [r.learn.model.backbone for r in runs.values()]
    assert all(b is not body for b in bbs) and len({id(p) for b in bbs for p in b.parameters()}) == 3*len(list(body.parameters()))
    for a, r in runs.items():   # the weights each arm's own last checkpoint saved
        assert same_state(r.learn.model.state_dict(), read_checkpoint(tmp_path/a/'checkpoints'/'last.pth')['model']), a
    assert same_state(body.state_dict(), given)
    wc = {a: r.learn.model.state_dict()['backbone.layer4.1.conv2.weight'] for a, r in runs.items()}
    assert not torch.equal(wc['baseline'], wc['rollback']) and not torch.equal(wc['control'], wc['rollback'])

def test_train_reid_passes_rollback_settings(small):
    "keep, kept_lr_mult, head_lr_mult, reset_opt and sched reach the RollbackCallback; their defaults are its defaults"
    dls, weights = small
    kw = dict(keep=[['stem', 'layer1']], kept_lr_mult=0.5, head_lr_mult=3., reset_opt='rolled_back', sched='one_cycle')
    run = quiet(train_reid, dls, arch='resnet18', pretrained=weights, n_periods=2, epochs_per_period=1, **kw)
    assert {k: getattr(run.rollback, k) for k in kw} == kw
    assert run.rollback.events[0]['kept'] == ['stem', 'layer1'] and run.rollback.events[0]['rolled_back'] == ['layer2', 'layer3', 'layer4']
    lrs = run.rollback.lr_df.groupby('epoch').max()   # one_cycle: the peak of each period is the period's LR
    assert lrs.loc[0, 'head'] == pytest.approx(3*lrs.loc[0, 'layer4']) and lrs.loc[1, 'layer1'] == pytest.approx(0.5*lrs.loc[1, 'layer4'])
    sig = lambda f: inspect.signature(f).parameters
    assert all(sig(train_reid)[k].default == sig(RollbackCallback)[k].default for k in kw)

def test_fork_run_from_period1_bitwise(small, tmp_path):
    "Period 1 trained once; the control and rolling back resumed from its checkpoint end bit-identical to their uninterrupted runs"
    dls, weights = small
    kw = dict(n_periods=2, epochs_per_period=1, arch='resnet18', pretrained=weights, seed=3)
    changes = PeriodWeightChange(1)
    p1 = quiet(train_arm, dls, 'rollback', out=tmp_path/'p1', cbs=[StopAfter(1), changes], **kw)
    assert list(changes.changes) == [1] and sorted(p1.evals) == [0]
    for arm in ('control', 'rollback'):
        full = quiet(train_arm, dls, arm, **kw)
        assert fork_run(tmp_path/'p1'/'checkpoints'/'period1.pth', tmp_path/arm) == tmp_path/arm/'checkpoints'/'last.pth'
        cont = quiet(train_arm, dls, arm, out=tmp_path/arm, resume=True, **kw)
        assert same_state(cont.learn.model.state_dict(), full.learn.model.state_dict()), arm
        assert cont.result.as_dict() == full.result.as_dict() and cont.rollback_epochs == full.rollback_epochs == [1]
        assert cont.grads.df.equals(full.grads.df) and cont.grads.rel_df.equals(full.grads.rel_df)   # period 1 carried from the checkpoint
        assert p1.evals[0].as_dict() == full.evals[0].as_dict()
    with pytest.raises(FileNotFoundError, match='ckpt='): fork_run(tmp_path/'none.pth', tmp_path/'x')

def test_period_weight_change(small):
    "Per period, how far each block moved from where the period started: the rolled-back blocks from the pre-trained state"
    dls, weights = small
    runs = {}
    for arm in ('control', 'rollback'):
        ch = PeriodWeightChange(1)
        runs[arm] = (quiet(train_arm, dls, arm, n_periods=2, epochs_per_period=1, arch='resnet18', pretrained=weights, cbs=[ch]), ch)
    (_, cc), (r, rc) = runs['control'], runs['rollback']
    assert sorted(cc.changes) == sorted(rc.changes) == [1, 2] and cc.changes[1] == rc.changes[1]   # period 1 is shared
    assert rc.changes[2]['layer4'] == pytest.approx(block_weight_change(r.learn.model)['layer4'])   # layer4 restarted from the pre-trained state
    assert rc.changes[2]['stem'] != pytest.approx(block_weight_change(r.learn.model)['stem'])       # the stem was kept
    assert all(v > 0 for v in cc.changes[2].values())
    rec = run_record(r, changes=rc)
    assert rec['period_weight_change'] == rc.changes and list(rec['block_rel_grads']) == list(rec['block_grads'])
    json.dumps(rec)
    with pytest.raises(ValueError, match='every'): PeriodWeightChange(0)

def test_converged_period():
    e = np.arange(1, 41)
    mAP, loss = 0.7*(1 - np.exp(-e/4)), 2*np.exp(-e/2) + 0.5
    P = converged_period(mAP, loss)
    flat = lambda l, p: abs(l[p-(-(-p//4)):p].mean() - l[p-2*(-(-p//4)):p-(-(-p//4))].mean()) < 0.05*l[0]
    assert P is not None and abs(mAP[2*P-1] - mAP[P-1]) <= 0.01 and flat(loss, P)
    assert all(abs(mAP[2*p-1] - mAP[p-1]) > 0.01 or not flat(loss, p) for p in range(2, P))   # none earlier passes both
    assert converged_period([.1, .5, .5, .5], [1., .99, .98, .98]) == 2    # mAP(2) = mAP(4); loss 1 -> 0.99 over the last quarter (epoch 2)
    assert converged_period([.1, .5, .5, .5], [3., 2., 1., .98]) is None    # the loss falls by a third of its first value in epoch 2
    assert converged_period([.1, .2, .3, .4, .5, .6], [1.]*6) is None        # mAP still rising
    assert converged_period(np.full(40, .5), 3*np.exp(-np.arange(1, 41)/10)) is None   # loss still falling
    assert converged_period(mAP[:2*P-1], loss[:2*P-1]) is None               # too short to see the mAP at 2P
    with pytest.raises(ValueError, match='same epochs'): converged_period([.1, .2], [1.])

def test_block_weight_change(tmp_path):
    m = create_reid_model('resnet18', n_ids=2, pretrained=save_backbone(create_reid_model('resnet18', n_ids=2), tmp_path/'b.pth'))
    assert set(block_weight_change(m).values()) == {0.}
    with torch.no_grad(): m.backbone.conv1.weight.mul_(1.5)
    ch = block_weight_change(m)
    assert 0 < ch['stem'] < 0.5 and ch['layer1'] == 0
    assert block_weight_change(create_reid_model('resnet18', n_ids=2)) == {}       # no pre-trained state

def test_decision_rule():
    assert decide({'rollback': [.50, .52, .51], 'baseline': [.45, .46, .45], 'control': [.49, .50, .49]})['outcome'] == 'rolling back wins'
    assert decide({'rollback': [.50, .52, .51], 'baseline': [.45, .46, .45], 'control': [.50, .52, .50]})['outcome'] == 'no clear result'
    assert decide({'rollback': [.40, .41, .40], 'baseline': [.45, .46, .45], 'control': [.30, .30, .30]})['outcome'] == 'rolling back loses'
    d = paired_difference([.5, .6, .7], [.4, .4, .4])
    assert d['diffs'] == pytest.approx([.1, .2, .3]) and d['mean'] == pytest.approx(.2) and d['std'] == pytest.approx(.1)
    assert d['verdict'] == 'no clear difference'                           # mean 0.2 = 2 sd: not above
    assert paired_difference([.42, .43, .43], [.4, .4, .4])['verdict'] == 'better'
    assert paired_difference([.401, .402, .401], [.4, .4, .4])['verdict'] == 'no clear difference'   # under 0.01
    assert paired_difference([.3, .3, .31], [.4, .4, .4])['verdict'] == 'worse'
    with pytest.raises(ValueError, match='at least 2 seeds'): paired_difference([.5], [.4])

def test_plateau_epoch():
    assert plateau_epoch([4., 2., 1.2, 1.05, 1.]) == 3                       # 1.2 <= 1 + 0.1*3
    assert plateau_epoch([4., 2., 1.2, 1.05, 1.], frac=0.25) == 3
    assert plateau_epoch([4., 2., 1.2, 1.05, 1.], frac=0.5) == 2
    with pytest.raises(ValueError, match='losses'): plateau_epoch([1.])

def test_arm_periods():
    "Every arm trains the same total epochs, the baseline in one period"
    assert {a: arm_periods(a, 4, 40) for a in arm_names} == {'baseline': (1, 160), 'control': (4, 40), 'rollback': (4, 40)}
    with pytest.raises(ValueError, match="arm='other': expected one of"): arm_periods('other', 4, 40)
