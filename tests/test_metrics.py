"Tests of fastreid_rollback.metrics against an independent per-query reference, and its failure cases"
import json, math
from functools import partial
import numpy as np
import pytest
import torch
from fastreid_rollback.metrics import reid_metrics, reid_metrics_from_dist, reid_dist, ReIDResult, plot_cmc, protocol_mask
from fastreid_rollback.test_utils import fails_with, ref_query, ref_metrics, rand_ids, random_problems, agrees_with_reference, same_result

pytestmark = pytest.mark.usefixtures('one_thread')

def run_ok(f, *args, **kw):
    "The result of `f`, or None when every query is skipped (checked against the reference by the caller)"
    try: return f(*args, **kw)
    except ValueError as e:
        assert 'all' in str(e) and 'skipped' in str(e); return None

# ---------------------------------------------------------------- agreement with the reference
@pytest.mark.parametrize('ap', ['standard', 'trapezoid'])
def test_agrees_with_reference_from_dist(ap):
    n_checked = 0
    for rng, (qp, gp, qc, gc) in random_problems(250, seed=1 if ap == 'standard' else 2):
        D = rng.random((len(qp), len(gp)))              # float64, no ties: sklearn's AP is the standard AP
        if rng.random() < .3: D = D * 7 - 3.5            # negative distances are fine too
        max_rank = int(rng.choice([1, 5, 50, 400]))
        ref = ref_metrics(D, qp, gp, qc, gc, max_rank, ap, sklearn_ap=ap == 'standard')
        res = run_ok(reid_metrics_from_dist, torch.from_numpy(D), qp, gp, qc, gc, max_rank=max_rank, ap=ap)
        if ref[3] == 0: assert res is None; continue
        assert agrees_with_reference(res, ref); assert len(res.cmc) == min(max_rank, len(gp))
        n_checked += 1
    assert n_checked > 150

@pytest.mark.parametrize('dist', ['cosine', 'euclidean'])
def test_agrees_with_reference_from_features(dist):
    for rng, (qp, gp, qc, gc) in random_problems(60, seed=3):
        dim = int(rng.integers(1, 16))
        centres = rng.normal(size=(int(max(qp.max(), gp.max())) + 2, dim))
        qf = centres[qp + 1] + rng.normal(size=(len(qp), dim)) * rng.random() * 3   # identity centres plus noise
        gf = centres[gp + 1] + rng.normal(size=(len(gp), dim)) * rng.random() * 3
        qf, gf = torch.tensor(qf, dtype=torch.float32), torch.tensor(gf, dtype=torch.float32)
        D = reid_dist(qf, gf, dist).double().numpy()
        ref = ref_metrics(D, qp, gp, qc, gc, 20)
        res = run_ok(reid_metrics, qf, gf, torch.tensor(qp), torch.tensor(gp), torch.tensor(qc), torch.tensor(gc),
                     max_rank=20, dist=dist)
        if ref[3] == 0: assert res is None; continue
        assert agrees_with_reference(res, ref)

def test_reid_dist_matches_numpy():
    rng = np.random.default_rng(4)
    q, g = rng.normal(size=(70, 9)), rng.normal(size=(130, 9))
    qn, gn = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(reid_dist(torch.tensor(q), torch.tensor(g)).numpy(), 1 - qn @ gn.T, atol=1e-12)
    eu = np.sqrt(((q[:, None] - g[None]) ** 2).sum(-1))
    np.testing.assert_allclose(reid_dist(torch.tensor(q), torch.tensor(g), 'euclidean').numpy(), eu, atol=1e-9)

