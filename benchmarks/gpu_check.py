"""Every claim about the GPU, measured in one short run that writes `DIR/gpu_check.json` and prints a table.

    python benchmarks/gpu_check.py --out DIR                       # on a GPU: at most 6 minutes on an H100
    python benchmarks/gpu_check.py --out DIR --device cpu --quick  # every section at tiny sizes, a few minutes on 2 cores (CI)

Sections, each with a `status` ('ok', 'failed', 'not run on CPU', 'not available', 'not reached'):
- `metric_agreement`: the CUDA agreement test of tests/test_metrics.py (run by pytest).
- `metric_timings`: the metrics at Market-1501 size (distance matrix given) and MSMT17 size (from features): medians of
  synchronised runs, one `torch.sort` of the distance matrix beside each as the baseline, peak GPU memory, the same
  result as on the CPU.
- `rerank_aqe`: `reid_rerank` and `aqe` at Market-1501 size.
- `rollback_fit`: a real fit (ResNet-50 at 256x128 on the embedded dataset, `RollbackCallback` with 2 periods), fp32 and
  `to_fp16()`: training images/s, and the state check at the period boundary: the rolled-back blocks equal the
  pre-trained state exactly (parameters and BN buffers), the kept blocks their trained state.
- `training_throughput`: the fastai Learner against a plain PyTorch loop with the same model, batches (already on the
  device) and optimizer, interleaved in the same run (goal: the Learner at >= 90% of the plain loop).
- `feature_extraction`: images/s of `Learner.reid_features` on the gallery loader (its fast default and `fast=False`),
  of the model alone, and of `load_reid`'s predictor on uint8 batches: the path before issue 25 (`old`), the default
  (`new`) and `fp16=True` (CUDA), each with its features' max difference and min cosine against `old` and whether it is
  within tolerance (new: 1e-4 and 0.9999; fp16: cosine 0.999).

A section that fails records its error and the others still run; the JSON is rewritten after each section, so a
killed run keeps what it measured. Exit status 1 when a section failed.
"""
import argparse, contextlib, importlib.util, io, json, math, os, platform, re, subprocess, sys, tempfile, time, traceback, warnings
from pathlib import Path
os.environ.setdefault('MPLBACKEND', 'Agg')
import numpy as np
import torch
import torch.nn.functional as F
import fastai, fastcore
from fastai.callback.core import Callback, CancelValidException
from fastai.data.core import DataLoaders
from fastreid_rollback.metrics import reid_metrics, reid_metrics_from_dist, reid_dist
from fastreid_rollback.synthetic import synthetic_reid
from fastreid_rollback.data import market1501, reid_dls
from fastreid_rollback.model import block_state, snapshot_blocks, reid_splitter, atomic_write
from fastreid_rollback.learner import reid_learner
from fastreid_rollback.inference import save_reid, load_reid
from fastreid_rollback.retrieval import reid_rerank, aqe
import fastreid_rollback.rollback  # noqa: F401 (`Learner.fit_rollback`)

root = Path(__file__).resolve().parent.parent

def _load_bench_metrics():
    "benchmarks/metrics.py as a module (benchmarks/ is no package)"
    spec = importlib.util.spec_from_file_location('bench_metrics', root/'benchmarks'/'metrics.py')
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod

bm = _load_bench_metrics()   # problem makers and timing helpers, shared with the metrics benchmark
SECTIONS = ('metric_agreement', 'metric_timings', 'rerank_aqe', 'rollback_fit', 'training_throughput', 'feature_extraction')
NOT_ON_CPU = 'not run on CPU'

# ---------------------------------------------------------------- sizes
def sizes(quick):
    "Problem sizes: the real ones, or tiny ones that run in seconds on a CPU"
    if not quick: return dict(
        market={**bm.MARKET}, msmt={**bm.MSMT}, reps=20, msmt_reps=3, rerank_reps=3, arch='resnet50', img_size=(256, 128),
        bs=64, data=dict(n_ids=100, n_cams=4, imgs_per_id_cam=6), epochs_per_period=2, n_batches=30, rounds=5, feat_bs=256)
    return dict(
        market={**bm.MARKET, 'nq': 200, 'n_ids': 100, 'n_id_imgs': 1000, 'n_distractors': 200},
        msmt={**bm.MSMT, 'nq': 300, 'n_ids': 150, 'n_id_imgs': 2000}, reps=3, msmt_reps=1, rerank_reps=1, arch='resnet18',
        img_size=(64, 32), bs=8, data=dict(n_ids=12, n_cams=2, imgs_per_id_cam=3, n_distractors=4, n_junk=2),
        epochs_per_period=1, n_batches=3, rounds=2, feat_bs=16)

