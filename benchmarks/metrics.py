"""Benchmark of fastreid_rollback.metrics against a plain numpy per-query evaluator of the same protocol.

    .venv/bin/python benchmarks/metrics.py            # the full benchmark (several minutes)
    .venv/bin/python benchmarks/metrics.py --quick    # fewer repeats, sampled baselines, MSMT17 on 1,024 queries

Market-1501 size: 3,368 queries x 15,913 gallery (13,120 images of 751 identities + 2,793 distractors),
6 cameras, 2048-d features, distance matrix given; trained-like features (identity centres in a
64-d subspace, a camera offset, isotropic noise tuned so mAP lands in 0.7-0.9), pure random
features (the worst case without ties), and two matrices full of ties: the random distances rounded
to half precision, and all distances equal (a collapsed model). MSMT17 size: 11,659 x 82,161, 3,060 identities, 15 cameras, 2048-d, from
features (chunked), run in a child process so its peak resident memory is its own.

    .venv/bin/python benchmarks/metrics.py --device cuda   # the same problems on the GPU (target: Market under 20 ms)

On a GPU: Market-1501 size with the distance matrix on the GPU (trained-like and random), timed with
the device synchronised, beside one `torch.sort` of the matrix there and the numpy baseline (300 sampled
queries, extrapolated); MSMT17 size from features on the GPU, with the peak GPU memory. Every GPU
result is checked against the same computation on the CPU.
"""
import argparse, json, math, os, resource, subprocess, sys, time
import numpy as np
import torch
import torch.nn.functional as F
from fastreid_rollback.metrics import reid_metrics, reid_metrics_from_dist, reid_dist

MARKET = dict(nq=3368, n_ids=751, n_id_imgs=13120, n_distractors=2793, n_cams=6, dim=2048, sigma=2.9)
MSMT = dict(nq=11659, n_ids=3060, n_id_imgs=82161, n_distractors=0, n_cams=15, dim=2048, sigma=2.8)
# sigma: the noise of the trained-like features, tuned so that mAP is about 0.8

# ---------------------------------------------------------------- the baseline: plain numpy, one query at a time
def numpy_eval(D, qp, gp, qc, gc, max_rank=50):
    "CMC hits, APs and INPs of the Market-1501 protocol, a full stable argsort per query (torchreid's python path)"
    hits, aps, inps = np.zeros(max_rank), [], []
    for q in range(len(D)):
        order = np.argsort(D[q], kind='stable')
        p, c = gp[order], gc[order]
        match = p[(p != -1) & ~((p == qp[q]) & (c == qc[q]))] == qp[q]
        if qp[q] <= 0 or not match.any(): continue
        pos = np.flatnonzero(match)
        if pos[0] < max_rank: hits[pos[0]:] += 1
        aps.append(np.mean(np.arange(1, len(pos) + 1) / (pos + 1))); inps.append(len(pos) / (pos[-1] + 1))
    return hits, np.array(aps), np.array(inps)

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

MARKET_KINDS = ('trained-like', 'random', 'ties: half precision', 'ties: all equal')

def market_dists(g, ids, kind):
    "Market-size distances of `kind`: from trained-like or random features, those rounded to half precision, or all equal (a collapsed model's)"
    if kind == 'ties: all equal': return torch.ones(len(ids[0]), len(ids[1]))
    if kind == 'ties: half precision': return market_dists(g, ids, 'random').half().float()
    return reid_dist(*make_feats(g, ids, kind=kind, **MARKET))

# ---------------------------------------------------------------- timing helpers
def median_time(f, n, device=torch.device('cpu')):
    "Median seconds of `f()` over `n` calls (a GPU `device` synchronised around each call), and the last result"
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    ts = []
    for _ in range(n):
        sync(); t = time.perf_counter(); r = f(); sync(); ts.append(time.perf_counter() - t)
    return float(np.median(ts)), r

def baseline_time(D, ids, idx):
    "Seconds of the numpy baseline on the queries `idx`, and its result there"
    qp, gp, qc, gc = (x.numpy() for x in ids)
    t = time.perf_counter()
    r = numpy_eval(D[idx].numpy(), qp[idx], gp, qc[idx], gc)
    return time.perf_counter() - t, r

