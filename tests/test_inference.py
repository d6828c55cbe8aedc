"Inference outside the training process: fastai's export, `export_reid`/`load_reid`, the gallery index, ONNX, FAISS and their errors."
import os, subprocess, sys, textwrap
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
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

def test_inference_does_not_import_training_code():
    "The deployment path reads checkpoints (`read_checkpoint`, in `model`) without importing the training code of `experiment`"
    p = run_python("""
        import sys, fastreid_rollback.inference
        print('fastreid_rollback.experiment' in sys.modules)""")
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ['False']

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
    import onnx
    predictor = load_reid(model_file)
    sess = ort.InferenceSession(str(export_onnx(predictor, tmp_path/'model.onnx')), providers=['CPUExecutionProvider'])
    assert [o.version for o in onnx.load(tmp_path/'model.onnx').opset_import if o.domain in ('', 'ai.onnx')] == [18]
    umask = os.umask(0); os.umask(umask)
    for f in (model_file, tmp_path/'model.onnx'): assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f  # export_reid's file (safetensors) too
    paths = list(df[df.split == 'query'].path[:7])
    x = torch.stack([image2tensor(predictor.resize(PILImage.create(p), split_idx=1)) for p in paths])
    for b in (x, x[:1], torch.randint(0, 256, (3, 3, 64, 32), dtype=torch.uint8)):
        got = torch.from_numpy(sess.run(['features'], {'images': b.numpy()})[0])
        assert F.cosine_similarity(got, predictor.batch(b)).min() >= 0.9999
    torch.testing.assert_close(predictor.batch(x), predictor(paths), atol=1e-5, rtol=0)  # the batch is what the predictor sees

def close_to_plain(got, want):
    "The tolerance of the fast path: max abs difference 1e-4 and cosine >= 0.9999 against the plain float32 path"
    return (got - want).abs().max() < 1e-4 and F.cosine_similarity(got, want).min() >= 0.9999

@pytest.mark.parametrize('kw', [dict(), dict(fold_bn=False), dict(channels_last=False), dict(fuse_relu=False), dict(threads=1)])
def test_fast_options_give_the_plain_features(model_file, df, kw):
    "Each option of `load_reid`, alone or with the defaults, gives the features of the plain path (nothing folded, fused or reordered)"
    q = list(df[df.split == 'query'].path)
    want = load_reid(model_file, fold_bn=False, channels_last=False, fuse_relu=False)(q, bs=5)
    n = torch.get_num_threads()
    assert close_to_plain(load_reid(model_file, **kw)(q, bs=5), want)
    assert torch.get_num_threads() == n  # `threads` gives torch its setting back

def test_predictor_options_errors(model_file):
    with pytest.raises(ValueError, match='fp16=True: half precision runs on a CUDA device'): load_reid(model_file, device='cpu', fp16=True)
    for t in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf'threads must be (an int|>= 1), got {t!r}'): load_reid(model_file, threads=t)

def test_learner_features_fast_leave_the_model_as_it_was(learn):
    "`reid_features` runs a folded, fused copy: the plain features, and the Learner's model untouched (weights, BatchNorms, mode)"
    m = learn.model
    before,mode = {k:v.clone() for k,v in m.state_dict().items()},m.training
    fast,plain = learn.reid_features(learn.dls.gallery)[0],learn.reid_features(learn.dls.gallery, fast=False)[0]
    assert close_to_plain(fast, plain)
    assert learn.model is m and m.training == mode and all(torch.equal(v, before[k]) for k,v in m.state_dict().items())
    assert sum(isinstance(o, torch.nn.BatchNorm2d) for o in m.modules()) == 20
    assert learn.reid_evaluate().mAP == pytest.approx(learn.reid_evaluate(fast=False).mAP, abs=5e-3)   # features equal to 1e-7; near-tied distances may swap ranks

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
    from fastreid_rollback.model import create_reid_model
    from fastreid_rollback.inference import save_reid, ReIDFeatures
    torch.manual_seed(0)
    m = create_reid_model('resnet18', n_ids=5, neck='bnneck', neck_feat=True).eval()
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
    with pytest.raises(ValueError, match='k must be >= 1, got 0'): by_df.search(g.path.iloc[:1], k=0)