def slug(s): return re.sub(r'\W+', '_', s).strip('_')

# ---------------------------------------------------------------- device helpers (timing: `bm.timed`, `bm.median_time`)
def reset_peak(device):
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device)

def peak_gb(device):
    "Peak memory allocated on `device` since the last `reset_peak`, in GB (None on the CPU)"
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == 'cuda' else None

# ---------------------------------------------------------------- 1. the CUDA agreement test
def metric_agreement(ctx):
    "The CUDA test of tests/test_metrics.py, run by pytest (on the CPU it only proves the test is still there: skipped)"
    test = 'tests/test_metrics.py::test_cuda_agrees_with_reference'
    res = subprocess.run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider', test], cwd=root,
                         capture_output=True, text=True, timeout=300)
    counts = {k: int(n) for n, k in re.findall(r'(\d+) (passed|failed|skipped|errors?)', res.stdout)}
    out = dict(test=test, pytest_exit_code=res.returncode, **counts)
    if ctx.device.type != 'cuda':
        if counts.get('skipped') != 1: raise RuntimeError(f'{test} was not found or not skipped on the CPU:\n{res.stdout[-2000:]}')
        return dict(status=NOT_ON_CPU, **out)
    if res.returncode or counts.get('passed') != 1: raise RuntimeError(f'{test} did not pass:\n{res.stdout[-3000:]}{res.stderr[-1000:]}')
    return out

# ---------------------------------------------------------------- 2. metric timings
def market_rows(ctx):
    "Market-1501 size, distance matrix on the device: the library, one sort of the matrix, peak memory, same as the CPU"
    s,dev = ctx.sizes,ctx.device
    g = torch.Generator().manual_seed(0)
    ids = bm.make_ids(g, **s['market'])
    dids = [x.to(dev) for x in ids]
    rows = {}
    for kind in bm.MARKET_KINDS:
        D = bm.market_dists(g, ids, kind)
        Dd = D.to(dev)
        for _ in range(2): reid_metrics_from_dist(Dd, *dids)                        # warm-up (kernels, allocator)
        reset_peak(dev)
        t_lib, res = bm.median_time(lambda: reid_metrics_from_dist(Dd, *dids), s['reps'], dev)
        peak = peak_gb(dev)
        t_sort, _ = bm.median_time(lambda: torch.sort(Dd, dim=1), s['reps'], dev)
        rows[slug(kind)] = dict(features=kind, queries=D.shape[0], gallery=D.shape[1], library_ms=round(1e3*t_lib, 3),
                                one_sort_ms=round(1e3*t_sort, 3), library_over_sort=round(t_lib/t_sort, 3), peak_gpu_gb=peak,
                                mAP=round(res.mAP, 4), same_as_cpu=bm.same_result(res, reid_metrics_from_dist(D, *ids), 1e-9))
        D = Dd = None                                                               # free the matrices before the next kind
    return rows

def msmt_row(ctx):
    "MSMT17 size from features on the device (chunked): the library, one sort of the full distance matrix, peak memory"
    s,dev = ctx.sizes,ctx.device
    g = torch.Generator().manual_seed(1)
    ids = bm.make_ids(g, **s['msmt'])
    qf, gf = bm.make_feats(g, ids, kind='trained-like', **s['msmt'])
    qd, gd, dids = qf.to(dev), gf.to(dev), [x.to(dev) for x in ids]
    reid_metrics(qd[:64], gd, dids[0][:64], dids[1], dids[2][:64], dids[3])              # warm-up
    reset_peak(dev)
    t_lib, res = bm.median_time(lambda: reid_metrics(qd, gd, *dids), s['msmt_reps'], dev)
    peak = peak_gb(dev)
    k = slice(0, 256)                                                                     # the CPU's answer on 256 queries
    same = bm.same_result(reid_metrics(qd[k], gd, dids[0][k], dids[1], dids[2][k], dids[3]),
                          reid_metrics(qf[k], gf, ids[0][k], ids[1], ids[2][k], ids[3]), 1e-6)
    D = reid_dist(qd, gd)
    t_sort, _ = bm.median_time(lambda: torch.sort(D, dim=1), 1, dev)
    D = None
    return dict(features='trained-like', queries=len(qf), gallery=len(gf), dim=qf.shape[1], library_ms=round(1e3*t_lib, 1),
                one_sort_of_the_distances_ms=round(1e3*t_sort, 1), library_over_sort=round(t_lib/t_sort, 3), peak_gpu_gb=peak,
                mAP=round(res.mAP, 4), same_as_cpu_on_256_queries=same)

