"""Benchmark of fastreid_rollback.metrics against a per-query reference evaluator and torchreid's compiled one.

    .venv/bin/python benchmarks/metrics.py            # everything (about 12 minutes on 2 idle cores)
    .venv/bin/python benchmarks/metrics.py --quick    # fewer cases and repeats (about 4 minutes)
    .venv/bin/python benchmarks/metrics.py --only sweep,busy   # some sections; the others stay as they were in the file
    .venv/bin/python benchmarks/metrics.py --device cuda       # the GPU run (target: Market size under 20 ms)

Every CPU run writes benchmarks/results/metrics.json (every row, the configuration, the load average at the
start of each section) and its tables as benchmarks/results/metrics.md, and prints a table per section:

- market: Market-1501 size (3,368 queries x 15,913 gallery images, 751 identities + 2,793 distractors, 6 cameras),
  distance matrix given, four kinds of distances: from trained-like features, from random features, those rounded
  to half precision (ties), all equal (a collapsed model). The library with torch's threads and with one, beside one
  `torch.sort` of the matrix, the reference evaluator of `fastreid_rollback.test_utils` (numpy, one query at a
  time) and torchreid's Cython evaluator when it is installed (`pip install --no-deps pyppbox-torchreid`: its wheel
  ships the compiled `evaluate_cy`, loaded here from its file without importing the rest of that package).
- sweep: the same size over realistic distributions: feature dimension 32 to 2048, clusters from tight (mAP near 1)
  to overlapping (mAP near 0.1), with and without a camera offset, float32 and float64, rounded to half precision,
  plus random features rounded to half precision and all-equal distances. Median and worst case, beside one sort.
- busy: the Market trained-like and tie cases with one competing CPU-bound process (started here, stopping by
  itself, stopped here), with torch's threads and with one, beside the same idle and the Cython evaluator.
- tricks: what the engine's two low-level choices save (numpy's flatnonzero, the float bits as the bin index).
- msmt: MSMT17 size (11,659 x 82,161, 3,060 identities, 15 cameras, 2048-d) from features, chunked, in a child
  process whose peak resident set (VmHWM) is reported.
"""
import argparse, contextlib, glob, importlib.util, json, math, os, resource, subprocess, sys, time
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from fastreid_rollback.metrics import reid_metrics, reid_metrics_from_dist, reid_dist, torch_threads
from fastreid_rollback.model import atomic_write
from fastreid_rollback.test_utils import ref_metrics, agrees_with_reference, same_result

RESULTS = Path(__file__).parent/'results'/'metrics.json'
MARKET = dict(nq=3368, n_ids=751, n_id_imgs=13120, n_distractors=2793, n_cams=6, dim=2048, sigma=2.9)
MSMT = dict(nq=11659, n_ids=3060, n_id_imgs=82161, n_distractors=0, n_cams=15, dim=2048, sigma=2.8)
# sigma: the noise of the trained-like features, tuned so that mAP is about 0.8

# ---------------------------------------------------------------- data
def make_ids(g, nq, n_ids, n_id_imgs, n_distractors, n_cams, **_):
    "Query and gallery ids: every identity in the gallery, queries drawn among them, distractors (id 0) last"
    gp = torch.cat([torch.arange(1, n_ids + 1), torch.randint(1, n_ids + 1, (n_id_imgs - n_ids,), generator=g),
                    torch.zeros(n_distractors, dtype=torch.long)])
    return (torch.randint(1, n_ids + 1, (nq,), generator=g), gp,
            torch.randint(0, n_cams, (nq,), generator=g), torch.randint(0, n_cams, (len(gp),), generator=g))

