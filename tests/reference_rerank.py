"""Straightforward numpy references for `fastreid_rollback.retrieval`, written from the papers' formulas for the tests
and the benchmark: k-reciprocal re-ranking (Zhong et al., CVPR 2017) with the conventions of the re-ranking code that
torchreid and fast-reid ship, alpha-weighted query expansion and database-side augmentation, and fast-reid's ROC."""
import numpy as np
from sklearn.metrics import roc_curve

# ---------------------------------------------------------------- k-reciprocal re-ranking
def scaled_sq_dists(q_g, q_q, g_g):
    "All (query + gallery) squared distances in float32, each divided by the largest of its column, transposed"
    D = np.block([[q_q, q_g], [q_g.T, g_g]]).astype(np.float32) ** 2
    return (D / D.max(axis=0)).T    # the matrix is symmetric: row i holds the squared distances from i, scaled to [0, 1]

def k_reciprocal(ranks, i, k):
    "R(i, k): those of the k nearest neighbours of `i` (`i` itself first, k+1 in all) that have `i` among theirs"
    return {int(j) for j in ranks[i, :k + 1] if i in ranks[j, :k + 1]}

def expanded_neighbours(ranks, i, k1):
    "R*(i, k1): R(i, k1) and each R(j, k1/2) of its members j that shares more than 2/3 of itself with R(i, k1)"
    R = k_reciprocal(ranks, i, k1)
    E = set(R)
    for j in R:
        half = k_reciprocal(ranks, j, round(k1 / 2))     # Python's round, like numpy's around: halves to even
        if len(half & R) > 2 / 3 * len(half): E |= half
    return sorted(E)

def rerank_reference(q_g, q_q, g_g, k1=20, k2=6, lambda_value=0.3):
    "Re-ranked (n_query, n_gallery) distances from the three distance matrices, one formula at a time"
    nq, N = len(q_g), len(q_g) + len(g_g)
    d = scaled_sq_dists(q_g, q_q, g_g)
    ranks = np.argsort(d, axis=1, kind='stable')
    V = np.zeros((N, N), np.float32)                    # V[i, j]: Gaussian kernel of d[i, j] over R*(i, k1), rows sum to 1
    for i in range(N):
        E = expanded_neighbours(ranks, i, k1)
        w = np.exp(-d[i, E])
        V[i, E] = w / w.sum()
    if k2 > 1: V = np.stack([V[ranks[i, :k2]].mean(axis=0) for i in range(N)])   # local query expansion
    jaccard = np.empty((nq, N - nq), np.float32)
    for i in range(nq):
        cols = np.flatnonzero(V[i])
        m = np.minimum(V[i, cols], V[nq:, cols]).sum(axis=1)    # |V_i ∩ V_g| (min); |V_i ∪ V_g| = 2 - m (max)
        jaccard[i] = 1 - m / (2 - m)
    return jaccard * (1 - lambda_value) + d[:nq, nq:] * lambda_value

# ---------------------------------------------------------------- query expansion and database-side augmentation
def normalize(x): return x / np.linalg.norm(x, axis=1, keepdims=True)

def weighted_neighbour_mean(x, db, k, alpha):
    "Each row of `x` replaced by the mean of its `k` most cosine-similar rows of `db`, weighted by similarity ** alpha"
    sims = normalize(x) @ normalize(db).T
    out = []
    for s in sims:
        nn = np.argsort(-s, kind='stable')[:k]
        out.append((db[nn] * (s[nn] ** alpha)[:, None]).mean(axis=0))
    return np.stack(out)

def aqe_reference(qf, gf, qe_times=1, qe_k=10, alpha=3.0):
    "Alpha-weighted query expansion over query and gallery together, `qe_times` rounds"
    x = np.concatenate([qf, gf])
    for _ in range(qe_times): x = weighted_neighbour_mean(x, x, qe_k, alpha)
    return x[:len(qf)], x[len(qf):]

def dba_reference(gf, k=10, alpha=3.0):
    "Database-side augmentation: each gallery row replaced by the weighted mean of its `k` nearest gallery rows"
    return weighted_neighbour_mean(gf, gf, k, alpha)

# ---------------------------------------------------------------- ROC (fast-reid's protocol)
def roc_pairs_reference(D, qp, gp, qc, gc):
    "(distances, same-identity flags) of every query-gallery pair but junk and the query's identity in its own camera"
    d, same = [], []
    for i in range(len(D)):
        keep = (gp != -1) & ~((gp == qp[i]) & (gc == qc[i]))
        d.append(D[i, keep]); same.append((gp[keep] == qp[i]) & (qp[i] > 0))     # a distractor (0) matches no one
    return np.concatenate(d), np.concatenate(same)

def tpr_at_fpr_reference(D, qp, gp, qc, gc, fprs=(1e-4, 1e-3, 1e-2), positives='same'):
    "TPR at the ROC point whose FPR is nearest each of `fprs` (scikit-learn's ROC; fast-reid's pick of the point)"
    d, same = roc_pairs_reference(D, qp, gp, qc, gc)
    if positives == 'same': fpr, tpr, _ = roc_curve(same, -d)
    else: fpr, tpr, _ = roc_curve(~same, d)          # fast-reid's labels: pairs of different identities are the positives
    return [float(tpr[np.argmin(np.abs(fpr - f))]) for f in fprs]

# ---------------------------------------------------------------- torchreid's own code, when installed
def torchreid_re_ranking():
    "torchreid's `re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)` (torchreid or pyppbox-torchreid), or None"
    import importlib.util
    for pkg in ('torchreid', 'pyppbox_torchreid'):
        spec = importlib.util.find_spec(pkg)
        if spec is None or not spec.submodule_search_locations: continue
        for root in spec.submodule_search_locations:      # the file alone: the package imports far more than it needs
            f = importlib.util.spec_from_file_location(f'{pkg}_rerank', f'{root}/utils/rerank.py')
            try:
                m = importlib.util.module_from_spec(f); f.loader.exec_module(m)
                return m.re_ranking
            except (FileNotFoundError, AttributeError): pass
    return None