def metric_timings(ctx):
    market = market_rows(ctx)
    out = dict(market=market, msmt=msmt_row(ctx), market_goal_ms=20)
    if ctx.device.type == 'cuda' and not ctx.quick: out['market_goal_met'] = market['trained_like']['library_ms'] < 20
    differ = [k for k, r in market.items() if not r['same_as_cpu']] + ([] if out['msmt']['same_as_cpu_on_256_queries'] else ['msmt'])
    if differ: out.update(status='failed', error=f'the result on {ctx.device} differs from the CPU result for {differ}')
    return out

# ---------------------------------------------------------------- 3. re-ranking and query expansion
def rerank_aqe(ctx):
    "`reid_rerank` and `aqe` at Market-1501 size (features on the device)"
    s,dev = ctx.sizes,ctx.device
    g = torch.Generator().manual_seed(2)
    ids = bm.make_ids(g, **s['market'])
    qf, gf = (f.to(dev) for f in bm.make_feats(g, ids, kind='trained-like', **s['market']))
    dids = [x.to(dev) for x in ids]
    out = dict(queries=len(qf), gallery=len(gf), mAP_plain=round(reid_metrics(qf, gf, *dids).mAP, 4))
    for name, f in (('reid_rerank', reid_rerank), ('aqe', aqe)):
        f(qf[:32], gf[:256])                                                             # warm-up
        reset_peak(dev)
        t, r = bm.median_time(lambda: f(qf, gf), s['rerank_reps'], dev)
        row = dict(ms=round(1e3*t, 3), peak_gpu_gb=peak_gb(dev))
        if torch.is_tensor(r) and r.shape == (len(qf), len(gf)): row['mAP'] = round(reid_metrics_from_dist(r, *dids).mAP, 4)
        elif isinstance(r, tuple) and len(r) == 2: row['mAP'] = round(reid_metrics(*r, *dids).mAP, 4)
        out[name] = row
    return out

# ---------------------------------------------------------------- the embedded dataset
def reid_data(ctx):
    "DataLoaders over the embedded dataset (drawn once per run) at the run's image size"
    if ctx.dls is None:
        s = ctx.sizes
        path = synthetic_reid(ctx.tmp, seed=0, **s['data'])
        ctx.dls = reid_dls(market1501(path), size=s['img_size'], bs=s['bs'], seed=0, device=ctx.device)
    return ctx.dls

# ---------------------------------------------------------------- 4. a real fit with RollbackCallback
class _Stamp(Callback):
    "Notes the time each training phase starts, before `RollbackCallback` (order 5) rolls back"
    order = 4
    def before_train(self): bm.sync(self.dls.device); self.learn.train_stamp = time.perf_counter()

class FitProbe(Callback):
    "Times each training phase (synchronised) and checks the blocks' state around the first period boundary"
    order,run_valid = 6,False
    def __init__(self, boundary, rolled, kept): self.boundary,self.rolled,self.kept,self.epoch_s,self.checks = boundary,rolled,kept,[],{}
    def before_fit(self):
        self.pre = self.model.pretrained_state      # what RollbackCallback rolls back to
        self.checks['bn_buffers_compared'] = sum(k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))
                                                 for n in self.rolled for k in self.pre[n])
    def _equal(self, names, ref): return all(torch.equal(v, ref[n][k]) for n in names for k,v in block_state(self.model, n).items())
    def after_train(self):
        bm.sync(self.dls.device); self.epoch_s.append(time.perf_counter() - self.t0)
        if self.epoch == self.boundary - 1:
            self.trained = snapshot_blocks(self.model)
            self.checks['rolled_back_blocks_changed_in_period_1'] = not self._equal(self.rolled, self.pre)
    def before_train(self):
        bm.sync(self.dls.device)
        if self.epoch == self.boundary:
            self.rollback_s = time.perf_counter() - self.learn.train_stamp
            self.checks['rolled_back_blocks_equal_pretrained'] = self._equal(self.rolled, self.pre)
            self.checks['kept_blocks_keep_trained_state'] = self._equal(self.kept, self.trained)
        self.t0 = time.perf_counter()

