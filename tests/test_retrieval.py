"Tests of fastreid_rollback.retrieval against straightforward references of the papers' formulas (tests/reference_rerank.py)"
import numpy as np
import pytest
import torch
from fastreid_rollback.test_utils import fails_with
from fastreid_rollback.metrics import reid_dist, reid_metrics, reid_metrics_from_dist
from fastreid_rollback.retrieval import (reid_rerank, aqe, dba, reid_roc, reid_roc_from_dist, ReIDROC, plot_roc,
                                         postprocessed_metrics, postprocess_names)
from reference_rerank import (rerank_reference, scaled_sq_dists, aqe_reference, dba_reference, tpr_at_fpr_reference,
                              torchreid_re_ranking)

pytestmark = pytest.mark.usefixtures('one_thread')

# ---------------------------------------------------------------- problems
def clustered(rng, nq, ng, dim, n_ids, n_cams=3, noise=1., offset=.3):
    "Float32 features around identity centres with a camera offset, and their ids (queries in camera 0 or any)"
    qp, gp = rng.integers(1, n_ids + 1, nq), rng.integers(0, n_ids + 1, ng)
    qc, gc = rng.integers(0, n_cams, nq), rng.integers(0, n_cams, ng)
    centres, offsets = rng.normal(size=(n_ids + 1, dim)), rng.normal(size=(n_cams, dim)) * offset
    f = lambda p, c: centres[p] + offsets[c] + rng.normal(size=(len(p), dim)) * noise
    return (torch.tensor(f(qp, qc), dtype=torch.float32), torch.tensor(f(gp, gc), dtype=torch.float32),
            *(torch.tensor(x) for x in (qp, gp, qc, gc)))

def tie_free(qf, gf, dist):
    "Whether the reference's scaled squared distances have no ties within a row"
    d = scaled_sq_dists(*(reid_dist(a, b, dist).numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf))))
    return all(len(np.unique(r)) == len(r) for r in d)

def reference(qf, gf, dist, **kw):
    "The reference re-ranking of `reid_dist`'s distances"
    return rerank_reference(*(reid_dist(a, b, dist).numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf))), **kw)

def same_metrics(a, b, tol=1e-5):
    np.testing.assert_allclose(a.cmc.numpy(), b.cmc.numpy(), atol=tol, rtol=0)
    assert abs(a.mAP - b.mAP) <= tol and abs(a.mINP - b.mINP) <= tol and (a.n_valid, a.n_skipped) == (b.n_valid, b.n_skipped)

def random_settings(rng):
    return dict(k1=int(rng.choice([1, 2, 3, 5, 7, 20, 40])), k2=int(rng.choice([1, 1, 2, 3, 6, 9])),
                lambda_value=float(rng.choice([0., .3, rng.random(), 1.])))

# ---------------------------------------------------------------- re-ranking against the reference
def far_apart(d, gap=1e-5):
    "Whether the values of each row of `d` are at least `gap` apart (rounding cannot reorder them)"
    s = np.sort(d, axis=1)
    return bool((np.diff(s, axis=1) > gap).all())

@pytest.mark.parametrize('dist', ['cosine', 'euclidean'])
def test_rerank_agrees_with_reference(dist):
    "Same distances (to rounding) on every problem; same CMC, mAP and mINP where neither input nor result has ties"
    rng, compared, n = np.random.default_rng(1 if dist == 'cosine' else 2), 0, 0
    while compared < 50:
        nq, ng = int(rng.integers(1, 25)), int(rng.integers(1, 70))        # often fewer images than k1
        qf, gf, qp, gp, qc, gc = clustered(rng, nq, ng, int(rng.integers(2, 12)), int(rng.integers(1, 12)), noise=rng.random() * 2)
        if not tie_free(qf, gf, dist): continue
        kw = random_settings(rng)
        ref = reference(qf, gf, dist, **kw)
        got = reid_rerank(qf, gf, dist=dist, chunk_size=int(rng.integers(1, 100)), **kw)
        assert got.dtype == torch.float32 and got.shape == (nq, ng)
        np.testing.assert_allclose(got.numpy(), ref, atol=2e-6, rtol=0)
        n += 1
        if not far_apart(ref) or not (torch.isin(qp, gp) & (qp > 0)).any(): continue   # e.g. lambda_value=0: many distances are exactly 1
        try: r = reid_metrics_from_dist(torch.from_numpy(ref), qp, gp, qc, gc, max_rank=20)
        except ValueError: continue                                        # every query skipped
        same_metrics(reid_metrics_from_dist(got, qp, gp, qc, gc, max_rank=20), r)
        compared += 1
    assert n < 4 * compared