# ---------------------------------------------------------------- ties
def test_ties_broken_by_gallery_index_hand_made():
    # query id 1 cam 0; gallery: distances all 0.5 except col 5; true matches at cols 1 and 4 (cams 1, 2)
    D = torch.tensor([[.5, .5, .5, .5, .5, .1]])
    gp, gc = [3, 1, 0, 1, 1, 2], [1, 1, 1, 0, 2, 1]
    # col 3 is removed (same id, same camera); ranked: 5 (0.1), then 0, 1, 2, 4 by index -> true matches at 3 and 5
    r = reid_metrics_from_dist(D, [1], gp, [0], gc, max_rank=6)
    test_cmc = [0, 0, 1, 1, 1, 1]
    assert r.cmc.tolist() == test_cmc
    assert math.isclose(r.mAP, (1/3 + 2/5) / 2) and math.isclose(r.mINP, 2/5)
    # the same distances with the gallery reversed: the order among the ties changes with the gallery order
    rr = reid_metrics_from_dist(D.flip(1), [1], gp[::-1], [0], gc[::-1], max_rank=6)
    # reversed: col 2 removed; ranked: 0 (0.1), then 1, 3, 4, 5 by index -> true matches (cols 1, 4) at 2 and 4
    assert rr.cmc.tolist() == [0, 1, 1, 1, 1, 1] and math.isclose(rr.mAP, (1/2 + 2/4) / 2) and math.isclose(rr.mINP, 2/4)

def check_ties_against_reference(n, seed, device='cpu'):
    "`n` random problems with a few distinct distances (float32 and float64 in turn, some signed) against the reference"
    for k, (rng, (qp, gp, qc, gc)) in enumerate(random_problems(n, seed=seed)):
        D = np.round(rng.random((len(qp), len(gp))) * rng.integers(1, 6)) / 4   # a few distinct values only
        if k % 3 == 1: D = 0.5 - D            # signed distances, with -0.0 beside 0.0 (equal: a tie)
        dtype = torch.float64 if k % 2 else torch.float32
        for ap in ('standard', 'trapezoid'):
            ref = ref_metrics(D, qp, gp, qc, gc, 10, ap)
            res = run_ok(reid_metrics_from_dist, torch.tensor(D, dtype=dtype, device=device), qp, gp, qc, gc, max_rank=10, ap=ap)
            if ref[3] == 0: assert res is None; continue
            assert agrees_with_reference(res, ref)

def test_ties_random_against_reference(): check_ties_against_reference(150, seed=5)

def test_ties_in_large_rows_against_reference():
    rng = np.random.default_rng(11)
    qp, gp, qc, gc = rand_ids(rng, 40, 3000, 80, 4)
    mixed = np.where(rng.random((40, 1)) < .5, rng.random((40, 1)), np.round(rng.random((40, 3000)) * 10) / 10)
    for D in (np.ones((40, 3000)), np.round(rng.random((40, 3000)) * 10) / 10 - .5, rng.integers(0, 65, (40, 3000)) / 64, mixed):
        for dtype in (torch.float32, torch.float64):
            assert agrees_with_reference(reid_metrics_from_dist(torch.tensor(D, dtype=dtype), qp, gp, qc, gc, chunk_size=16),
                        ref_metrics(D, qp, gp, qc, gc))

def test_float64_distances_float32_cannot_tell_apart():
    "float64 distances closer than float32's precision are ranked exactly (the bins, in int32, only need to be monotone)"
    rng = np.random.default_rng(24)
    qp, gp, qc, gc = rand_ids(rng, 30, 500, 20, 3)
    for scale in (1e-12, 1e-7):
        D = 0.5 + rng.integers(0, 50, (30, 500)) * scale             # 50 distinct float64 values, one or a few in float32
        assert agrees_with_reference(reid_metrics_from_dist(torch.tensor(D), qp, gp, qc, gc, chunk_size=7), ref_metrics(D, qp, gp, qc, gc))

def test_row_equal_but_for_an_entry_the_sample_misses():
    "A row of equal distances but for one slightly farther distractor: ranked by distance, not by gallery index"
    D = torch.full((1, 3000), .5); D[0, 1] = .5 + 1e-6               # column 1 is not among the sampled columns
    gp = torch.full((3000,), -1); gp[1] = 0; gp[2:6] = 7            # junk but for a distractor and 4 true matches
    r = reid_metrics_from_dist(D, [7], gp, [0], torch.ones(3000, dtype=torch.long), max_rank=5)
    assert r.cmc.tolist() == [1.] * 5 and r.mAP == 1. and r.mINP == 1.

