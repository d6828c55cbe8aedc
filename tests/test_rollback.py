"Tests of `fastreid_rollback.rollback`: exact roll-backs, optimizer resets, LRs, resuming, wrappers, fp16, misuse"
import warnings
from functools import partial
import numpy as np, pytest, torch
from torch import nn
from fastcore.basics import even_mults
from fastai.callback.core import Callback
from fastai.callback.schedule import combined_cos
from fastai.callback.fp16 import MixedPrecision
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper
from fastreid_rollback.model import create_reid_model, block_state, block_modules, unwrap_model
from fastreid_rollback.rollback import *
from fastreid_rollback.test_utils import make_pretrained, tiny_dls, tiny_learner, StopAfter, StateProbe, assert_states_eq

torch.set_num_threads(1)  # the test machines are small and shared: OpenMP threads fighting for cores are much slower

BLOCKS = ['stem', 'layer1', 'layer2', 'layer3', 'layer4']

@pytest.fixture(scope='module')
def pre_fn(tmp_path_factory): return make_pretrained(tmp_path_factory.mktemp('pre')/'pretrained.pth')

def fit(learn, *args, **kwargs):
    with warnings.catch_warnings(), learn.no_bar():
        warnings.simplefilter('ignore')
        learn.fit(*args, **kwargs)

def probe_fit(learn, n, lr=0.01, **cb_kwargs):
    cb,pre,post = RollbackCallback(**cb_kwargs), StateProbe(RollbackCallback.order-1), StateProbe(RollbackCallback.order+1)
    fit(learn, n, lr, cbs=[cb, pre, post])
    return cb,pre,post

def check_rollback(learn, cb, pre, post, epoch, rolled, kept):
    "At `epoch`: rolled blocks == pre-trained exactly, kept blocks and head as just before"
    pretrained = unwrap_model(learn.model).pretrained_state
    before,after = pre.states[epoch],post.states[epoch]
    for n in rolled:
        assert_states_eq(after['blocks'][n], pretrained[n], n)
        assert not torch.equal(before['blocks'][n][next(k for k in pretrained[n] if 'running_mean' in k)],
                               pretrained[n][next(k for k in pretrained[n] if 'running_mean' in k)]), 'the block had trained'
    for n in kept: assert_states_eq(after['blocks'][n], before['blocks'][n], n)
    assert_states_eq(after['head'], before['head'], 'head')
    assert any(ev['epoch'] == epoch and ev['rolled_back'] == rolled and ev['kept'] == kept for ev in cb.events)

def test_rollback_exact_and_fresh_opt(pre_fn, tmp_path):
    learn = tiny_learner(pre_fn, tmp_path)
    cb,pre,post = probe_fit(learn, 6, n_periods=3)
    check_rollback(learn, cb, pre, post, 2, BLOCKS[1:], ['stem'])
    check_rollback(learn, cb, pre, post, 4, BLOCKS[2:], ['stem', 'layer1'])
    pt = learn.model.pretrained_state['layer2']
    assert pt['layer2.0.bn1.num_batches_tracked'] == 7
    assert_states_eq(post.states[4]['blocks']['layer2'], pt)
    # optimizer: momentum everywhere before, a fresh optimizer after (same flags and hyper-parameters)
    b,a = pre.states[2],post.states[2]
    assert all('grad_avg' in s for s in b['opt'].values())
    assert not any('grad_avg' in s for s in a['opt'].values())
    assert a['params'] == b['params']
    learn.create_opt()
    assert a['opt'] == {id(p):dict(learn.opt.state[p]) for p in learn.opt.all_params().itemgot(0)}
    assert [{k:v for k,v in h.items() if k != 'lr'} for h in a['hypers']] == [{k:v for k,v in h.items() if k != 'lr'} for h in b['hypers']]
    assert all(h['wd'] == 5e-4 and h['mom'] == 0.9 for h in a['hypers'])

