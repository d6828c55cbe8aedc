"Inference outside the training process: fastai's export, `export_reid`/`load_reid`, the gallery index, ONNX, FAISS and their errors."
import json, subprocess, sys, textwrap
from pathlib import Path
import pandas as pd, pytest, torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from fastai.callback.progress import ProgressCallback
from fastai.vision.core import PILImage, image2tensor
from fastai.torch_core import set_seed
from fastreid_rollback.synthetic import synthetic_reid
from fastreid_rollback.data import market1501, reid_dls
from fastreid_rollback.learner import reid_learner
from fastreid_rollback.metrics import reid_dist, reid_metrics, protocol_mask
from fastreid_rollback.inference import load_reid, ReIDIndex, export_onnx

def run_python(code, *args):
    "Run `code` in a fresh Python process (argv[1:] = `args`); return the completed process"
    return subprocess.run([sys.executable, '-W', 'ignore', '-c', textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=600)

@pytest.fixture(scope='module')
def df(tmp_path_factory):
    root = synthetic_reid(tmp_path_factory.mktemp('data'), n_ids=16, n_cams=2, imgs_per_id_cam=2, size=(64, 32), n_distractors=3, n_junk=2)
    return market1501(root)

@pytest.fixture(scope='module')
def learn(df):
    "A resnet18 trained one epoch on the embedded dataset"
    set_seed(0)
    learn = reid_learner(reid_dls(df, size=(64, 32), bs=16, seed=0), 'resnet18', pretrained=False)
    learn.remove_cb(ProgressCallback)
    learn.fit(1, 0.01)
    return learn

def test_fastai_export_and_load_learner(learn, df, tmp_path):
    "`learn.export()` works for `reid_learner` Learners and `load_learner` gives the same features in a fresh process"
    learn.path = tmp_path
    learn.export('export.pkl')
    assert learn.opt is not None and len(learn.dls.query) > 0  # the Learner is left as it was
    q = df[df.split == 'query']
    q.to_csv(tmp_path/'query.csv', index=False)
    p = run_python("""
        import sys, torch, pandas as pd
        from fastai.learner import load_learner
        import fastreid_rollback.learner
        learn = load_learner(sys.argv[1])
        f = learn.reid_features(learn.dls.reid_dl(pd.read_csv(sys.argv[2])))[0]
        torch.save(f.cpu(), sys.argv[3])
        """, tmp_path/'export.pkl', tmp_path/'query.csv', tmp_path/'f.pt')
    assert p.returncode == 0, p.stderr[-3000:]
    want = learn.reid_features(learn.dls.query)[0].cpu()
    torch.testing.assert_close(torch.load(tmp_path/'f.pt'), want, atol=1e-5, rtol=0)

@pytest.fixture(scope='module')
def model_file(learn, tmp_path_factory):
    return learn.export_reid(tmp_path_factory.mktemp('model')/'model.reid')

def test_fresh_process_features_index_and_ranking(learn, df, model_file, tmp_path):
    "In a process with no dataset: `load_reid` gives the Learner's features; the index ranks each query as the evaluation does"
    q,g = df[df.split == 'query'],df[df.split == 'gallery']
    q.to_csv(tmp_path/'query.csv', index=False); g.to_csv(tmp_path/'gallery.csv', index=False)
    p = run_python("""
        import sys, torch, pandas as pd
        from fastreid_rollback.inference import load_reid, ReIDIndex
        model, query, gallery, out = sys.argv[1:]
        predictor = load_reid(model)
        torch.save(predictor(list(pd.read_csv(query).path)), out + '/feats.pt')
        index = ReIDIndex.build(predictor, pd.read_csv(gallery))
        index.save(out + '/gallery.idx')
        index.search(pd.read_csv(query), k=len(index)).to_csv(out + '/search.csv', index=False)
        """, model_file, tmp_path/'query.csv', tmp_path/'gallery.csv', tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    qf,qp,qc = (t.cpu() for t in learn.reid_features(learn.dls.query))
    gf,gp,gc = (t.cpu() for t in learn.reid_features(learn.dls.gallery))
    torch.testing.assert_close(torch.load(tmp_path/'feats.pt'), qf, atol=1e-5, rtol=0)
    res = pd.read_csv(tmp_path/'search.csv')
    assert list(res.columns) == ['query', 'rank', 'path', 'distance', 'pid', 'camid']
    pos = {p:i for i,p in enumerate(g.path.astype(str))}
    ranked = torch.tensor(res.path.map(pos).to_numpy()).view(len(q), len(g))
    assert (res['query'].to_numpy().reshape(len(q), -1) == q.path.astype(str).to_numpy()[:, None]).all()
    assert torch.equal(ranked, reid_dist(qf, gf).sort(dim=1, stable=True).indices)  # the order the evaluation ranks by
    for i in range(len(q)):  # each query's ranking, scored under the protocol, gives the evaluation's AP and first match
        keep = protocol_mask(qp[i:i+1], gp, qc[i:i+1], gc)[0][ranked[i]]
        hits = (gp[ranked[i]] == qp[i])[keep].double()
        if not hits.any(): continue
        r = reid_metrics(qf[i:i+1], gf, qp[i:i+1], gp, qc[i:i+1], gc, max_rank=len(g))
        assert (hits.cumsum(0)/torch.arange(1, len(hits)+1))[hits.bool()].mean().item() == pytest.approx(r.mAP, abs=1e-9)
        assert r.rank(int(hits.argmax())+1) == 1 and (int(hits.argmax()) == 0 or r.rank(int(hits.argmax())) == 0)
    assert res.pid.tolist() == gp[ranked.view(-1)].tolist() and res.camid.tolist() == gc[ranked.view(-1)].tolist()

def test_onnx_parity(model_file, df, tmp_path):
    "ONNX Runtime's features equal PyTorch's (cosine >= 0.9999), for any batch size"
    import onnxruntime as ort
    predictor = load_reid(model_file)
    sess = ort.InferenceSession(str(export_onnx(predictor, tmp_path/'model.onnx')), providers=['CPUExecutionProvider'])
    paths = list(df[df.split == 'query'].path[:7])
    x = torch.stack([image2tensor(predictor.resize(PILImage.create(p), split_idx=1)) for p in paths])
    for b in (x, x[:1], torch.randint(0, 256, (3, 3, 64, 32), dtype=torch.uint8)):
        got = torch.from_numpy(sess.run(['features'], {'images': b.numpy()})[0])
        assert F.cosine_similarity(got, predictor.batch(b)).min() >= 0.9999
    torch.testing.assert_close(predictor.batch(x), predictor(paths), atol=1e-5, rtol=0)  # the batch is what the predictor sees

def test_faiss_topk_equals_exact(model_file, df):
    "On a gallery without ties, FAISS's top-k is the exact search's"
    predictor = load_reid(model_file)
    exact,fast = ReIDIndex.build(predictor, df),ReIDIndex.build(predictor, df, backend='faiss')
    qf = predictor(df[df.split == 'query'])
    (d1,i1),(d2,i2) = exact.nearest(qf, 10),fast.nearest(qf, 10)
    assert (d1.diff(dim=1) > 1e-5).all()  # no ties: the top-k is unique
    assert torch.equal(i1, i2)
    torch.testing.assert_close(d1, d2, atol=1e-5, rtol=0)

def test_errors(learn, df, model_file, tmp_path):
    "Unreadable images are named; a mismatched index, a garbage model file and another format version are refused"
    predictor = load_reid(model_file)
    bad = tmp_path/'bad.jpg'; bad.write_bytes(b'\xff\xd8 not a jpeg')
    with pytest.raises(ValueError, match=r"images\[1\]: cannot read the image .*bad.jpg"): predictor([df.path[0], bad])
    with pytest.raises(FileNotFoundError, match='missing.jpg'): predictor([tmp_path/'missing.jpg'])
    index = ReIDIndex.build(predictor, df)
    index.save(tmp_path/'gallery.idx')
    other = reid_learner(learn.dls, 'resnet18', pretrained=False).export_reid(tmp_path/'other.reid')
    with pytest.raises(ValueError, match='built with another model'): ReIDIndex.load(tmp_path/'gallery.idx', model=other)
    (tmp_path/'garbage.reid').write_bytes(b'\x00garbage' * 50)
    with pytest.raises(ValueError, match='garbage.reid.*cannot be read'): load_reid(tmp_path/'garbage.reid')
    with pytest.raises(ValueError, match='not a fastreid_rollback model file'): load_reid(tmp_path/'gallery.idx')
    with safe_open(model_file, 'pt') as f: meta,state = f.metadata(),{k:f.get_tensor(k) for k in f.keys()}
    save_file(state, tmp_path/'v2.reid', metadata={**meta, 'format_version': '2'})
    with pytest.raises(ValueError, match='format version 2'): load_reid(tmp_path/'v2.reid')
    state['head.classifier.weight'] = state['head.classifier.weight'] + 1
    save_file(state, tmp_path/'damaged.reid', metadata=meta)
    with pytest.raises(ValueError, match='damaged'): load_reid(tmp_path/'damaged.reid')

def test_bnneck_neck_feature_round_trip(tmp_path):
    "A BNNeck model whose feature is the neck output (wrapped in DataParallel) loads with the same features"
    from fastreid_rollback.model import ReIDModel
    from fastreid_rollback.inference import save_reid, ReIDFeatures
    torch.manual_seed(0)
    m = ReIDModel('resnet18', n_ids=5, neck='bnneck', neck_feat=True).eval()
    predictor = load_reid(save_reid(torch.nn.DataParallel(m), tmp_path/'m.reid', size=(64, 32), flip=False, normalize=False))
    assert predictor.config['head'] == {'neck': 'bnneck'} and predictor.config['feature'] == {'output': 'neck', 'flip': False, 'normalize': False}
    x = torch.randint(0, 256, (4, 3, 64, 32), dtype=torch.uint8)
    with torch.no_grad(): want = ReIDFeatures(m, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225], flip=False, normalize=False)(x)
    torch.testing.assert_close(predictor.batch(x), want, atol=1e-5, rtol=0)

def test_gallery_sources(model_file, df, tmp_path):
    "A folder, a list of files and a reader DataFrame index the same images; ids are kept only from the DataFrame"
    predictor = load_reid(model_file)
    g = df[df.split == 'gallery']
    folder = g.path.iloc[0].parent
    by_df,by_folder,by_list = ReIDIndex.build(predictor, df),ReIDIndex.build(predictor, folder),ReIDIndex.build(predictor, list(g.path))
    assert sorted(by_df.paths) == by_folder.paths and by_list.paths == by_df.paths
    torch.testing.assert_close(by_folder.feats[[by_folder.paths.index(p) for p in by_df.paths]], by_df.feats)
    assert by_df.pids.tolist() == g.pid.tolist() and by_folder.pids is None
    assert by_folder.search(g.path.iloc[:1], k=2).pid.isna().all()
    (tmp_path/'empty').mkdir()
    with pytest.raises(ValueError, match='no image file'): ReIDIndex.build(predictor, tmp_path/'empty')
    with pytest.raises(FileNotFoundError, match='nowhere'): ReIDIndex.build(predictor, tmp_path/'nowhere')
    with pytest.raises(ValueError, match="split 'test'"): ReIDIndex.build(predictor, df, split='test')
    with pytest.raises(ValueError, match='k=0'): by_df.search(g.path.iloc[:1], k=0)