def test_all_distances_equal():
    qp, gp = torch.tensor([1, 2]), torch.tensor([2, 1, 0, 1, 2])
    qc, gc = torch.zeros(2, dtype=torch.long), torch.ones(5, dtype=torch.long)
    r = reid_metrics(torch.zeros(2, 4), torch.zeros(5, 4), qp, gp, qc, gc, max_rank=5)   # every distance is 1
    ref = ref_metrics(np.ones((2, 5)), qp.numpy(), gp.numpy(), qc.numpy(), gc.numpy(), 5)
    assert agrees_with_reference(r, ref)

# ---------------------------------------------------------------- chunking and the two entry points
def trained_like(seed, nq=150, ng=700, n_ids=60, n_cams=4, dim=32, noise=.8):
    rng = np.random.default_rng(seed)
    qp, gp, qc, gc = rand_ids(rng, nq, ng, n_ids, n_cams)
    centres = rng.normal(size=(n_ids + 4, dim))
    f = lambda p: torch.tensor(centres[p + 1] + noise * rng.normal(size=(len(p), dim)), dtype=torch.float32)
    return f(qp), f(gp), *(torch.tensor(x) for x in (qp, gp, qc, gc))

@pytest.mark.parametrize('protocol', ['market1501', 'cuhk03'])
def test_chunk_size_does_not_change_the_result(protocol):
    qf, gf, *ids = trained_like(6)
    base = reid_metrics(qf, gf, *ids, protocol=protocol)
    for cs in (1, 7, 64, 100, 149, 1000):
        assert same_result(base, reid_metrics(qf, gf, *ids, protocol=protocol, chunk_size=cs))
    D = reid_dist(qf, gf)
    for cs in (None, 1, 13, 150):
        assert same_result(base, reid_metrics_from_dist(D, *ids, protocol=protocol, chunk_size=cs))

def test_threads_do_not_change_the_result():
    "On CPU the chunks are spread over torch's threads, each chunk on one: the numbers of one thread, the setting restored"
    qf, gf, *ids = trained_like(19, nq=300)
    D = reid_dist(qf, gf)
    D[::7, ::3] = D[::7, ::3].half().float()                     # ties in some rows
    runs = lambda: [f(*ids, protocol=p, chunk_size=cs) for p in ('market1501', 'cuhk03')
                    for f, cs in ((partial(reid_metrics_from_dist, D), 16), (partial(reid_metrics, qf, gf), 64))]
    base = runs()
    bad = D.clone(); bad[250, 3] = math.nan                      # in a late chunk
    torch.set_num_threads(2)
    try:
        for a, b in zip(base, runs()): assert same_result(a, b)
        fails_with(lambda: reid_metrics_from_dist(bad, *ids, chunk_size=16), contains='distmat')
        assert torch.get_num_threads() == 2
    finally: torch.set_num_threads(1)

@pytest.mark.parametrize('dist', ['cosine', 'euclidean'])
def test_from_features_equals_from_dist(dist):
    qf, gf, *ids = trained_like(7)
    for ap in ('standard', 'trapezoid'):
        assert same_result(reid_metrics(qf, gf, *ids, dist=dist, ap=ap, chunk_size=33),
                    reid_metrics_from_dist(reid_dist(qf, gf, dist), *ids, ap=ap))

def test_non_contiguous_and_half_distances():
    qf, gf, *ids = trained_like(18, nq=40, ng=120)
    D = reid_dist(qf, gf)
    assert same_result(reid_metrics_from_dist(D, *ids), reid_metrics_from_dist(D.T.contiguous().T, *ids, chunk_size=9))
    Dh = D.half()                                        # half precision is evaluated in float32 (many ties)
    assert agrees_with_reference(reid_metrics_from_dist(Dh, *ids), ref_metrics(Dh.double().numpy(), *(x.numpy() for x in ids)))

def test_numpy_and_list_inputs():
    qf, gf, qp, gp, qc, gc = trained_like(8, nq=20, ng=60)
    base = reid_metrics(qf, gf, qp, gp, qc, gc)
    assert same_result(base, reid_metrics(qf.numpy(), gf.numpy(), qp.numpy(), gp.tolist(), qc.tolist(), gc.numpy()))
    assert same_result(base, reid_metrics_from_dist(reid_dist(qf, gf).numpy(), qp.tolist(), gp.numpy(), qc, gc))

