"""Multi-process training with rolling back, for real: two gloo processes on the CPU, launched as `torchrun` launches
them, each training a `reid_learner` on the embedded dataset through `train_reid`; every rank reports what it held to a
file, and the parent checks the ranks against each other, against the pre-trained weights and against one process."""
import hashlib, os, shutil, signal, socket, subprocess, sys, time, warnings, json
from pathlib import Path
import pytest, torch
from torch import nn
import torch.distributed as dist
import torch.multiprocessing as mp
from fastai.callback.core import Callback
from fastreid_rollback.synthetic import synthetic_reid
from fastreid_rollback.data import market1501, reid_dls
from fastreid_rollback.model import create_reid_model, save_backbone, block_state, unwrap_model
from fastreid_rollback.learner import reid_learner
from fastreid_rollback.rollback import RollbackCallback
from fastreid_rollback.experiment import train_reid, read_checkpoint, load_checkpoint
from fastreid_rollback.distributed import on_rank0_first

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason='needs torch.distributed with gloo')
torch.set_num_threads(1)  # as each rank: one process evaluating the same weights must compute the same features
WORLD, TIMEOUT = 2, 240   # seconds before a rank that has not finished is taken for hung and killed
SETTINGS = dict(arch='resnet18', n_periods=3, epochs_per_period=1, seed=0, checkpoint_every=1)

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def digest(tensors):
    "SHA-256 of the bytes of `tensors` in order: equal digests mean bitwise-equal tensors"
    h = hashlib.sha256()
    for t in tensors: h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()

def state_digest(sd:dict): return digest(sd.values())

def make_dls(root): return reid_dls(market1501(root), size=(64, 32), bs=8, seed=0)

@pytest.fixture(scope='module')
def data(tmp_path_factory):
    "The embedded dataset (8 training identities x 3 cameras x 2 images = 48 training images) and a 'pre-trained' backbone"
    tmp = tmp_path_factory.mktemp('ddp')
    root = synthetic_reid(tmp/'syn', n_ids=16, n_cams=3, imgs_per_id_cam=2, n_distractors=2, n_junk=2)
    torch.manual_seed(0)
    return root, save_backbone(create_reid_model('resnet18', n_ids=2), tmp/'resnet18.pth')

# --- running ranks -----------------------------------------------------------------------------------------------

def launched(rank, port, fn, *args):
    "Run `fn(rank, *args)` in a process placed in the environment as `torchrun` places it"
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    warnings.simplefilter('ignore')
    try: fn(rank, *args)
    finally:
        if dist.is_initialized(): dist.destroy_process_group()

def run_ranks(fn, *args, timeout=TIMEOUT):
    "Run `fn(rank, *args)` on `WORLD` processes: a rank that raises fails the test, ranks still running after `timeout` s are killed"
    ctx = mp.start_processes(launched, args=(free_port(), fn, *args), nprocs=WORLD, join=False, start_method='spawn')
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes: p.kill()
            pytest.fail(f'the ranks had not finished after {timeout} s: one of them hung')

class FileWrites:
    "What this process does to files in `folder`, seen by an audit hook: files opened for writing, renames"
    def __init__(self, folder): self.folder,self.events = str(folder),[]; sys.addaudithook(self)
    def __call__(self, event, args):
        if event == 'open' and isinstance(args[0], str) and args[0].startswith(self.folder) and args[2] & (os.O_WRONLY | os.O_RDWR):
            self.events.append(('write', Path(args[0]).name))
        elif event == 'os.rename' and str(args[1]).startswith(self.folder): self.events.append(('rename', Path(args[0]).name, Path(args[1]).name))

class Probe(Callback):
    "What one rank holds: the weights after every optimizer step, the model after every roll-back and every epoch, its batches"
    order = 20  # after RollbackCallback (5) rolls back and DDPTrainer (11) shares the BatchNorm statistics
    def before_fit(self): self.steps,self.rollbacks,self.epochs,self.shards = [],{},{},{}
    def after_step(self): self.steps.append(digest(unwrap_model(self.model).parameters()))
    def before_train(self):
        ev = next(cb for cb in self.learn.cbs if isinstance(cb, RollbackCallback)).events
        if ev and ev[-1]['epoch'] == self.epoch:
            m = unwrap_model(self.model)
            self.rollbacks[self.epoch] = dict(model=state_digest(m.state_dict()),
                                              blocks={n:state_digest(block_state(m, n)) for n in ev[-1]['rolled_back']})
    def after_train(self):
        self.epochs[self.epoch] = state_digest(unwrap_model(self.model).state_dict())
        self.shards[self.epoch] = list(self.dl.shard)
    def record(self): return dict(steps=self.steps, rollbacks=self.rollbacks, epochs=self.epochs, shards=self.shards)