def make_feats(g, ids, n_ids, n_cams, dim, kind, sigma, latent=64, cam_w=.3, block=4096, **_):
    "Query and gallery features like a trained model's (identity centre + camera offset + noise; a distractor: a centre of its own), or random"
    if kind == 'random': return [torch.randn(len(p), dim, generator=g) for p in ids[:2]]
    latent = min(latent, dim)
    W = torch.randn(latent, dim, generator=g)                  # identities live in a 64-d subspace, as in a trained model
    centres = F.normalize(torch.randn(n_ids + 1, latent, generator=g) @ W, dim=1)
    cams = F.normalize(torch.randn(n_cams, dim, generator=g), dim=1)
    def feats(pids, camids):
        out = torch.empty(len(pids), dim)
        for s in range(0, len(pids), block):
            p, c = pids[s:s + block], camids[s:s + block]
            x = centres[p] + cam_w * cams[c]
            dis = p == 0
            if dis.any(): x[dis] = F.normalize(torch.randn(int(dis.sum()), latent, generator=g) @ W, dim=1)
            out[s:s + block] = x + sigma / math.sqrt(dim) * torch.randn(len(p), dim, generator=g)
        return out
    return feats(ids[0], ids[2]), feats(ids[1], ids[3])

MARKET_KINDS = dict(trained_like='trained-like features', random='random features',
                    ties_half='random features, distances rounded to half precision', ties_equal='all distances equal (a collapsed model)')

def market_dists(g, ids, kind):
    "Market-size distances of `kind` (a key of `MARKET_KINDS`)"
    if kind == 'ties_equal': return torch.ones(len(ids[0]), len(ids[1]))
    if kind == 'ties_half': return market_dists(g, ids, 'random').half().float()
    return reid_dist(*make_feats(g, ids, kind=kind.replace('_', '-'), **MARKET))

# ---------------------------------------------------------------- timing and baselines
def sync(device):
    "Wait for the work queued on `device` (nothing to wait for on the CPU)"
    if device.type == 'cuda': torch.cuda.synchronize(device)

def timed(f, device=torch.device('cpu')):
    "`f()` and its seconds, `device` synchronised around it"
    sync(device); t = time.perf_counter(); r = f(); sync(device)
    return r, time.perf_counter() - t

def median_time(f, n, device=torch.device('cpu')):
    "Median seconds of `f()` over `n` calls (`device` synchronised around each call), and the last result"
    ts = []
    for _ in range(n):
        r, t = timed(f, device); ts.append(t)
    return float(np.median(ts)), r

def sampled_queries(nq, n, seed=0):
    "`n` sorted random query indices (all of them when `n` >= `nq`)"
    return np.arange(nq) if n >= nq else np.sort(np.random.default_rng(seed).choice(nq, n, replace=False))

def reference_time(D, ids, idx):
    "Seconds of the reference evaluator on the queries `idx`, extrapolated to all queries, and its result there"
    qp, gp, qc, gc = (x.numpy() for x in ids)
    t = time.perf_counter()
    ref = ref_metrics(D[idx].numpy(), qp[idx], gp, qc[idx], gc)
    return (time.perf_counter() - t) * len(D) / len(idx), ref

def agrees(D, ids, idx, ref):
    "The library on the queries `idx` gives the reference's numbers"
    qp, gp, qc, gc = ids
    return agrees_with_reference(reid_metrics_from_dist(D[idx], qp[idx], gp, qc[idx], gc), ref)

def cython_evaluator():
    "torchreid's compiled evaluator `evaluate_cy(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, cuhk03)`, or None"
    spec = importlib.util.find_spec('pyppbox_torchreid')           # the wheel of a torchreid fork: ships it compiled
    so = glob.glob(os.path.join(spec.submodule_search_locations[0], 'metrics', 'rank_cylib', 'rank_cy*.so')) if spec else []
    if not so: return None
    s = importlib.util.spec_from_file_location('rank_cy', so[0])
    m = importlib.util.module_from_spec(s); s.loader.exec_module(m)
    return m.evaluate_cy

def cython_time(cy, D, ids, reps=1):
    "Seconds of torchreid's Cython evaluator on all queries, and its mAP (None when not installed)"
    if cy is None: return None, None
    qp, gp, qc, gc = (x.numpy() for x in ids)
    Dn = D.numpy()
    t, (cmc, mAP) = median_time(lambda: cy(Dn, qp, gp, qc, gc, 50, False), reps)
    return t, float(mAP)

BUSY_LOOP = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"