def test_float64_features_and_integer_distances():
    qf, gf, *ids = trained_like(9, nq=30, ng=90)
    r64 = reid_metrics(qf.double(), gf.double(), *ids)
    D = reid_dist(qf.double(), gf.double()).numpy()
    assert agrees_with_reference(r64, ref_metrics(D, *(x.numpy() for x in ids)))
    Di = torch.randint(0, 4, (30, 90))                  # integer distances (many ties) are accepted
    assert agrees_with_reference(reid_metrics_from_dist(Di, *ids), ref_metrics(Di.double().numpy(), *(x.numpy() for x in ids)))

# ---------------------------------------------------------------- protocol details
def test_skipped_queries_and_max_rank_clamped():
    D = torch.tensor([[.3, .1, .2], [.1, .2, .3], [.5, .5, .1]])
    qp, gp, qc, gc = [1, 2, 0], [1, 1, 2], [0, 0, 0], [1, 0, 0]
    r = reid_metrics_from_dist(D, qp, gp, qc, gc, max_rank=10)
    # query 0: col 1 removed (same id, same cam); col 0 true match; valid gallery by distance: 2, 0 -> rank 2
    # query 1: col 2 removed, no true match left: skipped; query 2 is a distractor query: skipped
    assert (r.n_valid, r.n_skipped) == (1, 2)
    assert r.cmc.tolist() == [0., 1., 1.]                              # the curve stops at the gallery size
    assert r.mAP == .5 and r.mINP == .5 and r.rank(10) == 1. and r.as_dict()['rank10'] == 1.
    fails_with(lambda: r.rank(11), contains='max_rank')

def test_junk_removed_and_distractors_negative():
    D = torch.tensor([[.1, .2, .3]])
    r = reid_metrics_from_dist(D, [1], [-1, 0, 1], [0], [1, 1, 1], max_rank=3)
    assert r.cmc.tolist() == [0., 1., 1.]                # junk (col 0) gone, distractor (col 1) ranks first

def test_all_skipped_is_an_error():
    fails_with(lambda: reid_metrics_from_dist(torch.rand(2, 3), [5, 6], [1, 2, 3], [0, 0], [1, 1, 1]), contains='skipped')
    fails_with(lambda: reid_metrics_from_dist(torch.rand(2, 3), [1, 2], [1, 2, 3], [0, 0], [0, 0, 0]), contains='skipped')
    fails_with(lambda: reid_metrics_from_dist(torch.rand(2, 3), [1, 2], [-1, 0, 0], [0, 0], [0, 1, 1]), contains='skipped')

# ---------------------------------------------------------------- cuhk03
def poisson_binomial_cdf(ps, m):
    "P(sum of independent Bernoulli(ps) <= m)"
    dist = np.zeros(len(ps) + 1); dist[0] = 1
    for p in ps: dist[1:] = dist[1:] * (1 - p) + dist[:-1] * p; dist[0] *= 1 - p
    return dist[:m + 1].sum() if m >= 0 else 0.

def cuhk03_expected_cmc(D, qp, gp, qc, gc, max_rank):
    "Exact expectation of the single-gallery-shot CMC, from its definition (one query at a time)"
    cmc, nv = np.zeros(max_rank), 0
    for q in range(len(D)):
        ok = (gp != -1) & ~((gp == qp[q]) & (gc == qc[q]))
        pos = np.nonzero(ok & (gp == qp[q]) & (qp[q] > 0))[0]
        if not len(pos): continue
        nv += 1
        ahead = lambda g, p: D[q, g] < D[q, p] or (D[q, g] == D[q, p] and g < p)
        others = [np.nonzero(ok & (gp == k))[0] for k in np.unique(gp[ok]) if k > 0 and k != qp[q]]
        for p in pos:                                    # the drawn true match, uniform among the true matches
            n_dis = sum(ahead(g, p) for g in np.nonzero(gp == 0)[0])
            ps = [np.mean([ahead(g, p) for g in grp]) for grp in others]
            cmc += np.array([poisson_binomial_cdf(ps, m - 1 - n_dis) for m in range(1, max_rank + 1)]) / len(pos)
    return cmc / nv

