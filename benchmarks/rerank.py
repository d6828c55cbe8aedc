"""Benchmark of `fastreid_rollback.retrieval.reid_rerank` against the reference k-reciprocal re-ranking (torchreid's `re_ranking`).

    .venv/bin/python benchmarks/rerank.py            # Market-1501 size, about 3 minutes on the 2-core CPU, 9 GB for the reference
    .venv/bin/python benchmarks/rerank.py --quick    # a quarter of Market-1501 size (842 x 3,978)

Market-1501 size: 3,368 queries x 15,913 gallery images, 2048-d trained-like features (identity centres in a
64-d subspace, a camera offset, noise; `benchmarks/metrics.py` makes them, here noisier: mAP about 0.3 before
re-ranking), cosine distance, k1=20, k2=6, lambda_value=0.3. Each side runs in a child process of its own, so that its peak resident memory (VmHWM) is its
own: the library from the features (median of repeats, with torch's threads and with one; CPU
time too, which moves less than wall time on a shared machine), the reference from the same features through
`reid_dist`'s three distance matrices (query x gallery, query x query, gallery x gallery; timed apart) and
`re_ranking` (once: it takes a minute). The reference is torchreid's own `re_ranking` when torchreid or
pyppbox-torchreid is installed, else the numpy reference of the tests (`tests/reference_rerank.py`, the same
results bit for bit where torchreid is installed). Both results are compared: largest difference of the
re-ranked distances, and mAP, mINP and CMC.

Writes benchmarks/results/rerank.json and prints a table. `rerank_rows(quick)` gives the same rows to
`benchmarks/metrics.py`.
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path
import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent/'tests')]
from metrics import MARKET, make_ids, make_feats, peak_rss_gb
from fastreid_rollback.metrics import reid_dist, reid_metrics, reid_metrics_from_dist
from fastreid_rollback.retrieval import reid_rerank
from fastreid_rollback.model import atomic_write

SETTINGS = dict(k1=20, k2=6, lambda_value=0.3)
SIGMA = 4.0   # noisier than metrics.py's 2.9 (mAP 0.81, re-ranked 1.0): re-ranking must not reach mAP 1, or comparing mAPs shows nothing

def problem(quick):
    "Market-size (or a quarter of it) trained-like features and ids, the same in every process"
    size = {**MARKET, 'sigma': SIGMA, **({k: MARKET[k] // 4 for k in ('nq', 'n_ids', 'n_id_imgs', 'n_distractors')} if quick else {})}
    g = torch.Generator().manual_seed(0)
    ids = make_ids(g, **size)
    return (*make_feats(g, ids, kind='trained-like', **size), *ids)

# ---------------------------------------------------------------- the two sides, each in a child process
def library_child(quick, out):
    qf, gf, *ids = problem(quick)
    rss_feats = peak_rss_gb()
    def times():
        ts, cs = [], []
        for _ in range(1 if quick else 3):
            t, c = time.perf_counter(), time.process_time()
            d = reid_rerank(qf, gf, **SETTINGS)
            ts.append(time.perf_counter() - t); cs.append(time.process_time() - c)
        return ts, cs, d
    ts, _, d = times()
    n = torch.get_num_threads(); torch.set_num_threads(1)                 # one thread: what a busy machine leaves
    ts1, cs1, _ = times()
    torch.set_num_threads(n)
    np.save(out, d.numpy())
    return dict(seconds=float(np.median(ts)), all_seconds=[round(t, 2) for t in ts], one_thread_seconds=float(np.median(ts1)),
                one_thread_cpu_seconds=float(np.median(cs1)), rss_after_features_gb=rss_feats, peak_rss_gb=peak_rss_gb())

def reference_child(quick, out):
    from reference_rerank import rerank_reference, torchreid_re_ranking
    re_ranking = torchreid_re_ranking()
    qf, gf, *ids = problem(quick)
    rss_feats = peak_rss_gb()
    t = time.perf_counter()
    d = [reid_dist(a, b).numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf))]
    t_dist = time.perf_counter() - t
    t, c = time.perf_counter(), time.process_time()
    r = (re_ranking or rerank_reference)(*d, **SETTINGS)
    t_rr, c_rr = time.perf_counter() - t, time.process_time() - c
    np.save(out, r)
    return dict(seconds=t_dist + t_rr, distances_seconds=t_dist, re_ranking_seconds=t_rr, re_ranking_cpu_seconds=c_rr, rss_after_features_gb=rss_feats,
                peak_rss_gb=peak_rss_gb(), implementation="torchreid's re_ranking" if re_ranking else 'tests/reference_rerank.py')

def run_child(side, quick, out):
    "Run one side in a fresh process; its JSON line"
    cmd = [sys.executable, __file__, '--child', side, '--out', str(out)] + ['--quick'] * quick
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode: raise RuntimeError(f"{side} child failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])

# ---------------------------------------------------------------- comparison
def rerank_rows(quick=False):
    "Rows of the re-ranking benchmark (library and reference at Market-1501 size, or a quarter of it): for `benchmarks/metrics.py`"
    with tempfile.TemporaryDirectory() as tmp:
        lib, ref = run_child('library', quick, Path(tmp)/'lib.npy'), run_child('reference', quick, Path(tmp)/'ref.npy')
        dl, dr = np.load(Path(tmp)/'lib.npy'), np.load(Path(tmp)/'ref.npy')
    qf, gf, *ids = problem(quick)
    plain, rl, rr = reid_metrics(qf, gf, *ids), reid_metrics_from_dist(torch.from_numpy(dl), *ids), reid_metrics_from_dist(torch.from_numpy(dr), *ids)
    size = 'Market-1501' + (' / 4' if quick else '')
    common = dict(size=size, queries=len(qf), gallery=len(gf), dim=qf.shape[1], **SETTINGS)
    rows = [dict(common, side='library', seconds=round(lib['seconds'], 2), repeats=lib['all_seconds'],
                 one_thread_seconds=round(lib['one_thread_seconds'], 2), one_thread_cpu_seconds=round(lib['one_thread_cpu_seconds'], 2),
                 peak_rss_gb=round(lib['peak_rss_gb'], 2), rss_after_features_gb=round(lib['rss_after_features_gb'], 2),
                 mAP=round(rl.mAP, 4), rank1=round(rl.rank(1), 4), mAP_before=round(plain.mAP, 4), rank1_before=round(plain.rank(1), 4)),
            dict(common, side='reference', implementation=ref['implementation'], seconds=round(ref['seconds'], 2),
                 distances_seconds=round(ref['distances_seconds'], 2), re_ranking_seconds=round(ref['re_ranking_seconds'], 2),
                 re_ranking_cpu_seconds=round(ref['re_ranking_cpu_seconds'], 2),
                 peak_rss_gb=round(ref['peak_rss_gb'], 2), rss_after_features_gb=round(ref['rss_after_features_gb'], 2),
                 mAP=round(rr.mAP, 4), rank1=round(rr.rank(1), 4))]
    rows[0].update(speedup=round(ref['seconds'] / lib['seconds'], 1), speedup_vs_re_ranking_alone=round(ref['re_ranking_seconds'] / lib['seconds'], 1),
                   cpu_ratio_vs_re_ranking_alone=round(ref['re_ranking_cpu_seconds'] / lib['one_thread_cpu_seconds'], 1),
                   max_abs_diff=float(np.abs(dl - dr).max()), mAP_diff=abs(rl.mAP - rr.mAP), mINP_diff=abs(rl.mINP - rr.mINP),
                   cmc_max_diff=float((rl.cmc - rr.cmc).abs().max()))
    return rows

def print_rows(rows):
    for r in rows:
        line = f"{r['size']:16s} {r['side']:9s} {r['seconds']:8.2f} s   peak RSS {r['peak_rss_gb']:5.2f} GB   mAP {r['mAP']:.4f}   rank-1 {r['rank1']:.4f}"
        if r['side'] == 'library':
            line += (f"   (1 thread {r['one_thread_seconds']:.2f} s, {r['one_thread_cpu_seconds']:.1f} CPU s)   (before re-ranking: mAP {r['mAP_before']:.4f}, rank-1 {r['rank1_before']:.4f})   speed-up x{r['speedup']}"
                     f" (x{r['speedup_vs_re_ranking_alone']} against re_ranking alone)   max |difference| {r['max_abs_diff']:.1e},"
                     f" mAP difference {r['mAP_diff']:.1e}, CMC {r['cmc_max_diff']:.1e}")
        else: line += (f"   ({r['implementation']}: distances {r['distances_seconds']:.1f} s + re_ranking {r['re_ranking_seconds']:.1f} s,"
                       f" {r['re_ranking_cpu_seconds']:.1f} CPU s)")
        print(line)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--quick', action='store_true', help='a quarter of Market-1501 size')
    ap.add_argument('--child', choices=['library', 'reference'], help=argparse.SUPPRESS)
    ap.add_argument('--out', help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps((library_child if a.child == 'library' else reference_child)(a.quick, a.out))); sys.exit()
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus; load average {load:.1f}", flush=True)
    rows = rerank_rows(a.quick)
    print_rows(rows)
    doc = dict(torch=torch.__version__, threads=torch.get_num_threads(), cpus=os.cpu_count(), load_average_start=round(load, 2),
               load_average_end=round(os.getloadavg()[0], 2), rows=rows)
    out = HERE/'results'/'rerank.json'
    atomic_write(out, lambda f: f.write(json.dumps(doc, indent=2).encode()))
    print(f"wrote {out}")