def fit_once(ctx, fp16):
    "A 2-period rolling-back fit; training images/s after the first epoch, and the boundary's state checks"
    s,dls = ctx.sizes,reid_data(ctx)
    torch.manual_seed(0)
    learn = reid_learner(dls, s['arch'], pretrained=False)
    learn.logger = lambda *a, **k: None
    if fp16: learn.to_fp16()
    names = learn.model.block_names
    probe = FitProbe(s['epochs_per_period'], [n for n in names if n != names[0]], [names[0]])  # 2 periods: the lowest block is kept
    with learn.no_bar(), warnings.catch_warnings():
        warnings.simplefilter('ignore')
        learn.model.pretrained_state = snapshot_blocks(learn.model)        # no weights are downloaded: the initial state stands in
        t0 = time.perf_counter()
        learn.fit_rollback(s['epochs_per_period'], n_periods=2, cbs=[_Stamp(), probe])
        fit_s = time.perf_counter() - t0
    imgs = len(dls.train) * dls.train.bs
    steady = probe.epoch_s[1:]
    loss = float(learn.recorder.losses[-1])
    return dict(arch=s['arch'], image_size=list(s['img_size']), batch_size=dls.train.bs, train_images_per_epoch=imgs,
                epochs=len(probe.epoch_s), fit_s=round(fit_s, 2), epoch_s=[round(t, 3) for t in probe.epoch_s],
                images_per_s=round(imgs * len(steady) / sum(steady), 1), rollback_s=round(probe.rollback_s, 4),
                rolled_back=probe.rolled, kept=probe.kept, final_loss=round(loss, 4), loss_finite=math.isfinite(loss),
                amp=fp16 and ctx.device.type == 'cuda', **probe.checks)

def rollback_fit(ctx):
    out = dict(fp32=fit_once(ctx, False), fp16=fit_once(ctx, True))
    if ctx.device.type != 'cuda': out['fp16']['note'] = "autocast('cuda') is off on the CPU: this fit ran in fp32"
    checks = [k for k in out['fp32'] if k.startswith(('rolled_back_blocks', 'kept_blocks'))]
    out['state_check_passed'] = (len(checks) == 3 and all(out[p][k] for p in ('fp32', 'fp16') for k in checks)
                                 and out['fp32']['bn_buffers_compared'] > 0)
    out['fp16_over_fp32'] = round(out['fp16']['images_per_s'] / out['fp32']['images_per_s'], 2)
    if not out['state_check_passed']: out.update(status='failed', error='roll-back state check failed: see the checks of fp32 and fp16')
    return out

# ---------------------------------------------------------------- 5. Learner against a plain PyTorch loop
class BatchList(list):
    "Batches already on the device, as a training 'DataLoader' the Learner iterates"
    def to(self, device): return self

class _NoValid(Callback):
    def before_validate(self): raise CancelValidException()

def device_batches(ctx):
    "The run's training batches of the embedded dataset, kept on the device: as plain tensors, and as fastai's typed tensors"
    if ctx.batches is None:
        dls,typed = reid_data(ctx),BatchList()
        while len(typed) < ctx.sizes['n_batches']:
            typed += list(dls.train)[:ctx.sizes['n_batches'] - len(typed)]
        ctx.batches = BatchList(tuple(t.as_subclass(torch.Tensor) for t in b) for b in typed),typed
    return ctx.batches

def plain_loop(model, batches, loss_func, opt, scaler=None):
    "One epoch of the plain PyTorch training loop (with autocast and a grad scaler when `scaler`)"
    model.train()
    for xb, yb in batches:
        with torch.autocast('cuda', dtype=torch.float16, enabled=scaler is not None):
            loss = loss_func(model(xb), yb)
        if scaler is None: loss.backward(); opt.step()
        else: scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
        opt.zero_grad()