# ---------------------------------------------------------------- hardening, round 2 (issue 23)
@pytest.fixture(scope='module')
def untrained(df, tmp_path_factory):
    "A predictor of an untrained resnet18 (no training: quick) and its model file"
    from fastreid_rollback.model import create_reid_model
    from fastreid_rollback.inference import save_reid
    torch.manual_seed(0)
    fn = save_reid(create_reid_model('resnet18', n_ids=4), tmp_path_factory.mktemp('untrained')/'m.reid', size=(64, 32))
    return load_reid(fn)

def gallery_of(df): return df[df.split == 'gallery']

def test_ivf_never_pads_with_missing_neighbours(untrained, df):
    "An IVF index whose probed list holds fewer than k images: k real, distinct results, not FAISS's -1 read as the last image"
    import faiss
    g = gallery_of(df)
    ivf = ReIDIndex.build(untrained, g, backend='faiss', faiss_factory='IVF4,Flat')
    qf = untrained(df[df.split == 'query'].path.iloc[:4])
    assert (ivf.faiss_index.search(qf.numpy(), len(g))[1] == -1).any()  # what FAISS itself returns with nprobe=1
    d,i = ivf.nearest(qf, len(g))
    assert torch.equal(i.sort(dim=1).values, torch.arange(len(g)).expand(4, -1)) and torch.isfinite(d).all()
    assert faiss.extract_index_ivf(ivf.faiss_index).nprobe == 1  # left as it was
    res = ivf.search(df[df.split == 'query'].path.iloc[:2], k=len(g))
    assert len(res) == 2*len(g) and res.groupby('query').path.nunique().tolist() == [len(g)]*2
    assert sorted(res.path.unique()) == sorted(map(str, g.path)) and res.distance.max() < 10

def test_search_drops_what_an_index_does_not_find(untrained, df):
    "An approximate index that still finds fewer than k (FAISS's -1) gives fewer rows, never a made-up one"
    g = gallery_of(df)
    class Partial:  # a FAISS-like index that finds the 2 nearest only
        def search(self, x, k):
            d,i = np.zeros((len(x), k), 'float32'),np.full((len(x), k), -1)
            i[:, :2] = [0, 1]; d[:, :2] = [1, .9]; d[:, 2:] = -3.4e38
            return d,i
    index = ReIDIndex(untrained, list(map(str, g.path)), untrained(g), torch.tensor(g.pid.values), backend='faiss', faiss_index=Partial())
    d,i = index.nearest(untrained(g.path.iloc[:1]), 5)
    assert i[0, 2:].eq(-1).all() and torch.isinf(d[0, 2:]).all()
    res = index.search(g.path.iloc[:2], k=5)
    assert len(res) == 4 and res['rank'].tolist() == [1, 2, 1, 2] and res.path.tolist() == [str(p) for p in g.path.iloc[[0, 1, 0, 1]]]
    index.show(g.path.iloc[:2], k=5)

def test_gallery_ids_checked_as_reid_dls_checks_them(untrained, df):
    "A NaN or fractional pid is refused as `reid_dls` refuses it, not stored as -9223372036854775808"
    g = gallery_of(df)
    with pytest.raises(ValueError, match=r"gallery: df column 'pid', row \d+: nan is not an integer"):
        ReIDIndex.build(untrained, g.assign(pid=g.pid.where(g.index != g.index[3])))
    with pytest.raises(ValueError, match="df column 'camid'"): ReIDIndex.build(untrained, g.assign(camid=g.camid + 0.5))
    with pytest.raises(ValueError, match="pid"):
        reid_dls(df.assign(pid=df.pid.where(df.index != g.index[3])), size=(64, 32))  # the same check