def train_ranks(rank, root, pre, tmp):
    "One rank: data made by the first rank, a rolling-back run with checkpoints, the same run resumed from its end of period 1, SyncBatchNorm refused"
    tmp = Path(tmp)
    made = FileWrites(tmp/'made')
    small = on_rank0_first(synthetic_reid, tmp/'made', n_ids=4, n_cams=2, imgs_per_id_cam=1, n_distractors=1, n_junk=1)
    writes, dls = FileWrites(tmp/'full'/'checkpoints'), make_dls(root)
    probe = Probe()
    run = train_reid(dls, pretrained=pre, out=tmp/'full', cbs=[probe], **SETTINGS)
    rec = dict(made=(str(small), made.events), full=probe.record(), result=run.result.as_dict(), grads=run.grads.df.values.tolist(), writes=writes.events,
               rollback_epochs=run.rollback_epochs, final=state_digest(unwrap_model(run.learn.model).state_dict()))
    if rank == 0:
        (tmp/'resumed'/'checkpoints').mkdir(parents=True)
        shutil.copy(tmp/'full'/'checkpoints'/'period1.pth', tmp/'resumed'/'checkpoints'/'last.pth')
    dist.barrier()
    probe = Probe()
    run = train_reid(dls, pretrained=pre, out=tmp/'resumed', resume=True, cbs=[probe], **SETTINGS)
    rec.update(resumed=probe.record(), resumed_final=state_digest(unwrap_model(run.learn.model).state_dict()))
    learn = reid_learner(dls, arch='resnet18', pretrained=pre)
    try:
        with learn.ddp_ctx(sync_bn=True): learn.fit(1)
    except ValueError as e: rec['sync_bn_error'] = str(e)
    torch.save(rec, tmp/f'rank{rank}.pt')

# --- the checks ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def ranks(data, tmp_path_factory):
    "The records of the two ranks"
    tmp = tmp_path_factory.mktemp('ranks')
    run_ranks(train_ranks, str(data[0]), str(data[1]), str(tmp))
    return tmp, [torch.load(tmp/f'rank{r}.pt', weights_only=False) for r in range(WORLD)]

def test_ranks_agree_after_every_step(ranks):
    _,(r0,r1) = ranks
    assert len(r0['full']['steps']) == 3*3, 'per epoch each rank takes 48 images / (8 per batch x 2 ranks) = 3 steps'
    assert r0['full']['steps'] == r1['full']['steps']
    assert len(set(r0['full']['steps'])) == 9, 'the weights change at every step'
    assert r0['full']['epochs'] == r1['full']['epochs'], 'after every epoch the whole state (BatchNorm statistics too) agrees'
    assert r0['grads'] == r1['grads'], 'BlockGradStats reads gradients already averaged over the ranks'
    assert r0['final'] == r1['final']

def test_rollbacks_exact_on_every_rank(ranks, data):
    _,(r0,r1) = ranks
    pretrained = create_reid_model('resnet18', n_ids=2, pretrained=data[1]).pretrained_state
    for r in (r0, r1): assert r['rollback_epochs'] == [1, 2]
    for run in ('full', 'resumed'):
        rb0,rb1 = r0[run]['rollbacks'],r1[run]['rollbacks']
        assert sorted(rb0) == sorted(rb1) == [1, 2]
        for e in (1, 2):
            assert rb0[e] == rb1[e], f'{run}: the ranks hold the same model right after the roll-back of epoch {e}'
            rolled = ['layer1', 'layer2', 'layer3', 'layer4'] if e == 1 else ['layer2', 'layer3', 'layer4']
            assert sorted(rb0[e]['blocks']) == rolled
            for n in rolled: assert rb0[e]['blocks'][n] == state_digest(pretrained[n]), f'{run}: {n} (weights and BN buffers) is pre-trained'

def test_each_rank_its_own_share(ranks):
    _,(r0,r1) = ranks
    for run in ('full', 'resumed'):
        for e,s0 in r0[run]['shards'].items():
            s1 = r1[run]['shards'][e]
            assert len(s0) == len(s1) == 24 and len(set(s0)) == len(set(s1)) == 24
            assert not set(s0) & set(s1), f'{run}, epoch {e}: a sample seen by both ranks'
            assert set(s0) | set(s1) == set(range(48))
    assert r0['full']['shards'][1] != r0['full']['shards'][2], 'every epoch is shuffled anew'

