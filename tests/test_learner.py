"Checks of `fastreid_rollback.learner` beyond the notebook: failure cases, recorder integration, precision, plots"
import math, re, warnings, pytest, torch
from contextlib import nullcontext
import matplotlib; matplotlib.use('Agg')
import matplotlib.pyplot as plt
from fastai.callback.progress import ProgressCallback
from fastai.callback.progress import CSVLogger
from fastai.torch_core import set_seed
from fastai.callback.core import Callback, CancelFitException
from fastreid_rollback.synthetic import synthetic_reid
from fastreid_rollback.data import market1501, reid_dls, ReIDDataLoaders
from fastreid_rollback.model import create_reid_model, block_modules, save_backbone
from fastreid_rollback.metrics import reid_metrics
from fastreid_rollback.learner import *


@pytest.fixture(scope='module')
def df(tmp_path_factory):
    root = synthetic_reid(tmp_path_factory.mktemp('data'), n_ids=16, n_cams=2, imgs_per_id_cam=2, size=(32, 16), n_distractors=3, n_junk=2)
    return market1501(root)

@pytest.fixture(scope='module')
def dls(df): return reid_dls(df, size=(32, 16), bs=16, sampler='pk', p=4, k=2, seed=0)

def _learner(dls, **kwargs):
    learn = reid_learner(dls, 'resnet18', pretrained=False, **kwargs)
    learn.remove_cb(ProgressCallback)
    return learn


def test_groups_lr_and_freeze(dls):
    learn = _learner(dls)
    learn.create_opt()
    m = learn.model
    names = m.block_names + ['head']
    assert names == ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head']
    want = [[p for o in block_modules(m, n) for p in o.parameters()] for n in m.block_names] + [list(m.head.parameters())]
    assert [[id(p) for p in g] for g in learn.opt.param_lists] == [[id(p) for p in g] for g in want]
    learn.opt.set_hypers(lr=slice(1e-4, 1e-2), mom=0.8, wd=1e-3)
    pgs = learn.opt.opt.param_groups
    assert [g['lr'] for g in pgs] == pytest.approx([1e-4*10**(2*i/5) for i in range(6)])
    assert all(g['momentum'] == 0.8 and g['weight_decay'] == 1e-3 and g['nesterov'] for g in pgs)
    learn.freeze_to(3)
    assert not m.backbone.layer2[0].conv1.weight.requires_grad and m.backbone.layer3[0].conv1.weight.requires_grad
    assert m.backbone.layer2[0].bn1.weight.requires_grad  # fastai's train_bn keeps BatchNorm trainable


def test_reference_sgd_defaults(dls):
    learn = _learner(dls)
    learn.fit(1, 0.01)
    g = learn.opt.opt
    assert isinstance(g, torch.optim.SGD)
    assert all(pg['momentum'] == 0.9 and pg['nesterov'] and pg['weight_decay'] == 5e-4 for pg in g.param_groups)


def test_eval_callback_matches_reid_evaluate_and_logs(dls, tmp_path):
    set_seed(0)
    learn = _learner(dls, cbs=[ReIDEvalCallback(every=0), CSVLogger(fname=tmp_path/'log.csv')])
    n_mets = len(learn.metrics)
    learn.fit(2, 0.01)
    assert list(learn.recorder.metric_names) == ['epoch', 'train_loss', 'rank1', 'rank5', 'rank10', 'mAP', 'mINP', 'time']  # no validation set: no valid_loss, accuracy
    first, last = learn.recorder.values
    assert all(math.isnan(v) for v in first[-5:])
    r = learn.reid_evaluate()
    assert list(last[-5:]) == pytest.approx([r.rank(1), r.rank(5), r.rank(10), r.mAP, r.mINP])
    assert learn.reid_result.mAP == pytest.approx(r.mAP) and list(learn.cbs.filter(lambda c: isinstance(c, ReIDEvalCallback))[0].results) == [1]
    header = (tmp_path/'log.csv').read_text().splitlines()[0].split(',')
    assert header == list(learn.recorder.metric_names)
    assert len(learn.metrics) == n_mets  # the ReID metrics are removed after fit
    res = learn.validate()  # outside a training fit the callback does not evaluate
    assert len(res) == n_mets+1+5 and all(math.isnan(v) for v in res[-5:]) and len(learn.metrics) == n_mets