def test_fresh_opt_wrapper(pre_fn, tmp_path):
    "A torch optimizer in an `OptimWrapper` is also rebuilt empty with its hyper-parameters"
    learn = tiny_learner(pre_fn, tmp_path, opt_func=partial(OptimWrapper, opt=partial(torch.optim.SGD, momentum=0.9, nesterov=True)))
    cb,pre,post = probe_fit(learn, 4, n_periods=2)
    check_rollback(learn, cb, pre, post, 2, BLOCKS[1:], ['stem'])
    assert len(learn.opt.opt.state) > 0
    h = learn.opt.hypers
    assert all(g['mom'] == 0.9 and g['nesterov'] and g['wd'] == 5e-4 for g in h)
    b,a = pre.states[2]['hypers'],post.states[2]['hypers']
    assert [{k:v for k,v in g.items() if k != 'lr'} for g in a] == [{k:v for k,v in g.items() if k != 'lr'} for g in b]

class OptProbe(Callback):
    "The optimizer's torch state just before/after the roll-back, for an `OptimWrapper`"
    def __init__(self, order): self.order,self.states = order,{}
    def before_train(self): self.states[self.epoch] = {id(p):{k:v.clone() for k,v in s.items()} for p,s in self.opt.opt.state.items()}

@pytest.mark.parametrize('wrapped', [False, True])
def test_partial_reset(pre_fn, tmp_path, wrapped):
    "reset_opt='rolled_back' forgets only the rolled-back parameters' momentum; False keeps everything"
    kw = dict(opt_func=partial(OptimWrapper, opt=partial(torch.optim.SGD, momentum=0.9))) if wrapped else {}
    learn = tiny_learner(pre_fn, tmp_path, **kw)
    m = learn.model
    rolled = {id(p) for n in BLOCKS[1:] for mod in block_modules(m, n) for p in mod.parameters()}
    pre,post = (OptProbe if wrapped else StateProbe)(RollbackCallback.order-1), (OptProbe if wrapped else StateProbe)(RollbackCallback.order+1)
    fit(learn, 4, 0.01, cbs=[RollbackCallback(n_periods=2, reset_opt='rolled_back'), pre, post])
    b,a = pre.states[2],post.states[2]
    if not wrapped: b,a = b['opt'],a['opt']
    key = 'momentum_buffer' if wrapped else 'grad_avg'
    assert all(key not in a.get(i, {}) for i in rolled)
    kept = [i for i in b if i not in rolled]
    assert len(kept) > 0
    for i in kept: assert torch.equal(a[i][key], b[i][key])
    if not wrapped:
        assert all(a[i] == {k:v for k,v in b[i].items() if k in ('do_wd', 'force_train')} for i in rolled)
        learn = tiny_learner(pre_fn, tmp_path)
        pre,post = StateProbe(RollbackCallback.order-1), StateProbe(RollbackCallback.order+1)
        fit(learn, 4, 0.01, cbs=[RollbackCallback(n_periods=2, reset_opt=False), pre, post])
        for i,s in pre.states[2]['opt'].items(): assert torch.equal(post.states[2]['opt'][i]['grad_avg'], s['grad_avg'])

def first_lrs(cb):
    "LR per group at the first batch of each epoch, as the optimizer held them"
    df = cb.lr_df.groupby('epoch').first()
    return df[BLOCKS+['head']].values

def test_lrs_step(pre_fn, tmp_path):
    learn = tiny_learner(pre_fn, tmp_path)
    cb = RollbackCallback(n_periods=3)
    fit(learn, 6, 0.01, cbs=cb)
    got = first_lrs(cb)
    exp = np.array([[.01]*5+[.1], [.001]*5+[.01],
                    [.001]+[.01]*5, [.0001]+[.001]*5,
                    [.001]*2+[.01]*4, [.0001]*2+[.001]*4])
    np.testing.assert_allclose(got, exp, rtol=1e-12)
    assert (cb.lr_df.groupby('epoch')[BLOCKS].nunique() == 1).all().all(), "'step' changes the LR only between epochs"
    assert learn.recorder.rollback_events == cb.events
    assert [e['epoch'] for e in cb.events] == [2, 4]

def test_lrs_step_odd_period_and_slice(pre_fn, tmp_path):
    learn = tiny_learner(pre_fn, tmp_path)
    cb = RollbackCallback(n_periods=2, kept_lr_mult=0.5, head_lr_mult=3.)
    fit(learn, 6, slice(1e-4, 1e-2), cbs=cb)
    base = np.array(even_mults(1e-4, 1e-2, 6))
    p0,p1 = base*[1,1,1,1,1,3.],base*[.5,1,1,1,1,1]
    np.testing.assert_allclose(first_lrs(cb), np.stack([p0, p0, p0/10, p1, p1, p1/10]), rtol=1e-12)