def learner_epoch(learn, batches, bar=False):
    "One epoch of `learn.fit` over `batches` (validation cancelled)"
    learn.dls.loaders[0] = batches
    with (contextlib.nullcontext() if bar else learn.no_bar()), contextlib.redirect_stdout(io.StringIO()):
        learn.fit(1, 0.01, cbs=_NoValid())

def throughput_pair(ctx, fp16):
    "Median seconds per epoch of each arm over interleaved rounds, and each arm's speed relative to the plain loop"
    s,dev = ctx.sizes,ctx.device
    dls = reid_data(ctx)
    torch.manual_seed(0)
    learn = reid_learner(dls, s['arch'], pretrained=False, metrics=[])
    learn.logger = lambda *a, **k: None
    learn.dls = DataLoaders(BatchList(), BatchList(), device=dev)
    learn.dls.n_ids = dls.n_ids
    if fp16: learn.to_fp16()
    model = learn.model.to(dev)
    batches,typed = device_batches(ctx)
    opt = torch.optim.SGD([{'params': g} for g in reid_splitter(model)], lr=0.01, momentum=0.9, weight_decay=5e-4, nesterov=True)
    scaler = torch.amp.GradScaler('cuda') if fp16 else None
    arms = {'plain_pytorch': lambda: plain_loop(model, batches, learn.loss_func, opt, scaler),
            'learner': lambda: learner_epoch(learn, batches),
            'learner_progress_bar': lambda: learner_epoch(learn, batches, bar=True),
            'learner_fastai_tensor_types': lambda: learner_epoch(learn, typed)}
    times = {k: [] for k in arms}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for f in arms.values(): bm.timed(f, dev)                                   # warm-up: kernels, cudnn, allocator
        for r in range(s['rounds']):
            for k in (list(arms) if r % 2 == 0 else list(arms)[::-1]): times[k].append(bm.timed(arms[k], dev)[1])
    med = {k: float(np.median(v)) for k, v in times.items()}
    imgs = sum(len(b[0]) for b in batches)
    out = {k: dict(epoch_s=round(v, 4), images_per_s=round(imgs / v, 1), vs_plain=round(med['plain_pytorch'] / v, 3))
           for k, v in med.items()}
    res = dict(batches=len(batches), batch_size=len(batches[0][0]), rounds=s['rounds'], **out)
    if dev.type == 'cuda' and not ctx.quick: res['goal_met'] = out['learner']['vs_plain'] >= 0.9
    return res

def training_throughput(ctx):
    out = dict(arch=ctx.sizes['arch'], image_size=list(ctx.sizes['img_size']), optimizer='torch.optim.SGD (nesterov, momentum 0.9, wd 5e-4), one group per block',
               goal='learner >= 0.9 of plain_pytorch', fp32=throughput_pair(ctx, False))
    out['fp16'] = throughput_pair(ctx, True) if ctx.device.type == 'cuda' else dict(status=NOT_ON_CPU)
    return out

# ---------------------------------------------------------------- 6. feature extraction
def feature_extraction(ctx):
    "Images/s of `reid_features` over the gallery loader (decoding included, flip on), and of the model alone"
    s,dev,dls = ctx.sizes,ctx.device,reid_data(ctx)
    torch.manual_seed(0)
    learn = reid_learner(dls, s['arch'], pretrained=False)
    learn.model.to(dev)
    learn.reid_features(dls.gallery)                                                     # warm-up
    (f, _, _), t = bm.timed(lambda: learn.reid_features(dls.gallery), dev)
    (_, _, _), t_plain = bm.timed(lambda: learn.reid_features(dls.gallery, fast=False), dev)
    out = dict(arch=s['arch'], image_size=list(s['img_size']), gallery_images=len(f), feature_dim=f.shape[1],
               reid_features_flip=dict(images_per_s=round(len(f) / t, 1), seconds=round(t, 3)),
               reid_features_flip_plain=dict(images_per_s=round(len(f) / t_plain, 1), seconds=round(t_plain, 3)))
    m = learn.model.eval()
    x = torch.randn(s['feat_bs'], 3, *s['img_size'], device=dev)
    for name, amp in (('model_fp32', False), ('model_fp16_autocast', True)):
        if amp and dev.type != 'cuda': out[name] = dict(status=NOT_ON_CPU); continue
        def run():
            with torch.no_grad(), torch.autocast('cuda', dtype=torch.float16, enabled=amp): return m.features(x)
        run()
        t, _ = bm.median_time(run, s['reps'], dev)
        out[name] = dict(batch_size=len(x), images_per_s=round(len(x) / t, 1))
    out['predictor'] = predictor_throughput(ctx, learn.model)
    return out