def test_evaluate_and_callback_with_postprocessing(dls):
    from fastreid_rollback.metrics import reid_metrics_from_dist
    from fastreid_rollback.retrieval import reid_rerank, aqe
    set_seed(0)
    learn = _learner(dls, cbs=ReIDEvalCallback(every=0, rerank=dict(k1=4, k2=2), aqe=True))
    learn.fit(1, 0.01)
    assert list(learn.recorder.metric_names)[-5:-1] == ['rank1 (AQE)', 'mAP (AQE)', 'rank1 (AQE + re-ranked)', 'mAP (AQE + re-ranked)']
    res = learn.reid_evaluate(rerank=dict(k1=4, k2=2), aqe=True, variants=True)
    assert list(learn.recorder.values[-1][-4:]) == pytest.approx([res['AQE'].rank(1), res['AQE'].mAP, res['AQE + re-ranked'].rank(1), res['AQE + re-ranked'].mAP])
    assert learn.reid_result.mAP == pytest.approx(res['plain'].mAP) == pytest.approx(learn.reid_evaluate().mAP)
    (qf, qp, qc), (gf, gp, gc) = learn.reid_features(dls.query), learn.reid_features(dls.gallery)
    assert learn.reid_evaluate(rerank=True).mAP == reid_metrics_from_dist(reid_rerank(qf, gf), qp, gp, qc, gc).mAP
    assert learn.reid_evaluate(aqe=dict(qe_k=3)).mAP == reid_metrics(*aqe(qf, gf, qe_k=3), qp, gp, qc, gc).mAP
    with pytest.raises(ValueError, match='aqe'): ReIDEvalCallback(aqe='yes')


def test_eval_callback_needs_query_gallery(dls):
    learn = _learner(dls, cbs=ReIDEvalCallback())
    q = dls.query
    try:
        dls.query = None
        with pytest.raises(ValueError, match='no query DataLoader'): learn.fit(1)
    finally: dls.query = q
    with pytest.raises(ValueError, match='every=-1'): ReIDEvalCallback(every=-1)
    with pytest.raises(ValueError, match='query: expected a DataLoader with .pids'): learn.reid_evaluate(query=torch.utils.data.DataLoader(range(3)))


@pytest.mark.parametrize('kw,msg', [(dict(max_rank=5), 'max_rank=5: ReIDEvalCallback records rank-10'), (dict(max_rank='10'), 'max_rank must be an int'),
                                    (dict(protocol='viper'), 'protocol'), (dict(ap='interpolated'), 'ap'), (dict(chunk_size=0), 'chunk_size'),
                                    (dict(dist='manhattan'), 'dist'), (dict(max_rnk=20), "unknown option(s) ['max_rnk']")])
def test_eval_callback_options_checked_at_once(kw, msg):
    "A bad option fails when the callback is made, not after a whole epoch of training"
    with pytest.raises(ValueError, match=re.escape(msg)): ReIDEvalCallback(**kw)

def test_eval_callback_max_rank_10_works(dls):
    learn = _learner(dls, cbs=ReIDEvalCallback(max_rank=10))
    learn.fit(1, 0.01)
    assert len(learn.reid_result.cmc) == 10 and math.isfinite(learn.recorder.values[-1][-1])

class Interrupt(Callback):
    "Ends a fit at its second batch with `exc`"
    def __init__(self, exc): self.exc = exc
    def after_batch(self):
        if self.iter == 1: raise self.exc('stop')

@pytest.mark.parametrize('exc', [KeyboardInterrupt, RuntimeError, CancelFitException])
@pytest.mark.parametrize('where', ['fit', 'learner'])
def test_eval_callback_leaves_learner_as_found(dls, exc, where):
    "Whatever ends a fit (Ctrl-C, an error, a cancel), the ReID metrics do not outlive their callback: a plain fit works after"
    learn = _learner(dls, cbs=ReIDEvalCallback() if where == 'learner' else None)
    names = [m.name for m in learn.metrics]
    cbs = [Interrupt(exc)] + ([ReIDEvalCallback()] if where == 'fit' else [])
    with nullcontext() if exc is CancelFitException else pytest.raises(exc): learn.fit(1, 0.01, cbs=cbs)
    if where == 'learner': learn.remove_cb(ReIDEvalCallback)
    assert [m.name for m in learn.metrics] == names
    learn.fit(1, 0.01)
    assert list(learn.recorder.metric_names) == ['epoch', 'train_loss', 'time'] and math.isfinite(learn.recorder.values[-1][0])