def test_step_mid_period_iterations(pre_fn, tmp_path):
    "'step' divides the LRs by 10 at half of the period's batches: inside the only epoch of a one-epoch period, inside the middle epoch of an odd one"
    learn = tiny_learner(pre_fn, tmp_path, data_seed=0)
    learn.dls = tiny_dls(tmp_path, n_train=32)             # 4 batches per epoch
    cb = RollbackCallback(n_periods=2)
    fit(learn, 2, 0.01, cbs=cb)                            # 2 periods of 1 epoch
    lrs = cb.lr_df[BLOCKS+['head']].values
    p0,p1 = np.array([.01]*5+[.1]), np.array([.001]+[.01]*5)
    np.testing.assert_allclose(lrs, np.stack([p0, p0, p0/10, p0/10, p1, p1, p1/10, p1/10]), rtol=1e-12)
    cb = RollbackCallback(n_periods=1)
    fit(learn, 3, 0.01, cbs=cb)                            # one period of 3 epochs x 4 batches: the step at batch 6 of 12
    got = cb.lr_df['stem'].values
    np.testing.assert_allclose(got, [.01]*6 + [.001]*6, rtol=1e-12)
    assert list(cb.lr_df.epoch[5:7]) == [1, 1]             # in the middle of epoch 1

def test_lrs_one_cycle(pre_fn, tmp_path):
    learn = tiny_learner(pre_fn, tmp_path)
    cb = RollbackCallback(n_periods=2, sched=one_cycle_sched(moms=(0.95, 0.85, 0.95)))
    fit(learn, 4, 0.02, cbs=cb)
    df = cb.lr_df
    n_iter = df.groupby('epoch')['iter'].max().iloc[0] + 1
    for period,lrs in enumerate([np.array([.02]*5+[.2]), np.array([.002]+[.02]*5)]):
        rows = df[df.epoch.isin([2*period, 2*period+1])]
        f = combined_cos(0.25, lrs/25, lrs, lrs/1e5)
        for _,r in rows.iterrows():
            pos = (r.epoch - 2*period + r.iter/n_iter)/2
            np.testing.assert_allclose(r[BLOCKS+['head']].values.astype(float), f(pos), rtol=1e-12)
        np.testing.assert_allclose(rows.iloc[0][BLOCKS+['head']].values.astype(float), lrs/25, rtol=1e-12)
    np.testing.assert_allclose(learn.opt.hypers[0]['mom'], combined_cos(0.25, .95, .85, .95)((1 + (n_iter-1)/n_iter)/2))

class MomProbe(Callback):
    "The momentum of the first parameter group at each training batch, after `RollbackCallback` set it"
    order,run_valid = RollbackCallback.order+1,False
    def before_fit(self): self.moms = []
    def before_batch(self): self.moms.append(self.opt.hypers[0]['mom'])

def test_one_cycle_sched_same_lrs_as_the_old_keywords(pre_fn, tmp_path):
    "`sched=one_cycle_sched(...)` sets the LRs and momentums the removed keywords `pct_start, div, div_final, moms` set"
    learn,probe = tiny_learner(pre_fn, tmp_path),MomProbe()
    cb = RollbackCallback(n_periods=2, sched=one_cycle_sched(pct_start=0.3, div=10., div_final=1e4, moms=(0.9, 0.8, 0.9)))
    fit(learn, 4, slice(1e-3, 2e-2), cbs=[cb, probe])
    # recorded before the change with `RollbackCallback(n_periods=2, sched='one_cycle', pct_start=0.3, div=10., div_final=1e4, moms=(0.9, 0.8, 0.9))`
    stem_head = [[0.0001, 0.02], [0.0009397114176589831, 0.18794228353179662], [0.0008117637473515666, 0.16235274947031333],
                 [0.00028312983667765665, 0.056625967335531296], [1e-05, 0.002], [9.397114176589832e-05, 0.018794228353179662],
                 [8.117637473515667e-05, 0.016235274947031333], [2.831298366776566e-05, 0.00566259673355313]]
    moms = [0.9, 0.8066987313712242, 0.8188255078156249, 0.8716941857508095]*2
    assert cb.lr_df[['stem', 'head']].values.tolist() == stem_head
    assert probe.moms == moms
    with pytest.raises(TypeError, match='pct_start'): RollbackCallback(sched='one_cycle', pct_start=0.3)
    with pytest.raises(TypeError, match='moms'): RollbackCallback(moms=(0.95, 0.85, 0.95))