@pytest.mark.parametrize('backend', ['exact', 'faiss'])
def test_query_checks_and_empty_queries_on_both_backends(untrained, df, backend):
    "Both backends: NaN queries and a wrong dimension are refused with the same message; no query gives an empty result"
    index = ReIDIndex.build(untrained, gallery_of(df), backend=backend)
    with pytest.raises(ValueError, match=r'feats holds NaN or inf \(row 1\)'):
        index.nearest(torch.cat([torch.ones(1, 512), torch.full((1, 512), float('nan'))]), 3)
    with pytest.raises(ValueError, match=r'expected float features \(n_query, 512\).*shape \(2, 7\)'): index.nearest(torch.zeros(2, 7), 3)
    d,i = index.nearest(torch.zeros(0, 512), 3)
    assert d.shape == i.shape == (0, 3) and i.dtype == torch.long

def test_save_to_a_folder_or_under_a_file(untrained, df, tmp_path):
    "Saving an index where a folder is, or under a file, names the user's path (not the temporary file) and says what is wrong"
    index = ReIDIndex.build(untrained, gallery_of(df).iloc[:3])
    (tmp_path/'s5').mkdir(); (tmp_path/'notes.txt').write_text('x')
    with pytest.raises(IsADirectoryError) as e: index.save(tmp_path/'s5')
    assert str(e.value) == f"{str(tmp_path/'s5')!r} is a folder: expected the name of a file to write"
    with pytest.raises(NotADirectoryError) as e: index.save(tmp_path/'notes.txt'/'g.idx')
    assert 'is a file, not a folder' in str(e.value) and '.tmp' not in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.txt', 's5'] and not list((tmp_path/'s5').iterdir())

def test_load_learner_features_say_the_loaders_are_empty(learn, tmp_path):
    "fastai's `learn.export` empties the DataLoaders: say so and what to call, not that the items are not a DataFrame"
    from fastai.learner import load_learner
    learn.path = tmp_path
    learn.export('export.pkl')
    l2 = load_learner(tmp_path/'export.pkl')
    with pytest.raises(ValueError, match=r'holds no images: `learn.export` saves the DataLoaders empty.*learn.dls.reid_dl\(df\)'):
        l2.reid_features(l2.dls.query)

def test_image_errors_name_what_was_passed(untrained, df, tmp_path):
    "A HxWxC tensor is reported with its own shape; a broken link is named as in the folder; on_bad_image='skip' leaves it out"
    with pytest.raises(ValueError, match=r'got Tensor of shape \(64, 32, 3\) and dtype torch.uint8'):
        untrained(torch.zeros(64, 32, 3, dtype=torch.uint8))
    gal = tmp_path/'gallery'; gal.mkdir()
    for p in gallery_of(df).path.iloc[:4]: (gal/p.name).symlink_to(p)
    (gal/'0099_c1s1_000001_00.jpg').symlink_to(tmp_path/'moved_away.jpg')
    with pytest.raises(FileNotFoundError, match=r"gallery\[4\]: no image file '.*gallery/0099_c1s1_000001_00.jpg' \(a symbolic link to .*moved_away.jpg', which does not exist\).*on_bad_image='skip'"):
        ReIDIndex.build(untrained, gal)
    with pytest.warns(UserWarning, match=r'skipping 1 unreadable image\(s\): .*gallery/0099_c1s1_000001_00.jpg'):
        index = ReIDIndex.build(untrained, gal, on_bad_image='skip')
    assert len(index) == 4 and all(Path(p).parent == gal for p in index.paths)  # links keep their names
    with pytest.raises(ValueError, match="on_bad_image must be one of 'raise', 'skip', got 'maybe'"): ReIDIndex.build(untrained, gal, on_bad_image='maybe')

def test_onnx_opsets_the_exporter_cannot_write(untrained, tmp_path, monkeypatch):
    "An opset older than the exporter writes is refused before exporting; a graph of another opset is never written"
    import onnx
    for opset in (9, 17, onnx.defs.onnx_opset_version() + 1, 18.0):
        with pytest.raises(ValueError, match=f'opset={opset!r}: torch.onnx'): export_onnx(untrained, tmp_path/'m.onnx', opset=opset)
    g = onnx.helper.make_graph([], 'g', [], [])
    fake = lambda *a, **k: type('P', (), {'model_proto': onnx.helper.make_model(g, opset_imports=[onnx.helper.make_opsetid('', 18)])})()
    monkeypatch.setattr(torch.onnx, 'export', fake)  # an exporter that ignores the opset asked for
    with pytest.raises(ValueError, match=r'opset=20: the exporter made a graph of opset \[18\]'): export_onnx(untrained, tmp_path/'m.onnx', opset=20)
    assert not list(tmp_path.iterdir())