def test_reid_evaluate_without_eval_sets(dls, df):
    learn = _learner(dls)
    learn.dls = ReIDDataLoaders(dls.train, dls.valid)                   # DataLoaders without query and gallery
    with pytest.raises(ValueError, match='learn.dls has no query DataLoader'): learn.reid_evaluate()
    learn.dls = dls
    empty = dls.valid                                                    # valid_pct=0: an empty ReIDDL
    assert len(empty.dataset) == 0
    with pytest.raises(ValueError, match='query: the DataLoader holds no image'): learn.reid_evaluate(query=empty)
    with pytest.raises(ValueError, match='gallery: the DataLoader holds no image'): learn.reid_evaluate(gallery=empty)
    with pytest.raises(ValueError, match='dl: the DataLoader holds no image'): learn.reid_features(empty)

def test_ids_must_fit_the_head(dls, df):
    with pytest.raises(ValueError, match=f'classifies {dls.n_ids+3} identities but dls has {dls.n_ids}'):
        reid_learner(dls, create_reid_model('resnet18', n_ids=dls.n_ids+3))
    learn = _learner(dls)
    other = reid_dls(df[~df.pid.isin(df[df.split == 'train'].pid.unique()[:2])], size=(32, 16), bs=16, sampler='pk', p=4, k=2)
    learn.dls = other
    with pytest.raises(ValueError, match='training identities'): learn.fit(1)
    with pytest.raises(ValueError, match="loss='arcface'"): reid_learner(dls, 'resnet18', pretrained=False, loss='arcface')


def test_given_model_trained_as_given(dls):
    "A ready ReIDModel is the object the Learner trains, never switched to other outputs behind the caller's back"
    m = create_reid_model('resnet18', n_ids=dls.n_ids, with_feats=True)
    w = m.head.classifier.weight.detach().clone()
    learn = reid_learner(dls, m, loss='ce', cbs=[])
    learn.remove_cb(ProgressCallback)
    learn.fit(1, 0.01)
    assert learn.model is m and m.with_feats and not torch.equal(m.head.classifier.weight, w)
    plain = create_reid_model('resnet18', n_ids=dls.n_ids)
    with pytest.raises(ValueError, match=r"loss='triplet' needs the pooled features.*with_feats=True"): reid_learner(dls, plain, loss='triplet')
    assert not plain.with_feats
    assert reid_learner(dls, 'resnet18', pretrained=False, loss='ce+triplet').model.with_feats   # a model it builds returns the features

def test_features(dls):
    learn = _learner(dls, neck='bnneck')
    f, p, c = learn.reid_features(dls.gallery)
    assert f.shape == (len(dls.gallery.items), 512) and torch.allclose(f.norm(dim=1), torch.ones(len(f)))
    assert torch.equal(p, dls.gallery.pids) and torch.equal(c, dls.gallery.camids)
    assert learn.model.training  # the train/eval mode is restored
    nf, _, _ = learn.reid_features(dls.gallery, flip=False, normalize=False)
    x = dls.gallery.one_batch()[0]
    learn.model.eval()
    with torch.no_grad(): assert torch.allclose(nf[:len(x)], learn.model.features(x), atol=1e-5)
    r = learn.reid_evaluate(max_rank=5)
    assert len(r.cmc) == 5


def test_triplet_training_and_metrics(dls):
    learn = _learner(dls, loss='ce+triplet', triplet_margin=0.3, neck='bnneck')
    learn.recorder.train_metrics = True
    learn.fit(1, 0.01)
    assert learn.model.with_feats
    assert all(isinstance(v, float) and math.isfinite(v) for v in learn.recorder.values[0][:2])
    preds, targs = learn.get_preds(dl=dls.train.new(shuffle=False, drop_last=False))
    assert preds.shape == (len(targs), dls.n_ids)
    assert torch.allclose(preds.sum(1), torch.ones(len(preds)), atol=1e-4)