def test_custom_sched(pre_fn, tmp_path):
    from fastai.callback.schedule import SchedLin
    learn = tiny_learner(pre_fn, tmp_path)
    cb = RollbackCallback(n_periods=2, sched=lambda lrs: SchedLin(lrs, lrs/2))
    fit(learn, 2, 0.01, cbs=cb)
    np.testing.assert_allclose(first_lrs(cb), [[.01]*5+[.1], [.001]+[.01]*5], rtol=1e-12)

def test_control_restores_nothing(pre_fn, tmp_path):
    "restore=False: the same schedule, LRs, events and optimizer resets as rolling back, but the weights run on across the boundary"
    runs = {}
    for restore in (True, False):
        learn = tiny_learner(pre_fn, tmp_path)
        cb,pre,post = probe_fit(learn, 6, n_periods=3, restore=restore)
        runs[restore] = (learn, cb, pre, post)
    learn,cb,pre,post = runs[False]
    for e in (2, 4):
        b,a = pre.states[e],post.states[e]
        for n in BLOCKS: assert_states_eq(a['blocks'][n], b['blocks'][n], n)          # nothing copied
        assert all('grad_avg' in s for s in b['opt'].values()) and not any('grad_avg' in s for s in a['opt'].values())
    assert not torch.equal(post.states[2]['blocks']['layer4']['layer4.0.bn1.running_mean'],
                           learn.model.pretrained_state['layer4']['layer4.0.bn1.running_mean'])
    ref = runs[True][1]
    assert [{k:v for k,v in e.items() if k != 'restored'} for e in cb.events] == [{k:v for k,v in e.items() if k != 'restored'} for e in ref.events]
    assert [e['restored'] for e in cb.events] == [False, False] and [e['restored'] for e in ref.events] == [True, True]
    assert cb.lr_df.equals(ref.lr_df)
    check_rollback(runs[True][0], ref, runs[True][2], runs[True][3], 2, BLOCKS[1:], ['stem'])
    # the control needs no pre-trained state
    learn = tiny_learner(pre_fn, tmp_path)
    learn.model.pretrained_state = None
    fit(learn, 2, 0.01, cbs=RollbackCallback(n_periods=2, restore=False))

@pytest.fixture(scope='module')
def reference_run(pre_fn, tmp_path_factory):
    "Final weights of the uninterrupted run: 2 periods of 2 epochs, each epoch seeded"
    ref = tiny_learner(pre_fn, tmp_path_factory.mktemp('ref'))
    fit(ref, 4, 0.01, cbs=[RollbackCallback(n_periods=2), SeedEachEpoch(42)])
    return ref.model.state_dict()

def interrupted(pre_fn, path, k):
    "A fresh learner loaded with the checkpoint of a run interrupted after epoch `k`"
    run = tiny_learner(pre_fn, path)
    fit(run, 4, 0.01, cbs=[RollbackCallback(n_periods=2), SeedEachEpoch(42), StopAfter(k)])
    run.save(f'ck{k}')
    res = tiny_learner(pre_fn, path, seed=1)  # a fresh learner: another head init, same pre-trained file
    res.load(f'ck{k}')
    return res

@pytest.mark.parametrize('k', [1, 2, 3])
def test_resume_bitwise(pre_fn, tmp_path, reference_run, k):
    "Interrupt after epoch k, save, rebuild, load, resume with start_epoch=k: same weights as an uninterrupted run"
    res = interrupted(pre_fn, tmp_path, k)
    cb,post = RollbackCallback(n_periods=2), StateProbe(RollbackCallback.order+1)
    fit(res, 4, 0.01, cbs=[cb, SeedEachEpoch(42), post], start_epoch=k)
    sd = res.model.state_dict()
    for key in reference_run: assert torch.equal(reference_run[key], sd[key]), key
    assert [e['epoch'] for e in cb.events] == ([] if k > 2 else [2])
    if k == 2:  # resumed exactly at the boundary: rolled back to the *pre-trained* weights, not the resumed ones
        for n in BLOCKS[1:]: assert_states_eq(post.states[2]['blocks'][n], res.model.pretrained_state[n], n)