@pytest.mark.parametrize('factory,expected', [('Foo', 'could not parse index string Foo'), ('IVF1024,Flat', '1024 lists for'),
                                              ('PQ7', 'multiple of the number of subquantizers')])
def test_faiss_factory_errors(untrained, df, tmp_path, factory, expected):
    "A factory string FAISS cannot build is one ValueError naming faiss_factory, raised before any feature is computed"
    g = gallery_of(df)
    paths = [*map(str, g.path), str(tmp_path/'missing.jpg')]  # computing the features would fail on this one
    with pytest.raises(ValueError, match=f"faiss_factory={factory!r}: FAISS cannot index the {len(paths)} gallery features") as e:
        ReIDIndex.build(untrained, paths, backend='faiss', faiss_factory=factory)
    assert expected in str(e.value) and "'Flat'" in str(e.value) and len(str(e.value).splitlines()) == 1
    from fastreid_rollback.inference import _faiss_index
    with pytest.raises(ValueError, match="faiss_factory='IVF4,PQ4'"): _faiss_index(untrained(g), 'cosine', 'IVF4,PQ4')  # fails in training

@pytest.mark.parametrize('umask', [0o022, 0o002])
def test_written_files_get_the_umask_mode(untrained, df, tmp_path, umask):
    "Model files, indexes (safetensors: 0600 before), checkpoints and ONNX-style path writers all get 0666 less the umask"
    from types import SimpleNamespace
    from fastreid_rollback.inference import save_reid, checkpoint_to_reid
    from fastreid_rollback.experiment import save_checkpoint
    from fastreid_rollback.model import create_reid_model
    old = os.umask(umask)
    try:
        m = create_reid_model('resnet18', n_ids=4)
        files = [save_reid(m, tmp_path/'m.reid', size=(64, 32)),
                 save_checkpoint(SimpleNamespace(model=m, opt=None), tmp_path/'ckpt.pth', with_opt=False, arch='resnet18', size=[64, 32])]
        files.append(checkpoint_to_reid(files[-1], tmp_path/'from_ckpt.reid'))
        g = gallery_of(df).iloc[:5]
        files += [ReIDIndex.build(untrained, g).save(tmp_path/'g.idx'), ReIDIndex.build(untrained, g, backend='faiss').save(tmp_path/'f.idx')]
    finally: os.umask(old)
    assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: oct(0o666 & ~umask) for f in files}

def test_damaged_faiss_index_in_a_saved_index(untrained, df, tmp_path):
    "A saved index whose FAISS part cannot be read says so in one line naming the file, not FAISS's raw RuntimeError"
    from fastreid_rollback.inference import _read_tensors, _write_tensors
    fn = ReIDIndex.build(untrained, gallery_of(df).iloc[:5], backend='faiss').save(tmp_path/'f.idx')
    t,meta = _read_tensors(fn, 'index')
    _write_tensors(tmp_path/'bad.idx', {**t, 'faiss': t['faiss'][:40].clone()}, 'index',
                   **{k: v for k,v in meta.items() if k not in ('format', 'format_version', 'library_version')})
    with pytest.raises(ValueError, match=r"index '.*bad.idx': its FAISS index cannot be read \(.*\): build the index again"):
        ReIDIndex.load(tmp_path/'bad.idx', model=untrained)

def test_save_reid_size_is_the_resize_one(learn, tmp_path):
    "The size a model file records is the one its transforms resize to: a `size` that is not is refused"
    from fastreid_rollback.inference import save_reid
    from fastreid_rollback.data import reid_item_tfms, reid_batch_tfms
    tfms = reid_item_tfms((64, 32), flip=False) + reid_batch_tfms()
    with pytest.raises(ValueError, match=r'size=\(32, 16\) is not the size the Resize'): save_reid(learn.model, tmp_path/'m.reid', tfms, size=(32, 16))
    assert load_reid(save_reid(learn.model, tmp_path/'m.reid', tfms, size=(64, 32))).size == (64, 32)
