"`RollbackCallback` under DistributedDataParallel: 2 CPU ranks on a gloo process group"
import warnings
import pytest, torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from fastai.callback.core import Callback
from fastreid_rollback.model import block_state, unwrap_model
from fastreid_rollback.rollback import RollbackCallback, BlockGradStats
from test_rollback import BLOCKS, Probe, make_pretrained, make_learner, fit, assert_states_eq

class WrapDDP(Callback):
    "Wrap the model in `DistributedDataParallel` for the fit, as fastai's `DistributedTrainer` does (order 11)"
    order = 11
    def __init__(self, sync_bn=False): self.sync_bn = sync_bn
    def before_fit(self):
        m = nn.SyncBatchNorm.convert_sync_batchnorm(self.model) if self.sync_bn else self.model
        self.learn.model = DDP(m)
    def after_fit(self): self.learn.model = self.model.module

def gather(x):
    "`x` from every rank"
    res = [None]*dist.get_world_size()
    dist.all_gather_object(res, x)
    return res

def flat(sd): return torch.cat([v.detach().double().flatten() for v in sd.values()])

def check_training(rank, pre_fn, path):
    "Each rank trains on its own data; after the fit every rank has rolled back at epoch 2 and holds the same weights"
    learn = make_learner(pre_fn, path, data_seed=rank)
    cb,post,gs = RollbackCallback(n_periods=2), Probe(RollbackCallback.order+1), BlockGradStats()
    fit(learn, 4, 0.01, cbs=[cb, WrapDDP(), post, gs])
    assert not isinstance(learn.model, DDP)
    evs = gather([(e['epoch'], e['rolled_back']) for e in cb.events])
    assert evs[0] == evs[1] == [(2, BLOCKS[1:])]
    for n in BLOCKS[1:]: assert_states_eq(post.states[2]['blocks'][n], learn.model.pretrained_state[n], n)
    right_after = gather(flat({f'{n}.{k}':v for n,s in post.states[2]['blocks'].items() for k,v in s.items()}))
    assert torch.equal(right_after[0], right_after[1])
    final = gather(flat(learn.model.state_dict()))
    assert torch.equal(final[0], final[1])
    grads = gather(gs.df.values.tolist())
    assert grads[0] == grads[1], 'gradients are averaged over the ranks before BlockGradStats reads them'
    data = gather(float(learn.dls.train.one_batch()[0].sum()))
    assert data[0] != data[1], 'the ranks saw different data'

def check_syncbn(rank, pre_fn, path):
    "SyncBatchNorm in the process group: the roll-back copies the pre-trained state exactly; DDP training if torch allows it on CPU"
    learn = make_learner(pre_fn, path, data_seed=rank)
    learn.model = nn.SyncBatchNorm.convert_sync_batchnorm(learn.model)
    assert any(isinstance(m, nn.SyncBatchNorm) for m in learn.model.modules())
    learn.create_opt()
    cb = RollbackCallback(n_periods=2)
    with learn.added_cbs(cb):
        learn.n_epoch,learn.epoch,learn.train_iter = 4,2,0
        cb('before_fit')
        m = unwrap_model(learn.model)
        with torch.no_grad():
            for t in list(m.parameters()) + list(m.buffers()): t.add_(1)
        before = {n:block_state(m, n) for n in BLOCKS}
        head = {k:v.clone() for k,v in m.head.state_dict().items()}
        cb.roll_back(1)
    for n in BLOCKS[1:]: assert_states_eq(block_state(m, n), m.pretrained_state[n], n)
    assert_states_eq(block_state(m, 'stem'), before['stem'], 'stem')
    assert_states_eq(m.head.state_dict(), head, 'head')
    assert {id(p) for p in learn.opt.all_params().itemgot(0)} == {id(p) for p in m.parameters()}
    assert all(isinstance(mod, nn.SyncBatchNorm) for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm))
    try: DDP(learn.model)
    except ValueError as e:  # torch 2.x: "SyncBatchNorm layers only work with GPU modules"
        if 'GPU' not in str(e): raise
        return
    learn = make_learner(pre_fn, path, data_seed=rank)
    fit(learn, 2, 0.01, cbs=[RollbackCallback(n_periods=2), WrapDDP(sync_bn=True)])
    assert torch.equal(*gather(flat(learn.model.state_dict())))

def worker(rank, world, init_file, pre_fn, path):
    torch.set_num_threads(1)
    warnings.simplefilter('ignore')
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    try:
        check_training(rank, pre_fn, path)
        check_syncbn(rank, pre_fn, path)
    finally: dist.destroy_process_group()

@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason='needs torch.distributed with gloo')
def test_ddp_two_ranks(tmp_path):
    pre_fn = make_pretrained(tmp_path/'pretrained.pth')
    mp.spawn(worker, args=(2, str(tmp_path/'init'), str(pre_fn), str(tmp_path)), nprocs=2, join=True)