def test_resume_needs_pretrained_snapshot(pre_fn, tmp_path, reference_run):
    "Control: rolling back to the weights at the moment of resuming gives other weights (the test above can fail)"
    res = interrupted(pre_fn, tmp_path, 2)
    wrong = {n:block_state(res.model, n) for n in BLOCKS}
    fit(res, 4, 0.01, cbs=[RollbackCallback(n_periods=2, pretrained_state=wrong), SeedEachEpoch(42)], start_epoch=2)
    assert not all(torch.equal(v, res.model.state_dict()[k]) for k,v in reference_run.items())

def test_seed_each_epoch(pre_fn, tmp_path):
    "Two runs with the same seed agree bitwise, another seed differs"
    a,b,c = [tiny_learner(pre_fn, tmp_path, seed=s) for s in (0, 0, 0)]
    for l,s in ((a, 3), (b, 3), (c, 4)): fit(l, 2, 0.01, cbs=[RollbackCallback(n_periods=2), SeedEachEpoch(s)])
    va,vb,vc = [torch.cat([p.flatten() for p in l.model.parameters()]) for l in (a, b, c)]
    assert torch.equal(va, vb) and not torch.equal(va, vc)

class TrainBatches(Callback):
    "Record an identifying value of each training sample, per epoch"
    def before_fit(self): self.seen = {}
    def after_batch(self):
        if self.training: self.seen.setdefault(self.epoch, []).extend(self.xb[0].flatten(1)[:, 0].tolist())

def test_seed_each_epoch_under_distributed_dl(pre_fn, tmp_path):
    "Under fastai's DistributedDL (as with several GPUs) a resumed run still sees the uninterrupted run's batches"
    try: from fastai.distributed import DistributedDL
    except (ImportError, NameError): pytest.skip("this fastai cannot import fastai.distributed without Accelerate ('distributed' extra)")
    class OneRankDistributedDL(DistributedDL):
        "fastai's `DistributedDL` on one rank without a process group (its broadcast needs CUDA and NCCL)"
        def _broadcast(self, t, rank): return list(t)
    def seen(start_epoch):
        learn = tiny_learner(pre_fn, tmp_path)
        learn.dls.loaders[0] = OneRankDistributedDL(learn.dls.train, rank=0, world_size=1)
        rec = TrainBatches()
        fit(learn, 3, 0.01, cbs=[SeedEachEpoch(5), rec], start_epoch=start_epoch)
        return rec.seen
    full, resumed = seen(0), seen(2)
    assert list(resumed) == [2] and resumed[2] == full[2]
    assert sorted(full[1]) == sorted(full[2]) and full[1] != full[2]     # shuffled: the check above can fail

def test_wrapped_syncbn_dataparallel(pre_fn, tmp_path):
    "BatchNorms converted to SyncBatchNorm, model in DataParallel (CPU, no process group): exact roll-back"
    wrap = lambda m: nn.DataParallel(nn.SyncBatchNorm.convert_sync_batchnorm(m))
    learn = tiny_learner(pre_fn, tmp_path, wrap=wrap)
    assert any(isinstance(mod, nn.SyncBatchNorm) for mod in learn.model.modules())
    cb,pre,post = probe_fit(learn, 4, n_periods=2)
    check_rollback(learn, cb, pre, post, 2, BLOCKS[1:], ['stem'])
    assert {id(p) for p in learn.opt.all_params().itemgot(0)} == {id(p) for p in learn.model.parameters()}

def test_fp16(pre_fn, tmp_path):
    "Under `learn.to_fp16()` (on a CPU machine fastai's AMP is disabled with a warning) the roll-back stays exact"
    learn = tiny_learner(pre_fn, tmp_path).to_fp16()
    gs = BlockGradStats()
    cb,pre,post = RollbackCallback(n_periods=2), StateProbe(RollbackCallback.order-1), StateProbe(RollbackCallback.order+1)
    fit(learn, 4, 0.01, cbs=[cb, pre, post, gs])
    check_rollback(learn, cb, pre, post, 2, BLOCKS[1:], ['stem'])
    assert gs.df.shape == (4, 6) and np.isfinite(gs.df.values).all() and (gs.df.values > 0).all()