def test_cuhk03_agrees_with_its_definition():
    rng = np.random.default_rng(10)
    qp, gp, qc, gc = rand_ids(rng, 12, 80, 8, 3)
    D = torch.rand(12, 80, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    D[torch.tensor((gp[None] == qp[:, None]) & (gc[None] == qc[:, None]))] = 0   # removed images are the closest: drawing one shows
    exp = cuhk03_expected_cmc(D.numpy(), qp, gp, qc, gc, 8)
    runs = [reid_metrics_from_dist(D, qp, gp, qc, gc, max_rank=8, protocol='cuhk03', seed=s) for s in range(300)]
    mean = torch.stack([r.cmc for r in runs]).double().mean(0).numpy()
    n = runs[0].n_valid * 10 * len(runs)                  # draws
    se = np.sqrt(np.clip(exp * (1 - exp), 1e-4, None) / n)
    assert np.all(np.abs(mean - exp) < 5 * se + 1e-9), (mean, exp)
    # mAP and mINP are the Market-1501 ones (computed on the whole valid gallery)
    m = reid_metrics_from_dist(D, qp, gp, qc, gc, max_rank=8)
    assert runs[0].mAP == m.mAP and runs[0].mINP == m.mINP and runs[0].n_valid == m.n_valid

def test_cuhk03_seeded():
    qf, gf, *ids = trained_like(11, noise=2.)
    a, b = (reid_metrics(qf, gf, *ids, protocol='cuhk03', seed=3) for _ in range(2))
    assert same_result(a, b)
    assert not torch.equal(a.cmc, reid_metrics(qf, gf, *ids, protocol='cuhk03', seed=4).cmc)

def test_cuhk03_one_image_per_identity_is_market():
    rng = np.random.default_rng(12)
    gp = np.concatenate([rng.permutation(np.arange(1, 41)), np.zeros(10, int)])   # one image per id + distractors
    gc, qp, qc = np.ones(50, int), rng.integers(1, 45, 30), np.zeros(30, int)
    D = torch.rand(30, 50, dtype=torch.float64)
    assert same_result(reid_metrics_from_dist(D, qp, gp, qc, gc, protocol='cuhk03'), reid_metrics_from_dist(D, qp, gp, qc, gc))

# ---------------------------------------------------------------- the result object and the plot
def test_result_api():
    qf, gf, *ids = trained_like(13)
    r = reid_metrics(qf, gf, *ids, max_rank=8)
    assert isinstance(r, ReIDResult) and r.cmc.dtype == torch.float64 and r.cmc.shape == (8,)
    assert bool((r.cmc[1:] >= r.cmc[:-1]).all()) and 0 <= r.rank(1) <= r.rank(8) <= 1
    d = r.as_dict()
    assert set(d) == {'mAP', 'mINP', 'rank1', 'rank5', 'n_valid', 'n_skipped'} and json.loads(json.dumps(d)) == d
    assert 'mAP=' in repr(r) and 'rank1=' in repr(r) and "protocol='market1501'" in repr(r)
    fails_with(lambda: r.rank(9), contains='k'); fails_with(lambda: r.rank(0), contains='k')

def test_plot_cmc():
    import matplotlib; matplotlib.use('Agg')
    qf, gf, *ids = trained_like(14)
    a, b = reid_metrics(qf, gf, *ids), reid_metrics(qf, gf, *ids, dist='euclidean')
    ax = plot_cmc(a, b, labels=['cos', 'l2'])
    assert [l.get_label() for l in ax.get_lines()] == ['cos', 'l2']
    np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), a.cmc.numpy())
    fails_with(lambda: plot_cmc(), contains='results')
    fails_with(lambda: plot_cmc(a, labels=['x', 'y']), contains='labels')
    fails_with(lambda: plot_cmc(a, 3), contains='results')