def test_rerank_agrees_with_reference_trained_like():
    "Clustered features with a camera offset, 2,000 images: the expansion of step 4 and distances outside the neighbour table happen"
    rng = np.random.default_rng(3)
    qf, gf, qp, gp, qc, gc = clustered(rng, 300, 1700, 32, 120, n_cams=6, noise=.9, offset=.4)
    for kw in (dict(), dict(k1=10, k2=1, lambda_value=.1)):
        ref = reference(qf, gf, 'cosine', **kw)
        got = reid_rerank(qf, gf, chunk_size=512, **kw)
        np.testing.assert_allclose(got.numpy(), ref, atol=2e-6, rtol=0)
        same_metrics(reid_metrics_from_dist(got, qp, gp, qc, gc), reid_metrics_from_dist(torch.from_numpy(ref), qp, gp, qc, gc))
    assert reid_metrics_from_dist(got, qp, gp, qc, gc).mAP > reid_metrics(qf, gf, qp, gp, qc, gc).mAP

def test_reference_is_torchreids():
    "The reference of the tests gives torchreid's results bit for bit (skipped when torchreid is not installed)"
    re_ranking = torchreid_re_ranking()
    if re_ranking is None: pytest.skip('torchreid (or pyppbox-torchreid) is not installed')
    rng = np.random.default_rng(4)
    for _ in range(20):
        qf, gf, *_ = clustered(rng, int(rng.integers(1, 20)), int(rng.integers(1, 60)), 6, 8)
        d = [reid_dist(a, b).numpy() for a, b in ((qf, gf), (qf, qf), (gf, gf))]
        kw = random_settings(rng)
        np.testing.assert_array_equal(rerank_reference(*d, **kw), re_ranking(*d, **kw))

def test_rerank_float64_and_device():
    rng = np.random.default_rng(5)
    qf, gf, *_ = clustered(rng, 20, 50, 8, 6)
    r = reid_rerank(qf.double(), gf.double())
    assert r.dtype == torch.float64 and r.device == qf.device
    np.testing.assert_allclose(r.numpy(), reid_rerank(qf, gf).double().numpy(), atol=1e-5)
    np.testing.assert_allclose(reid_rerank(qf.numpy(), gf.numpy()).numpy(), reid_rerank(qf, gf).numpy())
    assert reid_rerank(qf.numpy(), gf.tolist()).dtype == torch.float64      # a list of Python floats is float64

@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_rerank_cuda_agrees_with_cpu():
    rng = np.random.default_rng(6)
    for dist in ('cosine', 'euclidean'):
        qf, gf, qp, gp, qc, gc = clustered(rng, 300, 1700, 32, 120, n_cams=6, noise=.9, offset=.4)
        cpu, gpu = reid_rerank(qf, gf, dist=dist), reid_rerank(qf.cuda(), gf.cuda(), dist=dist, chunk_size=700)
        assert gpu.is_cuda
        np.testing.assert_allclose(gpu.cpu().numpy(), cpu.numpy(), atol=1e-5)
        same_metrics(reid_metrics_from_dist(gpu, qp, gp, qc, gc), reid_metrics_from_dist(cpu, qp, gp, qc, gc), tol=1e-4)
        for a, b in zip(aqe(qf.cuda(), gf.cuda()), aqe(qf, gf)): np.testing.assert_allclose(a.cpu().numpy(), b.numpy(), atol=1e-4)
        assert reid_roc(qf.cuda(), gf.cuda(), qp, gp, qc, gc).tpr_at == pytest.approx(reid_roc(qf, gf, qp, gp, qc, gc).tpr_at, abs=1e-3)