def agrees(D, ids, idx, base):
    "The library on the queries `idx` gives the baseline's numbers"
    qp, gp, qc, gc = ids
    r = reid_metrics_from_dist(D[idx], qp[idx], gp, qc[idx], gc)
    hits, aps, inps = base
    return bool(np.allclose(r.cmc.numpy(), hits / len(aps), atol=1e-6) and abs(r.mAP - aps.mean()) < 1e-6
                and abs(r.mINP - inps.mean()) < 1e-6)

# ---------------------------------------------------------------- Market-1501 size
def market(quick, out):
    g = torch.Generator().manual_seed(0)
    ids = make_ids(g, **MARKET)
    reps = 3 if quick else 5
    for kind in MARKET_KINDS:
        D = market_dists(g, ids, kind)
        reid_metrics_from_dist(D, *ids)                                      # warm-up
        t_lib, res = median_time(lambda: reid_metrics_from_dist(D, *ids), reps)
        n_thr = torch.get_num_threads(); torch.set_num_threads(1)     # the same on one thread: robust to a busy machine
        t_lib1, _ = median_time(lambda: reid_metrics_from_dist(D, *ids), reps)
        torch.set_num_threads(n_thr)
        t_sort, _ = median_time(lambda: torch.sort(D, dim=1), 3)
        n_base = 300 if quick or kind != 'trained-like' else len(D)
        idx = np.sort(np.random.default_rng(0).choice(len(D), n_base, replace=False))
        t_b, base = baseline_time(D, ids, idx)
        t_base = t_b * len(D) / n_base
        row = dict(size='Market-1501', features=kind, queries=len(D), gallery=D.shape[1], mAP=round(res.mAP, 4),
                   mINP=round(res.mINP, 4), rank1=round(res.rank(1), 4), library_s=round(t_lib, 3), library_1_thread_s=round(t_lib1, 3),
                   full_sort_s=round(t_sort, 3), numpy_baseline_s=round(t_base, 2),
                   baseline_queries=n_base if n_base < len(D) else 'all', speedup=round(t_base / t_lib, 1),
                   agrees_with_baseline=agrees(D, ids, idx, base))
        print(json.dumps(row), flush=True); out.append(row)
        del D

# ---------------------------------------------------------------- on a GPU
def same_result(a, b, tol=1e-9):
    "Two `ReIDResult`s agree (CMC, mAP and mINP)"
    return bool(torch.allclose(a.cmc, b.cmc, atol=tol) and abs(a.mAP - b.mAP) < tol and abs(a.mINP - b.mINP) < tol)

def market_device(device, quick, out):
    "Market-1501 size, distance matrix on `device`: the library (synchronised) beside one sort there and the numpy baseline"
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
        idx = np.sort(np.random.default_rng(0).choice(len(D), 300, replace=False))
        t_b, base = baseline_time(D, ids, idx)
        t_base = t_b * len(D) / len(idx)
        row = dict(size='Market-1501', features=kind, device=str(device), queries=len(D), gallery=D.shape[1],
                   mAP=round(res.mAP, 4), rank1=round(res.rank(1), 4), library_ms=round(1e3 * t_lib, 2),
                   full_sort_ms=round(1e3 * t_sort, 2), numpy_baseline_s=round(t_base, 2), baseline_queries=len(idx),
                   speedup=round(t_base / t_lib, 1), same_as_cpu=same_result(res, reid_metrics_from_dist(D, *ids)),
                   agrees_with_baseline=agrees(D, ids, idx, base))
        print(json.dumps(row), flush=True); out.append(row)
        del D, Dd

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

def print_device_rows(out):
    for r in out:
        line = f"{r['size']:12s} {r['features']:20s} {r['device']:6s} library {r['library_ms']:9.2f} ms"
        if 'full_sort_ms' in r: line += (f"   one torch.sort there {r['full_sort_ms']:.2f} ms   numpy baseline {r['numpy_baseline_s']:.1f} s"
                                         f" (x{r['speedup']})   same as CPU {r['same_as_cpu']}   agrees with baseline {r['agrees_with_baseline']}")
        else: line += f"   peak device memory {r['peak_device_memory_gb']} GB   same as CPU {r['same_as_cpu_on_256_queries']}"
        print(line + f"   mAP {r['mAP']}")