@contextlib.contextmanager
def competing_process(seconds=120):
    "One CPU-bound process (a Python busy loop that stops by itself after `seconds`) running for the duration"
    p = subprocess.Popen([sys.executable, '-c', BUSY_LOOP.format(seconds=seconds)])
    try:
        time.sleep(.5)                                           # started and spinning
        yield p
    finally: p.kill(); p.wait()

def r3(x): return None if x is None else round(x, 3)

# ---------------------------------------------------------------- Market-1501 size
def market(quick):
    "Four kinds of Market-size distances: the library (torch's threads, one thread), one sort, the reference, Cython"
    g = torch.Generator().manual_seed(0)
    ids = make_ids(g, **MARKET)
    reps, cy = (3 if quick else 5), cython_evaluator()
    rows = {}
    for kind, what in MARKET_KINDS.items():
        D = market_dists(g, ids, kind)
        reid_metrics_from_dist(D, *ids)                                                  # warm-up
        t_lib, res = median_time(lambda: reid_metrics_from_dist(D, *ids), reps)
        with torch_threads(1): t_lib1, _ = median_time(lambda: reid_metrics_from_dist(D, *ids), reps)
        t_sort, _ = median_time(lambda: torch.sort(D, dim=1), 3)
        idx = sampled_queries(len(D), 300 if quick or kind != 'trained_like' else len(D))
        t_ref, ref = reference_time(D, ids, idx)
        t_cy, map_cy = cython_time(cy, D, ids) if not quick or kind == 'trained_like' else (None, None)
        rows[kind] = dict(distances=what, queries=len(D), gallery=D.shape[1], mAP=round(res.mAP, 4), mINP=round(res.mINP, 4),
                          rank1=round(res.rank(1), 4), library_s=r3(t_lib), library_1_thread_s=r3(t_lib1), full_sort_s=r3(t_sort),
                          reference_s=round(t_ref, 2), reference_queries=len(idx), speedup_reference=round(t_ref / t_lib, 1),
                          cython_s=r3(t_cy), speedup_cython=None if t_cy is None else round(t_cy / t_lib, 1),
                          cython_mAP=None if map_cy is None else round(map_cy, 4), agrees_with_reference=agrees(D, ids, idx, ref))
        print(json.dumps({kind: rows[kind]}), flush=True)
        D = None   # free the matrix before the next one (not `del`: the lambdas above read D)
    print(f"\n{'Market-1501 size':50s} {'library':>8s} {'1 thread':>9s} {'one sort':>9s} {'reference':>10s} {'Cython':>8s}  mAP")
    for r in rows.values():
        cy_s = '' if r['cython_s'] is None else f"{r['cython_s']:.2f} s"
        print(f"{r['distances']:50s} {r['library_s']:6.3f} s {r['library_1_thread_s']:7.3f} s {r['full_sort_s']:7.3f} s "
              f"{r['reference_s']:8.2f} s {cy_s:>8s}  {r['mAP']}")
    return rows

# ---------------------------------------------------------------- the sweep of distributions
SPREADS = {32: dict(tight=.11, medium=.72, overlapping=1.1), 256: dict(tight=.31, medium=1.64, overlapping=2.4),
           2048: dict(tight=.87, medium=2.9, overlapping=4.3)}
# noise (sigma of make_feats) per feature dimension, measured at Market size to give mAP near 1 (tight),
# about 0.3-0.9 (medium) and about 0.05-0.2 (overlapping); each row reports the mAP it got
CAMERAS = dict(no_camera_offset=0., camera_offset=.5)

def sweep_cases(g, ids, quick):
    "(name, description, distances) over dimensions, spreads, camera offsets and dtypes, then the two tie extremes"
    dims, spreads, cams = ((32, 2048), ('tight', 'overlapping'), ('camera_offset',)) if quick else (SPREADS, ('tight', 'medium', 'overlapping'), CAMERAS)
    for dim in dims:
        for spread in spreads:
            for cam in cams:
                D = reid_dist(*make_feats(g, ids, **{**MARKET, 'dim': dim, 'sigma': SPREADS[dim][spread], 'cam_w': CAMERAS[cam]}, kind='trained-like'))
                name = f'd{dim}_{spread}_{cam}'
                yield name + '_float32', dict(dim=dim, spread=spread, camera=cam, dtype='float32'), D
                yield name + '_float64', dict(dim=dim, spread=spread, camera=cam, dtype='float64'), D.double()
                yield name + '_half', dict(dim=dim, spread=spread, camera=cam, dtype='float32, rounded to half precision'), D.half().float()
    yield 'random_half', dict(dim=2048, spread='random features', camera='-', dtype='float32, rounded to half precision'), market_dists(g, ids, 'ties_half')
    yield 'all_equal', dict(dim='-', spread='all distances equal', camera='-', dtype='float32'), market_dists(g, ids, 'ties_equal')