def test_mixed_precision_runs(dls):
    learn = _learner(dls, cbs=ReIDEvalCallback())
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.to_fp16()
        learn.fit(1, 0.01)
        learn.to_fp32()
        learn.to_bf16()
        learn.fit(1, 0.01)
    assert all(math.isfinite(v) for v in learn.recorder.values[-1][-5:])
    learn.model.to(torch.bfloat16)  # a model cast to half precision still gives float32 features
    f, _, _ = learn.reid_features(dls.query)
    assert f.dtype == torch.float32


def _titles(ax):
    "(pid, cam) from the title of an image of `show_ranked`"
    pid, cam = (int(v) for v in ax.get_title().replace('query', '').replace('pid ', '').replace('cam ', '').split())
    return pid, cam

def test_show_ranked(dls):
    learn = _learner(dls)
    fig = learn.show_ranked(n_queries=2, top_k=4)
    axs = fig.axes
    assert len(axs) == 2*5
    q, g = dls.query, dls.gallery
    for row in (axs[:5], axs[5:]):
        qpid, qcam = _titles(row[0])
        for ax in row[1:]:
            pid, cam = _titles(ax)
            colour = matplotlib.colors.to_hex(ax.spines['left'].get_edgecolor())
            assert colour == ('#008000' if pid == qpid else '#ff0000')
            assert pid != -1 and (pid, cam) != (qpid, qcam)
    # the whole gallery: exactly the images the protocol keeps for the query, nearest first, as the metrics rank them
    fig = learn.show_ranked(idxs=[0], top_k=len(g.items)+5)  # more than the gallery: shows what there is
    shown = [_titles(ax) for ax in fig.axes[1:] if ax.axison]
    gp, gc, qp, qc = g.pids.tolist(), g.camids.tolist(), int(q.pids[0]), int(q.camids[0])
    keep = [i for i in range(len(gp)) if gp[i] != -1 and (gp[i], gc[i]) != (qp, qc)]
    qf, _, _ = learn.reid_features(q); gf, _, _ = learn.reid_features(g)
    d = (1 - gf @ qf[0]).tolist()
    assert shown == [(gp[i], gc[i]) for i in sorted(keep, key=lambda i: (d[i], i))]
    assert len(fig.axes) == len(g.items)+1 and not any(ax.axison for ax in fig.axes[1+len(keep):])
    plt.close('all')


# ---------------------------------------------------------------- no validation set (valid_pct=0)
def _no_empty_warning(recwarn): return not [w for w in recwarn if 'generator is empty' in str(w.message)]

def test_empty_valid_is_skipped_quietly(dls, recwarn, capsys, tmp_path):
    assert len(dls.valid) == 0
    learn = reid_learner(dls, 'resnet18', pretrained=False, cbs=CSVLogger(fname=tmp_path/'log.csv'))  # with the progress table
    learn.fit(1, 0.01)
    assert _no_empty_warning(recwarn)
    assert list(learn.recorder.metric_names) == ['epoch', 'train_loss', 'time']
    assert all(len(v) == 1 and math.isfinite(v[0]) for v in learn.recorder.values)
    out = capsys.readouterr().out
    assert 'train_loss' in out and 'valid_loss' not in out and 'accuracy' not in out and 'None' not in out
    assert (tmp_path/'log.csv').read_text().splitlines()[0].split(',') == ['epoch', 'train_loss', 'time']
    learn.remove_cb(SkipEmptyValidCallback)  # what fastai does without it
    learn.fit(1, 0.01)
    assert not _no_empty_warning(recwarn)
    assert list(learn.recorder.metric_names) == ['epoch', 'train_loss', 'valid_loss', 'accuracy', 'time'] and list(learn.recorder.values[-1][1:]) == [None, None]