class CPUScaler(Callback):
    "Give fastai's `MixedPrecision` a real, enabled CPU `GradScaler` (its own is for CUDA and disables itself here)"
    order = MixedPrecision.order + 0.5
    def before_fit(self): self.learn.scaler,self.scales = torch.amp.GradScaler('cpu', init_scale=2.**10),[]
    def before_step(self): self.scales.append(self.scaler.get_scale())

def test_block_grad_stats_unscaled(pre_fn, tmp_path):
    "Under MixedPrecision with a real loss scale of 2**10, BlockGradStats reads the unscaled gradients"
    res = []
    for extra in ([], [CPUScaler()]):
        learn = tiny_learner(pre_fn, tmp_path)
        if extra: learn.to_fp16()
        gs = BlockGradStats()
        fit(learn, 2, 0.01, cbs=[RollbackCallback(n_periods=2), SeedEachEpoch(0), gs] + extra)
        if extra: assert extra[0].scales == [2.**10]*4, 'every step ran with the loss scaled by 2**10'
        res.append(gs.df.values)
    np.testing.assert_allclose(res[1], res[0], rtol=1e-5)

class GradProbe(Callback):
    "Mean squared gradient per block, computed independently, at `after_step`"
    order = 99
    def before_fit(self): self.rows = {}
    def after_step(self):
        m = self.model
        groups = [[p for mod in block_modules(m, n) for p in mod.parameters()] for n in BLOCKS]
        inb = {id(p) for g in groups for p in g}
        groups.append([p for p in m.parameters() if id(p) not in inb])
        v = [sum(float((p.grad.double()**2).sum()) for p in g)/sum(p.numel() for p in g) for g in groups]
        self.rows.setdefault(self.epoch, []).append(v)

class RelGradProbe(GradProbe):
    "Gradient norm over weight norm per block, computed independently, at `before_step` (the weights the gradients are for)"
    def before_step(self):
        m = self.model
        groups = [[p for mod in block_modules(m, n) for p in mod.parameters()] for n in BLOCKS]
        inb = {id(p) for g in groups for p in g}
        groups.append([p for p in m.parameters() if id(p) not in inb])
        norm = lambda ts: sum(float((t.double()**2).sum()) for t in ts)**0.5
        self.rows.setdefault(self.epoch, []).append([norm([p.grad for p in g])/norm(g) for g in groups])
    def after_step(self): pass

def test_block_grad_stats(pre_fn, tmp_path):
    learn = tiny_learner(pre_fn, tmp_path)
    gs,gp = BlockGradStats(), GradProbe()
    fit(learn, 4, 0.01, cbs=[RollbackCallback(n_periods=2), gs, gp])
    exp = np.array([np.mean(gp.rows[e], axis=0) for e in range(4)])
    np.testing.assert_allclose(gs.df.values, exp, rtol=1e-4)
    assert list(gs.df.columns) == BLOCKS+['head'] and gs.rollback_epochs == [2]
    assert learn.recorder.rollback_epochs == [2] and learn.recorder.block_grads.equals(gs.df)
    ax = learn.recorder.plot_block_grads()
    assert ax.get_yscale() == 'log' and [l.get_xdata()[0] for l in ax.get_lines() if l.get_label() == 'roll-back'] == [1.5]
    ax = learn.recorder.plot_group_lrs()
    assert ax.get_yscale() == 'log'

def test_block_grad_stats_relative(pre_fn, tmp_path):
    "The size-fair measure: per block, the mean over the epoch's steps of ||g|| / ||w||"
    learn = tiny_learner(pre_fn, tmp_path)
    gs,gp = BlockGradStats(), RelGradProbe()
    fit(learn, 4, 0.01, cbs=[RollbackCallback(n_periods=2), gs, gp])
    exp = np.array([np.mean(gp.rows[e], axis=0) for e in range(4)])
    np.testing.assert_allclose(gs.rel_df.values, exp, rtol=1e-4)
    assert list(gs.rel_df.columns) == BLOCKS+['head'] and list(gs.rel_df.index) == [0, 1, 2, 3]