# ---------------------------------------------------------------- MSMT17 size, in a child process
def peak_rss_gb():
    "Peak resident set of this process (VmHWM: getrusage's ru_maxrss would carry the parent's peak over exec)"
    try:
        with open('/proc/self/status') as f: return next(int(l.split()[1]) for l in f if l.startswith('VmHWM')) / 2**20
    except (OSError, StopIteration): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

def msmt_child(nq, kind):
    "Runs in its own process: features, reid_metrics from features (chunked), time and peak RSS as JSON"
    g = torch.Generator().manual_seed(1)
    qp, gp, qc, gc = make_ids(g, **{**MSMT, 'nq': nq})
    qf, gf = make_feats(g, (qp, gp, qc, gc), kind=kind, **MSMT)
    rss_feats = peak_rss_gb()
    t = time.perf_counter()
    r = reid_metrics(qf, gf, qp, gp, qc, gc)
    t_lib = time.perf_counter() - t
    rss_lib = peak_rss_gb()
    # baseline on a random sample of queries (all of them would take too long): distances row by row, then numpy
    idx = np.sort(np.random.default_rng(0).choice(nq, 40, replace=False))
    qn, gn = F.normalize(qf, dim=1), F.normalize(gf, dim=1)
    t = time.perf_counter()
    for q in idx: numpy_eval((1 - qn[q:q + 1] @ gn.T).numpy(), qp[q:q + 1].numpy(), gp.numpy(), qc[q:q + 1].numpy(), gc.numpy())
    t_base = (time.perf_counter() - t) * nq / len(idx)
    print(json.dumps(dict(mAP=r.mAP, mINP=r.mINP, rank1=r.rank(1), library_s=t_lib, numpy_baseline_s=t_base,
                          baseline_queries=len(idx), rss_after_features_gb=rss_feats,
                          peak_rss_gb=rss_lib)))

def msmt(quick, out):
    nq = 1024 if quick else MSMT['nq']
    res = subprocess.run([sys.executable, __file__, '--msmt-child', str(nq)], capture_output=True, text=True)
    if res.returncode: raise RuntimeError(res.stderr)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    row = dict(size='MSMT17', features='trained-like', queries=nq, gallery=MSMT['n_id_imgs'], mAP=round(r['mAP'], 4),
               mINP=round(r['mINP'], 4), rank1=round(r['rank1'], 4), library_s=round(r['library_s'], 1),
               numpy_baseline_s=round(r['numpy_baseline_s'], 1),
               baseline_queries=f"{r['baseline_queries']} sampled, extrapolated to {nq}",
               speedup=round(r['numpy_baseline_s'] / r['library_s'], 1),
               rss_after_features_gb=round(r['rss_after_features_gb'], 2), peak_rss_gb=round(r['peak_rss_gb'], 2))
    print(json.dumps(row), flush=True); out.append(row)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='fewer repeats, sampled baselines, MSMT17 on 1,024 queries')
    ap.add_argument('--device', default='cpu', help="'cpu' (the full CPU benchmark) or a GPU, e.g. 'cuda'")
    ap.add_argument('--msmt-child', type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.msmt_child: msmt_child(a.msmt_child, 'trained-like'); sys.exit()
    device = torch.device(a.device)
    if device.type != 'cpu':
        if device.type == 'cuda' and not torch.cuda.is_available(): sys.exit("--device cuda: torch sees no CUDA device here")
        name = torch.cuda.get_device_name(device) if device.type == 'cuda' else str(device)
        print(f"torch {torch.__version__} on {name}; library times are medians, device synchronised", flush=True)
        out = []
        market_device(device, a.quick, out); msmt_device(device, a.quick, out)
        print_device_rows(out); sys.exit()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; "
          f"library times are medians of repeats, distance matrix given (Market) or from features (MSMT17); "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    out = []
    market(a.quick, out); msmt(a.quick, out)
    for r in out:
        line = f"{r['size']:12s} {r['features']:20s} library {r['library_s']:8.3f} s   numpy baseline {r['numpy_baseline_s']:8.1f} s ({r['baseline_queries']})   speed-up x{r['speedup']}"
        if 'full_sort_s' in r: line += f"   (1 thread {r['library_1_thread_s']:.3f} s)   one torch.sort of the matrix {r['full_sort_s']:.3f} s   mAP {r['mAP']}"
        else: line += f"   peak RSS {r['peak_rss_gb']} GB   mAP {r['mAP']}"
        print(line)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