def predictor_throughput(ctx, model):
    "Images/s of `load_reid(...).batch` on uint8 batches: the path before issue 25, the default and fp16, features against the first's"
    s,dev = ctx.sizes,ctx.device
    fn = save_reid(model, Path(ctx.tmp)/'features.reid', size=s['img_size'])
    x = torch.randint(0, 256, (s['feat_bs'], 3, *s['img_size']), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    out,ref = {},None
    for name,kw in (('old', dict(fold_bn=False, channels_last=False, fuse_relu=False)), ('new', {}), ('fp16', dict(fp16=True))):
        if name == 'fp16' and dev.type != 'cuda': out[name] = dict(status=NOT_ON_CPU); continue
        p = load_reid(fn, device=dev, **kw)
        f = p.batch(x)
        ref = f if ref is None else ref
        t, _ = bm.median_time(lambda: p.batch(x), s['reps'], dev)
        out[name] = dict(batch_size=len(x), images_per_s=round(len(x) / t, 1), max_abs_diff=float((f - ref).abs().max()),
                         cosine_min=float(F.cosine_similarity(f, ref).min()))
    out['new']['within_tolerance'] = out['new']['max_abs_diff'] <= 1e-4 and out['new']['cosine_min'] >= 0.9999
    if 'cosine_min' in out['fp16']: out['fp16']['within_tolerance'] = out['fp16']['cosine_min'] >= 0.999
    return out

# ---------------------------------------------------------------- the run
def cpu_name():
    "The CPU's model name (Linux), else the machine type"
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): return platform.machine()

def environment(device, quick):
    env = dict(device=str(device), device_name=torch.cuda.get_device_name(device) if device.type == 'cuda' else cpu_name(),
               quick=quick, python=platform.python_version(), torch=torch.__version__, torch_cuda=torch.version.cuda,
               cudnn=torch.backends.cudnn.version() if device.type == 'cuda' else None, fastai=fastai.__version__,
               fastcore=fastcore.__version__, numpy=np.__version__, cpus=os.cpu_count(), torch_threads=torch.get_num_threads(),
               started=time.strftime('%Y-%m-%d %H:%M:%S %z'), command=' '.join(sys.argv))
    if device.type == 'cuda': env['gpu_memory_gb'] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    try: env['git_commit'] = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=root, capture_output=True, text=True).stdout.strip() or None
    except OSError: env['git_commit'] = None
    return env

def write_json(out, fn):
    "Write `out` to `fn` atomically"
    atomic_write(fn, lambda f: f.write(json.dumps(out, indent=1, default=str).encode()))

def run_section(name, ctx):
    "Run section `name`: its figures with a status, or the error it raised"
    t = time.perf_counter()
    try:
        res = globals()[name](ctx)
        res = {'status': res.pop('status', 'ok'), **res}
    except Exception as e:
        res = dict(status='failed', error=f'{type(e).__name__}: {e}'[:2000], traceback=traceback.format_exc()[-4000:])
    res['seconds'] = round(time.perf_counter() - t, 1)
    if ctx.device.type == 'cuda': torch.cuda.empty_cache()
    return res

class Context:
    "What the sections share: device, sizes, a temporary folder and the embedded dataset's DataLoaders"
    def __init__(self, device, quick, tmp): self.device,self.quick,self.tmp,self.sizes,self.dls,self.batches = device,quick,tmp,sizes(quick),None,None