def test_pretrained_state_given(pre_fn, tmp_path):
    "A state dict or a file (block states or backbone state dict) overrides the model's pre-trained state"
    other = make_pretrained(tmp_path/'other.pth', seed=1)
    m1 = create_reid_model('resnet18', n_ids=4, pretrained=other)
    torch.save(m1.pretrained_state, tmp_path/'blocks.pth')
    learn = tiny_learner(pre_fn, tmp_path)
    cb,pre,post = probe_fit(learn, 2, n_periods=2, pretrained_state=other)
    for n in BLOCKS[1:]: assert_states_eq(post.states[1]['blocks'][n], m1.pretrained_state[n], n)
    for src in (m1.pretrained_state, tmp_path/'blocks.pth', str(other)):
        cb = RollbackCallback(n_periods=2, pretrained_state=src)
        with learn.added_cbs(cb):
            learn.n_epoch = 2
            cb('before_fit')
        assert sorted(cb.snapshot) == BLOCKS[1:]
        for n in BLOCKS[1:]: assert_states_eq(cb.snapshot[n], m1.pretrained_state[n], n)
        assert all(v.device.type == 'cpu' for s in cb.snapshot.values() for v in s.values())

def test_fit_rollback(pre_fn, tmp_path):
    learn = tiny_learner(pre_fn, tmp_path)
    pre,post = StateProbe(RollbackCallback.order-1), StateProbe(RollbackCallback.order+1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit_rollback(1, n_periods=3, keep=[['stem', 'layer1'], ['stem', 'layer1', 'layer2', 'layer3']], cbs=[pre, post])
    assert learn.epoch == 2
    ev = learn.recorder.rollback_events
    assert [(e['epoch'], e['rolled_back']) for e in ev] == [(1, ['layer2', 'layer3', 'layer4']), (2, ['layer4'])]
    for n in ['layer2', 'layer3', 'layer4']: assert_states_eq(post.states[1]['blocks'][n], learn.model.pretrained_state[n], n)
    np.testing.assert_allclose(learn.recorder.group_lrs.groupby('epoch').first()[BLOCKS+['head']].values,
                               [[.01]*5+[.1], [.001]*2+[.01]*4, [.001]*4+[.01]*2], rtol=1e-12)

def bad_fit(learn, exc, msg, n=4, **kw):
    "The fit fails with `exc` naming `msg`, before any weight changed"
    sd = {k:v.clone() for k,v in learn.model.state_dict().items()}
    with pytest.raises(exc, match=msg), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.fit(n, 0.01, **kw)
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k,v in sd.items())

def test_misuse(pre_fn, tmp_path):
    learn = tiny_learner(pre_fn, tmp_path)
    bad_fit(learn, ValueError, "block 'conv9'", cbs=RollbackCallback(keep=[['stem'], ['conv9'], ['stem']]))
    bad_fit(learn, ValueError, 'more periods than the 3 epochs', n=3, cbs=RollbackCallback())
    bad_fit(learn, ValueError, 'cannot be split evenly', n=6, cbs=RollbackCallback())
    bad_fit(learn, ValueError, 'but the fit has 4', cbs=RollbackCallback(epochs_per_period=2))
    with pytest.raises(ValueError, match='remove the ParamScheduler'), warnings.catch_warnings():
        warnings.simplefilter('ignore'); learn.fit_one_cycle(4, cbs=RollbackCallback())
    bad_fit(learn, FileNotFoundError, 'nope.pth', cbs=RollbackCallback(pretrained_state=tmp_path/'nope.pth'))
    bad_fit(learn, ValueError, r"no block\(s\) \['layer4'\]", cbs=RollbackCallback(pretrained_state={n:learn.model.pretrained_state[n] for n in BLOCKS[:4]}))
    wrong = {n:dict(s) for n,s in learn.model.pretrained_state.items()}
    wrong['layer3'] = {k:v[:1] if v.ndim else v for k,v in wrong['layer3'].items()}
    bad_fit(learn, ValueError, "block 'layer3' does not fit", cbs=RollbackCallback(pretrained_state=wrong))
    learn.model.pretrained_state = None
    bad_fit(learn, ValueError, 'no pre-trained state', cbs=RollbackCallback())
    plain = tiny_learner(pre_fn, tmp_path)
    plain.splitter = lambda m: [list(m.parameters())]
    plain.opt = None
    bad_fit(plain, ValueError, 'splitter=reid_splitter', cbs=RollbackCallback())
    nob = Learner(tiny_dls(tmp_path), nn.Sequential(nn.Flatten(), nn.Linear(3*32*16, 4)), loss_func=nn.CrossEntropyLoss())
    bad_fit(nob, ValueError, 'expected a ReIDModel', cbs=RollbackCallback())
    bad_fit(tiny_learner(pre_fn, tmp_path), ValueError, 'at most 5 periods', n=6, cbs=RollbackCallback(n_periods=6))
    for kw,msg in [(dict(keep=[['stem']]), 'keep has 1 entries'), (dict(sched='cos'), 'sched='),
                   (dict(reset_opt='all'), 'reset_opt='), (dict(n_periods=0), 'n_periods='),
                   (dict(epochs_per_period=0), 'epochs_per_period=')]:
        with pytest.raises(ValueError, match=msg): RollbackCallback(**kw)