def test_checkpoints_written_once_atomically(ranks):
    tmp,(r0,r1) = ranks
    assert r1['writes'] == [], 'the second rank writes no checkpoint'
    written = [e[1] for e in r0['writes'] if e[0] == 'write']
    renames = [e[1:] for e in r0['writes'] if e[0] == 'rename']
    assert written and all(n.startswith('.') and n.endswith('.tmp') for n in written), 'only temporary files are written'
    assert sorted(src for src,_ in renames) == sorted(written), 'each of them is renamed into place'
    assert {dst for _,dst in renames} == {'last.pth', 'period1.pth', 'period2.pth', 'period3.pth'}
    ckpts = sorted(f.name for f in (tmp/'full'/'checkpoints').iterdir())
    assert ckpts == ['last.pth', 'period1.pth', 'period2.pth', 'period3.pth']

def test_evaluation_after_fit_as_one_process(ranks, data):
    tmp,(r0,r1) = ranks
    assert r0['result'] == r1['result']
    learn = reid_learner(make_dls(data[0]), arch='resnet18', pretrained=data[1])
    load_checkpoint(learn, tmp/'full'/'checkpoints'/'last.pth', with_opt=False)
    assert state_digest(learn.model.state_dict()) == r0['final'], 'last.pth holds the final weights'
    assert learn.reid_evaluate().as_dict() == r0['result']

def test_resumed_run_ends_as_uninterrupted(ranks):
    _,(r0,r1) = ranks
    for r in (r0, r1):
        assert r['resumed_final'] == r['final']
        assert r['resumed']['steps'] == r['full']['steps'][3:], 'the resumed run takes the same steps'

def test_data_made_by_the_first_rank(ranks):
    tmp,(r0,r1) = ranks
    assert r0['made'][0] == r1['made'][0] == str(tmp/'made'/'Market-1501-v15.09.15')
    assert r0['made'][1] and r1['made'][1] == [], 'the other rank finds the dataset made and writes nothing'

def test_sync_bn_refused_on_cpu(ranks):
    _,(r0,r1) = ranks
    for r in (r0, r1): assert 'SyncBatchNorm only runs on CUDA' in r['sync_bn_error']

# --- validation during a distributed fit ---------------------------------------------------------------------------

class PredsMidFit(Callback):
    "Calls `get_preds` after each epoch's training (it sends `before_fit`...`after_fit` too) and notes whether the model is still DDP's"
    def before_fit(self): self.ddp = getattr(self, 'ddp', [])
    def after_train(self):
        self.learn.get_preds(dl=self.dls.query)
        self.ddp.append(isinstance(self.learn.model, nn.parallel.DistributedDataParallel))

def test_get_preds_during_ddp_fit(data):
    "`get_preds` inside a fit under `DDPTrainer` (one gloo process here) neither unwraps the model nor leaves it wrapped after the fit"
    from fastreid_rollback.distributed import DDPTrainer
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{free_port()}', rank=0, world_size=1)
    try:
        learn = reid_learner(make_dls(data[0]), arch='resnet18', pretrained=data[1])
        model,train,probe = learn.model,learn.dls.train,PredsMidFit()
        with learn.no_bar(), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            learn.fit(2, 0.01, cbs=[DDPTrainer(), probe])
        assert probe.ddp == [True, True] and learn.model is model and learn.dls.train is train
    finally: dist.destroy_process_group()

# --- the command line under torchrun --------------------------------------------------------------------------------

def test_train_under_torchrun(data, tmp_path):
    "`torchrun --nproc_per_node 2 -m fastreid_rollback.cli train` on the CPU: one checkpoint set, one report"
    out = tmp_path/'out'
    cmd = [sys.executable, '-W', 'ignore', '-m', 'torch.distributed.run', '--nproc_per_node', str(WORLD), '--master_port', str(free_port()),
           '-m', 'fastreid_rollback.cli', 'train', '--data', data[0], '--dataset', 'synthetic', '--arch', 'resnet18',
           '--periods', 2, '--epochs-per-period', 1, '--bs', 16, '--size', 64, 32, '--pretrained', data[1], '--out', out, '--checkpoint-every', 1]
    p = subprocess.Popen([str(o) for o in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                         env={**os.environ, 'OMP_NUM_THREADS': '1'})
    try: stdout,stderr = p.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        pytest.fail(f'torchrun had not finished after {TIMEOUT} s')
    assert p.returncode == 0, stderr[-3000:]
    assert sorted(f.name for f in (out/'checkpoints').iterdir()) == ['last.pth', 'period1.pth', 'period2.pth']
    assert sorted(f.name for f in out.iterdir() if f.is_file()) == ['block_grads.png', 'cmc.png', 'loss.png', 'model.pth', 'ranked.png',
                                                                    'results.csv', 'results.json']
    doc = json.loads((out/'results.json').read_text())
    assert list(doc['runs']) == ['rollback'] and doc['runs']['rollback']['rollback_epochs'] == [1]
    assert stdout.count('train_time_s') == 1, 'one process prints the table'
    assert read_checkpoint(out/'model.pth')['meta']['epoch'] == 1