# ---------------------------------------------------------------- the protocol as a mask
def test_protocol_mask_is_the_valid_gallery():
    for rng, (qp, gp, qc, gc) in random_problems(60, seed=20):
        m = protocol_mask(torch.tensor(qp), torch.tensor(gp), torch.tensor(qc), torch.tensor(gc))
        assert m.shape == (len(qp), len(gp)) and m.dtype == torch.bool
        for q in range(len(qp)): assert m[q].nonzero().squeeze(1).tolist() == ref_query(np.zeros(len(gp)), qp[q], qc[q], gp, gc)[2].tolist()
    assert torch.equal(protocol_mask(list(qp), gp, qc.tolist(), gc), m)   # lists and numpy arrays

def test_protocol_mask_leaves_out_what_the_metrics_ignore():
    for rng, (qp, gp, qc, gc) in random_problems(60, seed=21):
        D = torch.tensor(np.round(rng.random((len(qp), len(gp))) * 8) / 8)
        res = run_ok(reid_metrics_from_dist, D, qp, gp, qc, gc, max_rank=10)
        if res is None: continue
        m = protocol_mask(qp, gp, qc, gc)
        for fill in (0, 2): assert same_result(reid_metrics_from_dist(D.masked_fill(~m, fill), qp, gp, qc, gc, max_rank=10), res)

def test_protocol_mask_errors():
    fails_with(lambda: protocol_mask([1, 2], [1, 2], [0], [0, 0]), contains='q_camids')
    fails_with(lambda: protocol_mask([1, 2], [1, 2], [0, 0], [0]), contains='g_camids')
    fails_with(lambda: protocol_mask([[1, 2]], [1, 2], [0, 0], [0, 0]), contains='q_pids')
    fails_with(lambda: protocol_mask([1, 2], [1.5, 2], [0, 0], [0, 0]), contains='g_pids')
    fails_with(lambda: protocol_mask([1, 2], [-2, 2], [0, 0], [0, 0]), contains='g_pids')

# ---------------------------------------------------------------- bad input
def test_bad_input_errors():
    qf, gf, qp, gp, qc, gc = trained_like(15, nq=10, ng=30)
    D = reid_dist(qf, gf)
    f = lambda **kw: reid_metrics(**{**dict(query_feats=qf, gallery_feats=gf, q_pids=qp, g_pids=gp, q_camids=qc, g_camids=gc), **kw})
    fd = lambda **kw: reid_metrics_from_dist(**{**dict(distmat=D, q_pids=qp, g_pids=gp, q_camids=qc, g_camids=gc), **kw})
    # length mismatches between features (or distances) and ids
    for name, bad in (('q_pids', qp[:-1]), ('g_pids', gp[:-1]), ('q_camids', qc[1:]), ('g_camids', torch.cat([gc, gc]))):
        fails_with(lambda: f(**{name: bad}), contains=name); fails_with(lambda: fd(**{name: bad}), contains=name)
    # feature dimension mismatch, wrong ranks
    fails_with(lambda: f(gallery_feats=gf[:, :5]), contains='feature dimension')
    fails_with(lambda: f(query_feats=qf[0]), contains='query_feats')
    fails_with(lambda: fd(distmat=D[0]), contains='distmat')
    # NaN or inf in features or distances
    for bad in (math.nan, math.inf):
        q2, g2, D2 = qf.clone(), gf.clone(), D.clone()
        q2[3, 1] = bad; g2[7, 0] = bad; D2[2, 5] = bad
        fails_with(lambda: f(query_feats=q2), contains='query_feats')
        fails_with(lambda: f(gallery_feats=g2), contains='gallery_feats')
        fails_with(lambda: fd(distmat=D2), contains='distmat')
        fails_with(lambda: reid_dist(q2, gf), contains='query_feats')
    fails_with(lambda: f(query_feats=qf * 1e30, gallery_feats=gf * 1e30, dist='euclidean'), contains='query_feats')  # overflow
    # empty query or gallery
    fails_with(lambda: f(query_feats=qf[:0], q_pids=qp[:0], q_camids=qc[:0]), contains='query_feats')
    fails_with(lambda: f(gallery_feats=gf[:0], g_pids=gp[:0], g_camids=gc[:0]), contains='gallery_feats')
    fails_with(lambda: fd(distmat=D[:, :0], g_pids=gp[:0], g_camids=gc[:0]), contains='distmat')
    fails_with(lambda: fd(distmat=D[:0], q_pids=qp[:0], q_camids=qc[:0]), contains='distmat')
    # non-integer ids
    for name, x in (('q_pids', qp), ('g_pids', gp), ('q_camids', qc), ('g_camids', gc)):
        fails_with(lambda: f(**{name: x.float()}), contains=name)
        fails_with(lambda: fd(**{name: x.bool()}), contains=name)
        fails_with(lambda: fd(**{name: ['a'] * len(x)}), contains=name)
        fails_with(lambda: fd(**{name: x[None]}), contains=name)
    fails_with(lambda: fd(g_pids=gp - 5), contains='g_pids')
    # max_rank, options, chunk_size, seed
    for mr in (0, -1, 2.5, True, '5'): fails_with(lambda: fd(max_rank=mr), contains='max_rank')
    fails_with(lambda: f(dist='cos'), contains='dist'); fails_with(lambda: reid_dist(qf, gf, 'l1'), contains='dist')
    fails_with(lambda: f(protocol='market'), contains='protocol'); fails_with(lambda: fd(protocol=None), contains='protocol')
    fails_with(lambda: f(ap='interpolated'), contains='ap'); fails_with(lambda: fd(ap='Standard'), contains='ap')
    fails_with(lambda: fd(chunk_size=0), contains='chunk_size'); fails_with(lambda: f(chunk_size=1.5), contains='chunk_size')
    fails_with(lambda: fd(seed='a'), contains='seed')
    fails_with(lambda: f(query_feats='x'), contains='query_feats')
    fails_with(lambda: fd(distmat=D.bool()), contains='distmat')

