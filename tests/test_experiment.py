"Tests of the study pieces of `fastreid_rollback.experiment`: the cached source backbone, the arms, the records, the decision rule."
import json, os, stat, warnings
import pytest, torch
from fastreid_rollback.synthetic import synthetic_reid
from fastreid_rollback.data import market1501, reid_dls
from fastreid_rollback.model import ReIDModel, save_backbone
from fastreid_rollback.test_utils import make_pretrained
from fastreid_rollback.experiment import (read_checkpoint, source_backbone, rollback_cache, train_arm, compare_rollback, arm_names, run_record,
                                          EpochLosses, paired_difference, decide, plateau_epoch, block_weight_change)

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
    ReIDModel('resnet18', n_ids=3, pretrained=fn)                             # loads as a backbone
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

def test_compare_rollback_arms_keep_their_checkpoints(small, tmp_path):
    "With `out`, each arm checkpoints into its own folder: no arm resumes or overwrites another's"
    dls, weights = small
    runs = quiet(compare_rollback, dls, n_periods=2, epochs_per_period=1, arms=('baseline', 'rollback'), arch='resnet18', pretrained=weights, out=tmp_path)
    metas = {a: read_checkpoint(tmp_path/a/'checkpoints'/'last.pth')['meta'] for a in runs}
    assert {a: (m['n_periods'], m['epochs_per_period']) for a, m in metas.items()} == {'baseline': (1, 2), 'rollback': (2, 1)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ['baseline', 'rollback']
    with pytest.raises(ValueError, match='finetune'): compare_rollback(dls, arms=('baseline', 'finetune'))

def test_block_weight_change(tmp_path):
    m = ReIDModel('resnet18', n_ids=2, pretrained=save_backbone(ReIDModel('resnet18', n_ids=2), tmp_path/'b.pth'))
    assert set(block_weight_change(m).values()) == {0.}
    with torch.no_grad(): m.backbone.conv1.weight.mul_(1.5)
    ch = block_weight_change(m)
    assert 0 < ch['stem'] < 0.5 and ch['layer1'] == 0
    assert block_weight_change(ReIDModel('resnet18', n_ids=2)) == {}       # no pre-trained state

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