def test_empty_valid_keeps_reid_columns(dls, recwarn):
    learn = reid_learner(dls, 'resnet18', pretrained=False, cbs=ReIDEvalCallback())
    learn.recorder.train_metrics = True   # training columns of every metric, then the validation columns that can have a value
    learn.fit(1, 0.01)
    assert _no_empty_warning(recwarn)
    names = list(learn.recorder.metric_names)
    assert names == ['epoch', 'train_loss', 'train_accuracy', *[f'train_{n}' for n in reid_metric_names], *[f'valid_{n}' for n in reid_metric_names], 'time']
    v = learn.recorder.values[-1]
    assert len(v) == len(names)-2 and 0 <= v[1] <= 1 and all(math.isnan(x) for x in v[2:7])
    r = learn.reid_result
    assert list(v[-5:]) == pytest.approx([r.rank(1), r.rank(5), r.rank(10), r.mAP, r.mINP])

def test_valid_set_still_validated(df, recwarn):
    vdls = reid_dls(df, size=(32, 16), bs=16, sampler='pk', p=4, k=2, seed=0, valid_pct=0.25)
    assert len(vdls.valid) > 0
    learn = _learner(vdls, cbs=ReIDEvalCallback())
    learn.fit(1, 0.01)
    assert list(learn.recorder.metric_names) == ['epoch', 'train_loss', 'valid_loss', 'accuracy', *reid_metric_names, 'time']
    v = learn.recorder.values[-1]
    assert all(isinstance(x, float) and math.isfinite(x) for x in v)
    assert v[1] == pytest.approx(learn.validate()[0], rel=1e-5)   # the validation loss of the trained model


# ---------------------------------------------------------------- validate/get_preds also send before_fit, before_epoch, after_fit
def test_validation_leaves_callbacks_and_rng(dls, tmp_path):
    "`validate` and `get_preds` change neither the state of the callbacks that set up a fit nor the seeds; a quiet fit is still a fit"
    import random, numpy as np
    from fastreid_rollback.rollback import RollbackCallback, BlockGradStats, SeedEachEpoch
    torch.manual_seed(0)
    pre = save_backbone(create_reid_model('resnet18', n_ids=2), tmp_path/'pre.pth')
    rb,gs,seed,ev = RollbackCallback(n_periods=2),BlockGradStats(),SeedEachEpoch(3),ReIDEvalCallback()
    learn = reid_learner(dls, 'resnet18', pretrained=pre, cbs=[rb, gs, seed, ev])
    learn.remove_cb(ProgressCallback)
    learn.fit(2, 0.01)
    skip = learn.skip_empty_valid
    def state(): return (rb.events, len(rb.hist), gs.df.to_dict(), gs.rollback_epochs, skip.skip, list(skip.kept.attrgot('name')), list(ev.results),
                         learn.reid_result, learn.recorder.rollback_events, learn.recorder.block_grads.to_dict(), learn.recorder.rollback_epochs)
    def draws(f):
        set_seed(7); f()
        return torch.rand(3).tolist(), random.random(), np.random.rand()
    before = state()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # the empty validation set
        seeded = [draws(learn.validate), draws(lambda: learn.get_preds(dl=dls.query))]
        assert state() == before
        learn.remove_cb(seed)
        assert seeded == [draws(learn.validate), draws(lambda: learn.get_preds(dl=dls.query))]   # SeedEachEpoch did not reseed
    for quiet in (learn.no_logging, learn.no_mbar):
        cb = RollbackCallback(n_periods=2)
        with quiet(): learn.fit(2, 0.01, cbs=cb)
        assert [e['epoch'] for e in cb.events] == [1]

@pytest.mark.parametrize('kw, msg', [({'n_queries': 0}, 'n_queries'), ({'top_k': 0}, 'top_k'), ({'top_k': 2.5}, 'top_k')])
def test_show_ranked_checks_its_counts(dls, kw, msg):
    with pytest.raises(ValueError, match=msg): _learner(dls).show_ranked(**kw)

@pytest.mark.parametrize('kw, msg', [({'label_smoothing': 1.}, 'label_smoothing'), ({'label_smoothing': -0.1}, 'label_smoothing'),
                                     ({'loss': 'ce+triplet', 'triplet_margin': -0.3}, 'margin')])
def test_loss_options_checked(dls, kw, msg):
    with pytest.raises(ValueError, match=msg): reid_learner(dls, arch='resnet18', pretrained=False, **kw)