# ---------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_agrees_with_reference():
    for rng, (qp, gp, qc, gc) in random_problems(40, seed=16):
        D = rng.random((len(qp), len(gp)))
        ref = ref_metrics(D, qp, gp, qc, gc, 20, sklearn_ap=True)
        res = run_ok(reid_metrics_from_dist, torch.tensor(D, device='cuda'), qp, gp, qc, gc, max_rank=20)
        if ref[3] == 0: assert res is None; continue
        assert agrees_with_reference(res, ref)
    qf, gf, *ids = trained_like(17)
    D = reid_dist(qf.cuda(), gf.cuda())
    assert agrees_with_reference(reid_metrics(qf.cuda(), gf.cuda(), *ids, chunk_size=50), ref_metrics(D.double().cpu().numpy(), *(x.numpy() for x in ids)))
    for protocol in ('market1501', 'cuhk03'):             # the draws do not depend on the device
        assert same_result(reid_metrics_from_dist(D.cpu(), *ids, protocol=protocol), reid_metrics_from_dist(D, *ids, protocol=protocol),
                           tol=1e-12)                    # the means are reduced in another order there
    check_ties_against_reference(40, seed=18, device='cuda')
    m = protocol_mask(*(x.cuda() for x in ids))
    assert m.is_cuda and torch.equal(m.cpu(), protocol_mask(*ids))

# ---------------------------------------------------------------- argument checking, property-based
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

examples = settings(max_examples=150, deadline=None)
odd_values = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=4),
                       st.sampled_from(['cosine', 'euclidean', 'market1501', 'cuhk03', 'standard', 'trapezoid']),
                       st.lists(st.integers(-3, 3), max_size=3), st.integers(-5, 5).map(np.int64),
                       st.integers(-5, 5).map(torch.tensor), st.just(torch.tensor([1, 2])), st.just(object()))

def valid_problem(nq=6, ng=20, dim=4):
    "Features and ids where every query has true matches (identities 1-5, the queries on a camera of their own)"
    g = torch.Generator().manual_seed(nq * ng)
    qp, gp = torch.arange(nq) % 5 + 1, torch.arange(ng) % 5 + 1
    return torch.randn(nq, dim, generator=g), torch.randn(ng, dim, generator=g), qp, gp, torch.full((nq,), 9), torch.arange(ng) % 3

def ok_or_names(f, name):
    "`f()`'s result, or None after a ValueError whose message names `name`; any other exception fails the test"
    try: return f()
    except ValueError as e: assert name in str(e), (name, str(e)); return None