def summary(name, r):
    "One line of figures for the table"
    if r['status'] == 'failed': return r['error'].splitlines()[0][:120]
    if name == 'metric_agreement': return ', '.join(f'{r[k]} {k}' for k in ('passed', 'skipped', 'failed') if k in r)
    if r['status'] != 'ok': return r.get('reason', '')
    if name == 'metric_timings':
        m,ms = r['market']['trained_like'],r['msmt']
        return (f"Market {m['queries']}x{m['gallery']}: {m['library_ms']} ms (one sort {m['one_sort_ms']} ms, same as CPU {m['same_as_cpu']}); "
                f"MSMT17 {ms['queries']}x{ms['gallery']}: {ms['library_ms']} ms (sort {ms['one_sort_of_the_distances_ms']} ms), peak {ms['peak_gpu_gb']} GB")
    if name == 'rerank_aqe': return ', '.join(f"{k} {v['ms']} ms" for k, v in r.items() if isinstance(v, dict) and 'ms' in v)
    if name == 'rollback_fit':
        return (f"{r['fp32']['arch']} {r['fp32']['image_size']}: fp32 {r['fp32']['images_per_s']} img/s, fp16 {r['fp16']['images_per_s']} img/s; "
                f"roll-back {1e3*r['fp32']['rollback_s']:.0f} ms; state check {r['state_check_passed']}")
    if name == 'training_throughput':
        p = r['fp32']
        line = f"fp32: plain {p['plain_pytorch']['images_per_s']} img/s, Learner {p['learner']['vs_plain']:.0%} (bar {p['learner_progress_bar']['vs_plain']:.0%}, typed {p['learner_fastai_tensor_types']['vs_plain']:.0%})"
        if 'learner' in r['fp16']: line += f"; fp16: plain {r['fp16']['plain_pytorch']['images_per_s']} img/s, Learner {r['fp16']['learner']['vs_plain']:.0%}"
        return line
    if name == 'feature_extraction':
        return (f"reid_features {r['reid_features_flip']['images_per_s']} img/s (flip), model fp32 {r['model_fp32']['images_per_s']} img/s"
                + (f", fp16 {r['model_fp16_autocast']['images_per_s']} img/s" if 'images_per_s' in r['model_fp16_autocast'] else '')
                + f"; load_reid old {r['predictor']['old']['images_per_s']}, new {r['predictor']['new']['images_per_s']}"
                + (f", fp16 {r['predictor']['fp16']['images_per_s']} img/s (cos {r['predictor']['fp16']['cosine_min']:.4f})" if 'images_per_s' in r['predictor']['fp16'] else ' img/s'))
    return ''

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', required=True, help='folder for gpu_check.json')
    ap.add_argument('--device', default='cuda', choices=('cuda', 'cpu'), help='where to run (default: cuda)')
    ap.add_argument('--quick', action='store_true', help='tiny sizes (resnet18 at 64x32, small metric problems)')
    ap.add_argument('--only', default=None, help=f'comma-separated sections to run (default: all of {",".join(SECTIONS)})')
    a = ap.parse_args(argv)
    only = SECTIONS if a.only is None else tuple(a.only.split(','))
    bad = [s for s in only if s not in SECTIONS]
    if bad: ap.error(f'--only: unknown section(s) {bad}; expected some of {list(SECTIONS)}')
    device = torch.device(a.device)
    if device.type == 'cuda' and not torch.cuda.is_available(): ap.error('--device cuda: torch sees no CUDA device here (use --device cpu)')
    out_dir = Path(a.out); out_dir.mkdir(parents=True, exist_ok=True)
    fn = out_dir/'gpu_check.json'
    out = dict(environment=environment(device, a.quick), **{s: dict(status='not reached' if s in only else 'not selected') for s in SECTIONS})
    write_json(out, fn)
    print(f"gpu_check on {out['environment']['device_name']} ({device}), torch {torch.__version__}, fastai {fastai.__version__}"
          f"{', quick' if a.quick else ''}", flush=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = Context(device, a.quick, tmp)
        for name in only:
            out[name] = run_section(name, ctx)
            write_json(out, fn)
            print(f"{name:20s} {out[name]['status']:15s} {out[name]['seconds']:6.1f} s  {summary(name, out[name])}", flush=True)
    out['environment']['total_s'] = round(time.perf_counter() - t0, 1)
    write_json(out, fn)
    print(f"total {out['environment']['total_s']} s; wrote {fn}")
    return 1 if any(out[s]['status'] == 'failed' for s in only) else 0

if __name__ == '__main__': sys.exit(main())