def test_reid_learner_integration(pre_fn, tmp_path):
    "With the package's `reid_learner` (reference SGD in an `OptimWrapper`, ReIDLoss, metrics): fit_rollback runs and resets torch SGD"
    from fastreid_rollback.learner import reid_learner
    dls = tiny_dls(tmp_path)
    learn = reid_learner(dls, arch='resnet18', pretrained=pre_fn, path=tmp_path)
    pre,post = StateProbe(RollbackCallback.order-1), StateProbe(RollbackCallback.order+1)
    with warnings.catch_warnings(), learn.no_bar(), learn.no_logging():
        warnings.simplefilter('ignore')
        learn.fit_rollback(1, n_periods=2, cbs=[pre, post])
    assert [e['epoch'] for e in learn.recorder.rollback_events] == [1]
    for n in BLOCKS[1:]: assert_states_eq(post.states[1]['blocks'][n], learn.model.pretrained_state[n], n)
    opt = learn.opt.opt
    assert isinstance(opt, torch.optim.SGD) and all(g['nesterov'] and g['momentum'] == 0.9 and g['weight_decay'] == 5e-4 for g in opt.param_groups)
    np.testing.assert_allclose([g['lr'] for g in opt.param_groups], [.0001]+[.001]*5)   # period 2's LRs after its mid-epoch step

class PredsEachEpoch(Callback):
    "Call `learn.get_preds` (a validation context: it sends before_fit/before_epoch/after_fit to every callback) after each epoch"
    busy = False
    def after_epoch(self):
        if self.busy: return  # get_preds itself sends after_epoch
        self.busy = True
        try: self.learn.get_preds()
        finally: self.busy = False

def test_validation_inside_and_after_fit(pre_fn, tmp_path):
    "get_preds during the fit and validate after it, with the callbacks attached to the Learner, change nothing"
    learn = tiny_learner(pre_fn, tmp_path)
    cb,gs = RollbackCallback(n_periods=2),BlockGradStats()
    learn.add_cbs([cb, gs, SeedEachEpoch(0)])
    fit(learn, 2, 0.01, cbs=PredsEachEpoch())
    ref = tiny_learner(pre_fn, tmp_path)
    fit(ref, 2, 0.01, cbs=[RollbackCallback(n_periods=2), BlockGradStats(), SeedEachEpoch(0)])
    assert all(torch.equal(v, ref.model.state_dict()[k]) for k,v in learn.model.state_dict().items())
    assert [e['epoch'] for e in cb.events] == [1] and gs.df.shape == (2, 6) and len(cb.hist) == 2*len(learn.dls.train)
    sd = {k:v.clone() for k,v in learn.model.state_dict().items()}
    events = list(cb.events)
    learn.epoch = 1
    with warnings.catch_warnings(), learn.no_bar():
        warnings.simplefilter('ignore')
        learn.validate()
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k,v in sd.items())
    assert cb.events == events and gs.df.shape == (2, 6)