@examples
@given(name=st.sampled_from(['max_rank', 'chunk_size', 'seed', 'protocol', 'ap', 'dist']), value=odd_values)
def test_any_option_gives_a_result_or_an_error_naming_it(name, value):
    qf, gf, *ids = valid_problem(12, 40)
    r = ok_or_names(lambda: reid_metrics(qf, gf, *ids, **{name: value}), name)
    if r is None: return
    assert isinstance(r, ReIDResult) and 0 <= r.mAP <= 1 and len(r.cmc) <= 40
    if name == 'max_rank': assert len(r.cmc) == min(int(value), 40) and r.rank(int(value)) == r.cmc[-1]

dtypes = st.sampled_from(['int8', 'int16', 'int32', 'int64', 'uint8', 'float16', 'float32', 'float64', 'bool', 'complex64'])

@st.composite
def arrays(draw, shape):
    "A numpy array of about `shape` (or another rank), any dtype; small integers or any values of the dtype"
    dt = np.dtype(draw(dtypes))
    shapes = st.one_of(st.just(shape), hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=max(shape) + 2))
    small_ints = st.integers(0 if dt.kind == 'u' else -3, 5)
    return draw(hnp.arrays(dt, draw(shapes), elements=small_ints if dt.kind in 'iu' and draw(st.booleans()) else None))

def as_kind(a, kind):
    "`a` as a numpy array, a tensor or a nested list"
    return a if kind == 'numpy' else torch.from_numpy(a) if kind == 'tensor' else a.tolist()

@examples
@given(name=st.sampled_from(['q_pids', 'g_pids', 'q_camids', 'g_camids']), data=st.data(), kind=st.sampled_from(['numpy', 'tensor', 'list']))
def test_any_ids_give_a_result_or_an_error_naming_them(name, data, kind):
    qf, gf, qp, gp, qc, gc = valid_problem()
    ids = dict(q_pids=qp, g_pids=gp, q_camids=qc, g_camids=gc)
    ids[name] = as_kind(data.draw(arrays((6 if name[0] == 'q' else 20,))), kind)
    for f in (lambda: reid_metrics(qf, gf, **ids), lambda: reid_metrics_from_dist(reid_dist(qf, gf), **ids)):
        r = ok_or_names(f, name)                          # "all queries skipped" names all four
        if r is not None: assert isinstance(r, ReIDResult) and 0 <= r.mAP <= 1

@examples
@given(name=st.sampled_from(['query_feats', 'gallery_feats', 'distmat']), data=st.data(), kind=st.sampled_from(['numpy', 'tensor', 'list']))
def test_any_matrix_gives_a_result_or_an_error_naming_it(name, data, kind):
    qf, gf, *ids = valid_problem()
    args = dict(query_feats=qf, gallery_feats=gf) if name != 'distmat' else dict(distmat=reid_dist(qf, gf))
    args[name] = as_kind(data.draw(arrays(tuple(args[name].shape))), kind)
    f = reid_metrics if name != 'distmat' else reid_metrics_from_dist
    r = ok_or_names(lambda: f(**args, q_pids=ids[0], g_pids=ids[1], q_camids=ids[2], g_camids=ids[3]), name)
    if r is not None: assert isinstance(r, ReIDResult) and 0 <= r.mAP <= 1

def test_max_rank_beyond_the_gallery_and_the_meta_device():
    qf, gf, *ids = trained_like(23, nq=10, ng=30)
    r = reid_metrics(qf, gf, *ids, max_rank=10**9)       # capped at the gallery size, not 8 GB of CMC
    assert len(r.cmc) == 30 and r.cmc[-1] == 1 and r.rank(10**9) == 1 and r.max_rank == 10**9
    fails_with(lambda: reid_metrics(qf.to('meta'), gf, *ids), contains='query_feats')
    fails_with(lambda: reid_metrics_from_dist(reid_dist(qf, gf).to('meta'), *ids), contains='distmat')
    fails_with(lambda: reid_metrics(qf, gf, ids[0].to('meta'), *ids[1:]), contains='q_pids')
    fails_with(lambda: reid_metrics_from_dist(reid_dist(qf, gf).to_sparse(), *ids), contains='distmat')