def sweep(quick):
    "Market size over realistic distributions: median and worst case, beside one full sort of a float32 and a float64 matrix"
    g = torch.Generator().manual_seed(2)
    ids = make_ids(g, **MARKET)
    cases, sorts, reps = {}, {}, 2 if quick else 3
    for name, case, D in sweep_cases(g, ids, quick):
        reid_metrics_from_dist(D[:64], ids[0][:64], ids[1], ids[2][:64], ids[3])            # warm-up
        t, res = median_time(lambda: reid_metrics_from_dist(D, *ids), reps)
        if str(D.dtype) not in sorts: sorts[str(D.dtype)] = median_time(lambda: torch.sort(D, dim=1), 3)[0]
        idx = sampled_queries(len(D), 50, seed=len(cases))
        cases[name] = dict(case, mAP=round(res.mAP, 4), library_s=r3(t), agrees_with_reference=agrees(D, ids, idx, reference_time(D, ids, idx)[1]))
        print(json.dumps({name: cases[name]}), flush=True)
        D = None   # free the matrix before the next one (not `del`: the lambdas above read D)
    times = {k: c['library_s'] for k, c in cases.items()}
    worst = max(times, key=times.get)
    out = dict(n_cases=len(cases), median_s=r3(float(np.median(list(times.values())))), worst_s=times[worst], worst_case=worst,
               full_sort_s=r3(sorts['torch.float32']), full_sort_float64_s=r3(sorts['torch.float64']),
               all_agree_with_reference=all(c['agrees_with_reference'] for c in cases.values()), cases=cases)
    print(f"\nsweep over {len(cases)} Market-size distributions: median {out['median_s']:.3f} s, worst {out['worst_s']:.3f} s ({worst}); "
          f"one torch.sort of the matrix {out['full_sort_s']:.3f} s (float64 {out['full_sort_float64_s']:.3f} s); "
          f"mAP from {min(c['mAP'] for c in cases.values())} to {max(c['mAP'] for c in cases.values())}")
    return out

# ---------------------------------------------------------------- a busy machine
def busy(quick):
    "Market size idle, then beside one competing CPU-bound process: torch's threads and one thread, and the Cython evaluator"
    g = torch.Generator().manual_seed(0)
    ids = make_ids(g, **MARKET)
    reps, cy = (3 if quick else 7), cython_evaluator()
    rows = {}
    for kind in ('trained_like', 'ties_half'):
        D = market_dists(g, ids, kind)
        lib = lambda: reid_metrics_from_dist(D, *ids)
        lib(); r = {}
        for state in ('idle', 'busy'):
            with (competing_process() if state == 'busy' else contextlib.nullcontext()):
                r[f'{state}_s'] = r3(median_time(lib, reps)[0])
                with torch_threads(1): r[f'{state}_1_thread_s'] = r3(median_time(lib, reps)[0])
                if kind == 'trained_like': r[f'cython_{state}_s'] = r3(cython_time(cy, D, ids)[0])
        r.update(busy_over_idle=round(r['busy_s'] / r['idle_s'], 2), busy_over_idle_1_thread=round(r['busy_s'] / r['idle_1_thread_s'], 2))
        if r.get('cython_busy_s'): r['speedup_cython_busy'] = round(r['cython_busy_s'] / r['busy_s'], 1)
        rows[kind] = dict(distances=MARKET_KINDS[kind], **r)
        print(json.dumps({kind: rows[kind]}), flush=True)
        D = None   # free the matrix before the next one (not `del`: the lambdas above read D)
    print(f"\n{'one competing CPU-bound process':50s} {'idle':>8s} {'busy':>8s} {'idle, 1 thread':>15s} {'busy, 1 thread':>15s} {'Cython busy':>12s}")
    for r in rows.values():
        cy_s = f"{r['cython_busy_s']:.2f} s" if r.get('cython_busy_s') else ''
        print(f"{r['distances']:50s} {r['idle_s']:6.3f} s {r['busy_s']:6.3f} s {r['idle_1_thread_s']:13.3f} s {r['busy_1_thread_s']:13.3f} s {cy_s:>12s}")
    return rows

