"""Benchmarks of `RollbackCallback` on the CPU.

1. One roll-back of ResNet-50 (layer1..layer4 back to the pre-trained state, plus the fresh optimizer the
   reference builds): median over repeats. Target: under 100 ms.
2. The callback's overhead on training throughput: the same Learner fits the same epochs with and without
   it (and with `BlockGradStats`, for information), interleaved, in the same process; the median of the
   per-round time ratios. Target: under 2%. Each fit is 2 periods of 2 epochs, so it includes the callback's
   setup and one roll-back: a pessimistic case (the reference rolls back once every 40 epochs).

Run: `.venv/bin/python benchmarks/rollback.py [--repeats 15] [--rounds 7] [--threads 1]`; it writes
`benchmarks/results/rollback.json`, which the README quotes.
The machine may be shared and noisy: read the medians and ratios, not single timings.
"""
import argparse, json, os, time, warnings, statistics
from pathlib import Path
from functools import partial
import torch
from torch import nn
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import SGD
from fastreid_rollback.model import create_reid_model, block_state, load_block_state, reid_splitter, atomic_write
from fastreid_rollback.rollback import RollbackCallback, BlockGradStats

def random_dls(n, bs, size, n_ids, seed=0):
    "DataLoaders over `n` random images"
    g = torch.Generator().manual_seed(seed)
    items = [(torch.randn(3, *size, generator=g), torch.tensor(i % n_ids)) for i in range(n)]
    return DataLoaders.from_dsets(items, items[:bs], bs=bs, num_workers=0, device='cpu')

def make_learner(arch, n_ids, dls):
    "A Learner on `arch` whose 'pre-trained' state is its random initialisation (nothing is downloaded)"
    torch.manual_seed(0)
    m = create_reid_model(arch, n_ids=n_ids)
    m.pretrained_state = {n:block_state(m, n) for n in m.block_names}
    learn = Learner(dls, m, loss_func=nn.CrossEntropyLoss(), splitter=reid_splitter,
                    opt_func=partial(SGD, mom=0.9), wd=5e-4, lr=0.01)
    learn.logger = lambda *a, **k: None
    return learn

def bench_rollback(repeats):
    "Median time of one ResNet-50 roll-back: state copy alone, and the callback's full roll-back"
    learn = make_learner('resnet50', 751, random_dls(8, 4, (64, 32), 751))
    learn.create_opt()
    cb = RollbackCallback()
    with learn.added_cbs(cb):
        learn.n_epoch,learn.epoch,learn.train_iter = 4,1,0
        cb('before_fit')
        copy_t,full_t = [],[]
        for _ in range(repeats):
            t = time.perf_counter()
            for n in cb.rolled[0]: load_block_state(learn.model, n, cb.snapshot[n])
            copy_t.append(time.perf_counter()-t)
            t = time.perf_counter()
            cb.roll_back(1)
            full_t.append(time.perf_counter()-t)
    n_par = sum(v.numel() for n in cb.rolled[0] for v in cb.snapshot[n].values())
    return statistics.median(copy_t),statistics.median(full_t),n_par

def timed_fit(learn, epochs, cbs):
    t = time.perf_counter()
    with warnings.catch_warnings(), learn.no_bar():
        warnings.simplefilter('ignore')
        learn.fit(epochs, 0.01, cbs=cbs)
    return time.perf_counter()-t

def bench_overhead(rounds, epochs=4):
    "Median ratio of fit times with/without the callback, interleaved on the same Learner"
    learn = make_learner('resnet18', 16, random_dls(128, 16, (64, 32), 16))
    arms = {'plain': lambda: [], 'rollback': lambda: [RollbackCallback(n_periods=2)],
            'rollback+grads': lambda: [RollbackCallback(n_periods=2), BlockGradStats()]}
    timed_fit(learn, 1, [])  # warm-up
    times = {k:[] for k in arms}
    for r in range(rounds):
        order = list(arms) if r % 2 == 0 else list(arms)[::-1]
        for k in order: times[k].append(timed_fit(learn, epochs, arms[k]()))
    ratios = {k:statistics.median(t/p for t,p in zip(times[k], times['plain'])) for k in arms if k != 'plain'}
    return {k:statistics.median(v) for k,v in times.items()},ratios,len(learn.dls.train)*epochs

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--repeats', type=int, default=15, help='roll-back repeats')
    p.add_argument('--rounds', type=int, default=7, help='interleaved rounds of the throughput comparison')
    p.add_argument('--threads', type=int, default=1, help='torch CPU threads')
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    load = os.getloadavg()[0]
    print(f'torch {torch.__version__}, {a.threads} thread(s)')
    copy_s,full_s,n_par = bench_rollback(a.repeats)
    print(f'ResNet-50 roll-back of layer1..layer4 ({n_par/1e6:.1f}M values), median of {a.repeats}: '
          f'state copy {copy_s*1e3:.1f} ms, full roll-back incl. fresh optimizer {full_s*1e3:.1f} ms (target < 100 ms)')
    med,ratios,n_batches = bench_overhead(a.rounds)
    print(f'throughput, resnet18 64x32 bs16, {n_batches} training batches per fit, median of {a.rounds} interleaved rounds:')
    for k,v in med.items(): print(f'  {k:15s} {v:.2f} s per fit' + (f'   time ratio {ratios[k]:.4f} ({(ratios[k]-1)*100:+.2f}%)' if k in ratios else ''))
    print('target: RollbackCallback overhead < 2%')
    res = dict(torch=torch.__version__, threads=a.threads, load_average_at_start=round(load, 2),
               rollback=dict(arch='resnet50', blocks='layer1..layer4', values_m=round(n_par/1e6, 1), repeats=a.repeats,
                             state_copy_ms=round(copy_s*1e3, 1), full_rollback_ms=round(full_s*1e3, 1)),
               overhead=dict(arch='resnet18', size=[64, 32], bs=16, batches_per_fit=n_batches, rounds=a.rounds,
                             median_fit_s={k:round(v, 3) for k,v in med.items()}, time_ratio={k:round(v, 4) for k,v in ratios.items()}))
    out = Path(__file__).parent/'results'/'rollback.json'
    atomic_write(out, lambda f: f.write((json.dumps(res, indent=2) + '\n').encode()))
    print(f'wrote {out}')