def test_rerank_errors():
    qf, gf = torch.randn(4, 3), torch.randn(6, 3)
    fails_with(lambda: reid_rerank(qf, gf, k1=0), 'k1')
    fails_with(lambda: reid_rerank(qf, gf, k1=True), 'k1')
    fails_with(lambda: reid_rerank(qf, gf, k2=0), 'k2')
    fails_with(lambda: reid_rerank(qf, gf, lambda_value=-.1), 'lambda_value')
    fails_with(lambda: reid_rerank(qf, gf, lambda_value=float('nan')), 'lambda_value')
    fails_with(lambda: reid_rerank(qf, gf, lambda_value=None), 'lambda_value')
    fails_with(lambda: reid_rerank(qf, gf, dist='cos'), 'dist')
    fails_with(lambda: reid_rerank(qf, gf, chunk_size=-1), 'chunk_size')
    fails_with(lambda: reid_rerank(qf, gf.T), 'feature dimension')
    fails_with(lambda: reid_rerank(qf.where(qf > 0, float('inf')), gf), 'query_feats')
    fails_with(lambda: reid_rerank(qf, gf[:0]), 'gallery_feats')

# ---------------------------------------------------------------- AQE and DBA
def test_aqe_and_dba_agree_with_reference():
    rng = np.random.default_rng(7)
    for _ in range(30):
        qf, gf, *_ = clustered(rng, int(rng.integers(1, 30)), int(rng.integers(1, 80)), int(rng.integers(2, 10)), 5)
        qf, gf = qf.double() + 3, gf.double() + 3                          # positive similarities: any alpha is defined
        times, k, alpha = int(rng.integers(0, 3)), int(rng.integers(1, 15)), float(rng.choice([0, 1, 3, 2.5]))
        for got, ref in zip(aqe(qf, gf, times, k, alpha), aqe_reference(qf.numpy(), gf.numpy(), times, min(k, len(qf) + len(gf)), alpha)):
            np.testing.assert_allclose(got.numpy(), ref, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(dba(gf, k, alpha).numpy(), dba_reference(gf.numpy(), min(k, len(gf)), alpha), rtol=1e-9, atol=1e-12)

def test_aqe_float32_keeps_dtype_and_helps():
    rng = np.random.default_rng(8)
    qf, gf, qp, gp, qc, gc = clustered(rng, 100, 600, 32, 40, noise=1.)
    qa, ga = aqe(qf, gf)
    assert qa.dtype == ga.dtype == torch.float32 and qa.shape == qf.shape and ga.shape == gf.shape
    assert reid_metrics(qa, ga, qp, gp, qc, gc).mAP > reid_metrics(qf, gf, qp, gp, qc, gc).mAP

def test_aqe_dba_errors():
    qf, gf = torch.randn(4, 3), torch.randn(6, 3)
    fails_with(lambda: aqe(qf, gf, qe_times=-1), 'qe_times')
    fails_with(lambda: aqe(qf, gf, qe_k=1.5), 'qe_k')
    fails_with(lambda: aqe(qf, gf, alpha='3'), 'alpha')
    fails_with(lambda: aqe(qf, gf[:, :2]), 'feature dimension')
    fails_with(lambda: dba(gf, k=0), 'k must')
    fails_with(lambda: dba(gf, alpha=float('inf')), 'alpha')
    fails_with(lambda: dba(torch.zeros(0, 3)), 'gallery_feats')

# ---------------------------------------------------------------- ROC
@pytest.mark.parametrize('positives', ['same', 'different'])
def test_roc_agrees_with_reference(positives):
    rng = np.random.default_rng(9 if positives == 'same' else 10)
    for _ in range(30):
        nq, ng = int(rng.integers(1, 30)), int(rng.integers(2, 200))
        qp, gp = rng.integers(0, 6, nq), rng.integers(-1, 6, ng)           # distractor queries, junk and distractors
        qc, gc = rng.integers(0, 3, nq), rng.integers(0, 3, ng)
        D = np.round(rng.random((nq, ng)), int(rng.choice([1, 2, 6])))     # with and without ties
        fprs = [1e-4, 1e-3, 1e-2, .1, .5]
        try: got = reid_roc_from_dist(torch.from_numpy(D), qp, gp, qc, gc, fprs=fprs, positives=positives)
        except ValueError as e: assert 'a ROC needs both' in str(e); continue
        assert list(got.tpr_at.values()) == tpr_at_fpr_reference(D, qp, gp, qc, gc, fprs, positives)
        assert got.n_pos + got.n_neg == ((gp != -1) & ~((gp == qp[:, None]) & (gc == qc[:, None]))).sum()

def test_roc_from_features_and_plot():
    rng = np.random.default_rng(11)
    qf, gf, qp, gp, qc, gc = clustered(rng, 50, 300, 16, 20)
    r = reid_roc(qf, gf, qp, gp, qc, gc, dist='euclidean')
    assert list(r.tpr_at.values()) == tpr_at_fpr_reference(reid_dist(qf, gf, 'euclidean').numpy(), *(x.numpy() for x in (qp, gp, qc, gc)))
    assert isinstance(r, ReIDROC) and list(r.as_dict()) == ['TPR@FPR=1e-04', 'TPR@FPR=1e-03', 'TPR@FPR=1e-02']
    assert 'TPR@FPR=1e-02' in repr(r) and "positives='same'" in repr(r)
    ax = plot_roc(r, reid_roc_from_dist(reid_rerank(qf, gf), qp, gp, qc, gc), labels=['a', 'b'])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['a', 'b'] and ax.get_xscale() == 'log'
    fails_with(lambda: plot_roc(r, labels=['a', 'b']), 'labels')
    fails_with(lambda: plot_roc(), 'rocs')

def test_roc_errors():
    D, ids = torch.rand(2, 3), ([1, 2], [1, 2, 2], [0, 0], [1, 1, 1])
    fails_with(lambda: reid_roc_from_dist(D, *ids, positives='pos'), 'positives')
    fails_with(lambda: reid_roc_from_dist(D, *ids, fprs=1e-3), 'fprs')
    fails_with(lambda: reid_roc_from_dist(D, *ids, fprs=[-1]), 'fprs')
    fails_with(lambda: reid_roc_from_dist(D[:, :2], *ids), 'g_pids')
    fails_with(lambda: reid_roc_from_dist(D.where(D > .5, float('nan')), *ids), 'distmat')
    fails_with(lambda: reid_roc_from_dist(D, [3, 4], *ids[1:]), 'a ROC needs both')
    fails_with(lambda: reid_roc(torch.rand(2, 4), torch.rand(3, 4), *ids, dist='l1'), 'dist')

# ---------------------------------------------------------------- evaluation with post-processing
def test_postprocessed_metrics():
    rng = np.random.default_rng(12)
    qf, gf, *ids = clustered(rng, 60, 400, 16, 25)
    res = postprocessed_metrics(qf, gf, *ids, rerank=dict(k1=8, k2=2), aqe=dict(qe_k=4), max_rank=10)
    assert list(res) == postprocess_names(True, True) == ['plain', 'AQE', 'AQE + re-ranked']
    same_metrics(res['plain'], reid_metrics(qf, gf, *ids, max_rank=10), tol=0)
    qa, ga = aqe(qf, gf, qe_k=4)
    same_metrics(res['AQE'], reid_metrics(qa, ga, *ids, max_rank=10), tol=0)
    same_metrics(res['AQE + re-ranked'], reid_metrics_from_dist(reid_rerank(qa, ga, k1=8, k2=2), *ids, max_rank=10), tol=0)
    assert list(postprocessed_metrics(qf, gf, *ids, rerank=True)) == ['plain', 're-ranked']
    assert list(postprocessed_metrics(qf, gf, *ids)) == ['plain']
    fails_with(lambda: postprocessed_metrics(qf, gf, *ids, aqe=3), 'aqe')