# ---------------------------------------------------------------- the engine's low-level choices
def tricks(quick):
    "One thread, one Market-size chunk (1M distances): each choice of the engine (`fastreid_rollback.metrics`) against the plain way, in ms"
    n, reps = 2**20, 21
    out = {}
    with torch_threads(1):
        for name, frac in (('where_true_sparse', .004), ('where_true_dense', .125)):   # dense: a tie-heavy matrix
            m = torch.rand(n) < frac
            out[name] = dict(numpy_flatnonzero_ms=round(1e3 * median_time(lambda: torch.from_numpy(np.flatnonzero(m.numpy())), reps)[0], 3),
                             torch_nonzero_ms=round(1e3 * median_time(lambda: m.nonzero().squeeze(1), reps)[0], 3), fraction_set=frac)
        D = torch.rand(n // 16384 * 16, 1024)
        nb = 4096                                                        # the engine's most bins per query row
        lo, scale = torch.zeros(len(D)), torch.full((len(D),), float(nb - 4))
        rows = torch.arange(len(D), dtype=torch.int32)[:, None] * nb
        def bins_by_cast():                                              # the plain way: clamp, then a float-to-int cast
            return torch.sub(D, lo[:, None]).mul_(scale[:, None]).clamp_(-1, nb - 2).add_(1.5).to(torch.int32).add_(rows)
        def bins_by_float_bits():                                        # the engine's way: from 2**23 on, a float32's bits are an integer
            t = torch.sub(D, lo[:, None]).mul_(scale[:, None]).clamp_(-1, nb - 2)
            off = torch.arange(len(D), dtype=torch.float32).mul_(nb).add_(2.**23 + 1)
            return t.add_(off[:, None]).view(torch.int32).sub_(0x4B000000)
        out['bins'] = dict(float_bits_ms=round(1e3 * median_time(bins_by_float_bits, reps)[0], 3),
                           cast_ms=round(1e3 * median_time(bins_by_cast, reps)[0], 3))
    for k, v in out.items(): print(k, json.dumps(v))
    return out

# ---------------------------------------------------------------- MSMT17 size, in a child process
def peak_rss_gb():
    "Peak resident set of this process (VmHWM: getrusage's ru_maxrss would carry the parent's peak over exec)"
    try:
        with open('/proc/self/status') as f: return next(int(l.split()[1]) for l in f if l.startswith('VmHWM')) / 2**20
    except (OSError, StopIteration): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

def msmt_child(nq):
    "Runs in its own process: features, reid_metrics from features (chunked), time and peak RSS as JSON"
    g = torch.Generator().manual_seed(1)
    qp, gp, qc, gc = make_ids(g, **{**MSMT, 'nq': nq})
    qf, gf = make_feats(g, (qp, gp, qc, gc), kind='trained-like', **MSMT)
    rss_feats = peak_rss_gb()
    t = time.perf_counter()
    r = reid_metrics(qf, gf, qp, gp, qc, gc)
    t_lib = time.perf_counter() - t
    rss_lib = peak_rss_gb()
    idx = sampled_queries(nq, 40)                                # the reference on 40 queries: distances row by row
    qn, gn = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
    t = time.perf_counter()
    for q in idx: ref_metrics((1 - qn[q:q + 1] @ gn.T).numpy(), qp[q:q + 1].numpy(), gp.numpy(), qc[q:q + 1].numpy(), gc.numpy())
    t_ref = (time.perf_counter() - t) * nq / len(idx)
    print(json.dumps(dict(mAP=r.mAP, mINP=r.mINP, rank1=r.rank(1), library_s=t_lib, reference_s=t_ref, reference_queries=len(idx),
                          rss_after_features_gb=rss_feats, peak_rss_gb=rss_lib)))

def msmt(quick):
    "MSMT17 size from features in a child process: time, peak RSS, the reference on sampled queries"
    nq = 1024 if quick else MSMT['nq']
    res = subprocess.run([sys.executable, __file__, '--msmt-child', str(nq)], capture_output=True, text=True)
    if res.returncode: raise RuntimeError(res.stderr)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    row = dict(queries=nq, gallery=MSMT['n_id_imgs'], mAP=round(r['mAP'], 4), mINP=round(r['mINP'], 4), rank1=round(r['rank1'], 4),
               library_s=round(r['library_s'], 1), reference_s=round(r['reference_s'], 1), reference_queries=r['reference_queries'],
               speedup_reference=round(r['reference_s'] / r['library_s'], 1),
               rss_after_features_gb=round(r['rss_after_features_gb'], 2), peak_rss_gb=round(r['peak_rss_gb'], 2))
    print(json.dumps(row), flush=True)
    return row

SECTIONS = dict(market=market, sweep=sweep, busy=busy, tricks=tricks, msmt=msmt)

# ---------------------------------------------------------------- on a GPU
def market_device(device, quick, out):
    "Market-1501 size, distance matrix on `device`: the library (synchronised) beside one sort there and the reference"
    g = torch.Generator().manual_seed(0)
    ids = make_ids(g, **MARKET)
    dids = [x.to(device) for x in ids]
    reps = 5 if quick else 20
    for kind in MARKET_KINDS:
        D = market_dists(g, ids, kind)
        Dd = D.to(device)
        for _ in range(3): reid_metrics_from_dist(Dd, *dids)                       # warm-up (kernels, allocator)
        t_lib, res = median_time(lambda: reid_metrics_from_dist(Dd, *dids), reps, device)
        t_sort, _ = median_time(lambda: torch.sort(Dd, dim=1), reps, device)
        idx = sampled_queries(len(D), 300)
        t_ref, ref = reference_time(D, ids, idx)
        row = dict(size='Market-1501', features=kind, device=str(device), queries=len(D), gallery=D.shape[1],
                   mAP=round(res.mAP, 4), rank1=round(res.rank(1), 4), library_ms=round(1e3 * t_lib, 2),
                   full_sort_ms=round(1e3 * t_sort, 2), reference_s=round(t_ref, 2), reference_queries=len(idx),
                   speedup=round(t_ref / t_lib, 1), same_as_cpu=same_result(res, reid_metrics_from_dist(D, *ids), 1e-9),
                   agrees_with_reference=agrees(D, ids, idx, ref))
        print(json.dumps(row), flush=True); out.append(row)
        D = Dd = None   # free the matrices before the next ones (not `del`: the lambdas above read them)

def msmt_device(device, quick, out):
    "MSMT17 size from features on `device` (chunked): time, peak memory of the device, and the CPU's answer on a sample"
    nq = 1024 if quick else MSMT['nq']
    g = torch.Generator().manual_seed(1)
    ids = make_ids(g, **{**MSMT, 'nq': nq})
    qf, gf = make_feats(g, ids, kind='trained-like', **MSMT)
    qd, gd, dids = qf.to(device), gf.to(device), [x.to(device) for x in ids]
    reid_metrics(qd[:64], gd, dids[0][:64], dids[1], dids[2][:64], dids[3])        # warm-up
    if device.type == 'cuda': torch.cuda.reset_peak_memory_stats(device)
    t_lib, res = median_time(lambda: reid_metrics(qd, gd, *dids), 1 if quick else 3, device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == 'cuda' else float('nan')
    s = slice(0, 256)                                                                 # the CPU on the first 256 queries
    cpu = reid_metrics(qf[s], gf, ids[0][s], ids[1], ids[2][s], ids[3])
    dev = reid_metrics(qd[s], gd, dids[0][s], dids[1], dids[2][s], dids[3])
    row = dict(size='MSMT17', features='trained-like', device=str(device), queries=nq, gallery=MSMT['n_id_imgs'],
               mAP=round(res.mAP, 4), rank1=round(res.rank(1), 4), library_ms=round(1e3 * t_lib, 1),
               peak_device_memory_gb=round(peak, 2), same_as_cpu_on_256_queries=same_result(dev, cpu, 1e-6))
    print(json.dumps(row), flush=True); out.append(row)

def run_device(device, quick):
    if device.type == 'cuda' and not torch.cuda.is_available(): sys.exit("--device cuda: torch sees no CUDA device here")
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else str(device)
    print(f"torch {torch.__version__} on {name}; library times are medians, device synchronised", flush=True)
    out = []
    market_device(device, quick, out); msmt_device(device, quick, out)
    for r in out:
        line = f"{r['size']:12s} {r['features']:14s} {r['device']:6s} library {r['library_ms']:9.2f} ms"
        if 'full_sort_ms' in r: line += (f"   one torch.sort there {r['full_sort_ms']:.2f} ms   reference {r['reference_s']:.1f} s"
                                         f" (x{r['speedup']})   same as CPU {r['same_as_cpu']}   agrees {r['agrees_with_reference']}")
        else: line += f"   peak device memory {r['peak_device_memory_gb']} GB   same as CPU {r['same_as_cpu_on_256_queries']}"
        print(line + f"   mAP {r['mAP']}")
    write_atomic(RESULTS.with_name(f'metrics_{device.type}.json'), json.dumps(dict(device=name, torch=torch.__version__, quick=quick, rows=out), indent=1) + '\n')

# ---------------------------------------------------------------- the report
def fmt(x, unit=' s', digits=3):
    "`x` with `digits` decimals and `unit`, or an empty cell for None"
    return '' if x is None else f'{x:.{digits}f}{unit}'

def table(header, rows):
    "A markdown table"
    return '\n'.join(['| ' + ' | '.join(header) + ' |', '|' + ' --- |' * len(header)] + ['| ' + ' | '.join(map(str, r)) + ' |' for r in rows])

def markdown_report(results):
    "The tables of `results` as markdown (written beside the JSON as metrics.md)"
    c = results.get('config', {})
    out = [f"# benchmarks/metrics.py: results\n\nWritten by `benchmarks/metrics.py` from `metrics.json`: do not edit. torch {c.get('torch')}, "
           f"{c.get('torch_threads')} threads, {c.get('usable_cpus')} usable CPUs, quick={c.get('quick')}; times are medians of repeats. "
           "Load average at the start of each section: " + ', '.join(f"{k} {v['load_average_at_start']}" for k, v in c.get('sections', {}).items()) + '.']
    if 'market' in results:
        out += ['## Market-1501 size, distance matrix given', table(
            ['distances', 'library', '1 thread', 'one `torch.sort`', 'reference (numpy, per query)', 'torchreid Cython', 'speed-up over Cython', 'mAP', 'agrees'],
            [[r['distances'], fmt(r['library_s']), fmt(r['library_1_thread_s']), fmt(r['full_sort_s']),
              f"{fmt(r['reference_s'], digits=2)} ({r['reference_queries']} queries)", fmt(r['cython_s'], digits=2),
              '' if r['speedup_cython'] is None else f"x{r['speedup_cython']}", r['mAP'], r['agrees_with_reference']] for r in results['market'].values()])]
    if 'sweep' in results:
        w = results['sweep']
        out += ['## Sweep over distributions, Market-1501 size', f"{w['n_cases']} cases: median **{fmt(w['median_s'])}**, worst **{fmt(w['worst_s'])}** "
                f"(`{w['worst_case']}`); one `torch.sort` of a float32 matrix {fmt(w['full_sort_s'])}, of a float64 one {fmt(w['full_sort_float64_s'])}; "
                f"all agree with the reference on sampled queries: {w['all_agree_with_reference']}.",
                table(['case', 'dimension', 'clusters', 'camera', 'dtype', 'mAP', 'library'],
                      [[k, r['dim'], r['spread'], r['camera'], r['dtype'], r['mAP'], fmt(r['library_s'])] for k, r in w['cases'].items()])]
    if 'busy' in results:
        out += ['## One competing CPU-bound process', table(
            ['distances', 'idle', 'busy', 'idle, 1 thread', 'busy, 1 thread', 'busy / idle', 'busy / idle 1 thread', 'Cython idle', 'Cython busy'],
            [[r['distances'], fmt(r['idle_s']), fmt(r['busy_s']), fmt(r['idle_1_thread_s']), fmt(r['busy_1_thread_s']), r['busy_over_idle'],
              r['busy_over_idle_1_thread'], fmt(r.get('cython_idle_s'), digits=2), fmt(r.get('cython_busy_s'), digits=2)] for r in results['busy'].values()])]
    if 'tricks' in results:
        t = results['tricks']
        out += ['## The engine\'s low-level choices (one thread, 1M distances)', table(['step', 'as the engine does it', 'the plain way'],
            [[f"flat indices of set entries, {v['fraction_set']:.1%} set", f"numpy flatnonzero {v['numpy_flatnonzero_ms']} ms", f"torch nonzero {v['torch_nonzero_ms']} ms"]
             for k, v in t.items() if k.startswith('where_true')] + [['distance to bin', f"float bits {t['bins']['float_bits_ms']} ms", f"cast {t['bins']['cast_ms']} ms"]])]
    if 'msmt' in results:
        r = results['msmt']
        out += ['## MSMT17 size, from 2048-d features', table(['queries', 'gallery', 'library', 'reference (extrapolated)', 'peak RSS', 'RSS after making the features', 'mAP'],
            [[r['queries'], r['gallery'], fmt(r['library_s'], digits=1), f"{fmt(r['reference_s'], digits=1)} ({r['reference_queries']} queries)",
              fmt(r['peak_rss_gb'], ' GB', 2), fmt(r['rss_after_features_gb'], ' GB', 2), r['mAP']]])]
    return '\n\n'.join(out) + '\n'

# ---------------------------------------------------------------- the CPU run
def write_atomic(fn, text):
    "`text` into `fn` through a temporary file in the same folder (the library's `atomic_write`)"
    atomic_write(fn, lambda f: f.write(text.encode()))

def write_results(results):
    "`results` as JSON in RESULTS, and its tables as markdown beside it"
    write_atomic(RESULTS, json.dumps(results, indent=1) + '\n')
    write_atomic(RESULTS.with_suffix('.md'), markdown_report(results))

def run_cpu(quick, only):
    results = json.loads(RESULTS.read_text()) if only and RESULTS.exists() else {}
    names = only or list(SECTIONS)
    results['config'] = dict(results.get('config', {}), torch=torch.__version__, numpy=np.__version__, torch_threads=torch.get_num_threads(),
                             cpus=os.cpu_count(), usable_cpus=len(os.sched_getaffinity(0)), quick=quick,
                             cython_evaluator=cython_evaluator() is not None)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; times are medians of repeats; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        load, t = os.getloadavg()[0], time.perf_counter()
        results[name] = SECTIONS[name](quick)
        results['config'].setdefault('sections', {})[name] = dict(load_average_at_start=round(load, 2), seconds=round(time.perf_counter() - t),
                                                                 date=time.strftime('%Y-%m-%d %H:%M'))
        write_results(results)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}; results in {RESULTS}")

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer cases and repeats, sampled baselines, MSMT17 on 1,024 queries')
    ap.add_argument('--only', default='', help=f"comma-separated sections among {', '.join(SECTIONS)} (default: all)")
    ap.add_argument('--device', default='cpu', help="'cpu' (the full CPU benchmark) or a GPU, e.g. 'cuda'")
    ap.add_argument('--report', action='store_true', help='only rewrite results/metrics.md from results/metrics.json')
    ap.add_argument('--msmt-child', type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.msmt_child: msmt_child(a.msmt_child); sys.exit()
    if a.report: write_results(json.loads(RESULTS.read_text())); sys.exit()
    only = [s for s in a.only.split(',') if s]
    if bad := [s for s in only if s not in SECTIONS]: sys.exit(f"--only: unknown section {bad[0]!r}; expected some of {', '.join(SECTIONS)}")
    if a.device != 'cpu': run_device(torch.device(a.device), a.quick)
    else: run_cpu(a.quick, only)
