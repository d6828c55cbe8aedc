"Inference outside the training process: fastai's export, `export_reid`/`load_reid`, the gallery index, ONNX, FAISS and their errors."
import json, subprocess, sys, textwrap
from pathlib import Path
import pytest, torch
from fastai.callback.progress import ProgressCallback
from fastai.torch_core import set_seed
from fastreid_rollback.synthetic import synthetic_reid
from fastreid_rollback.data import market1501, reid_dls
from fastreid_rollback.learner import reid_learner

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
