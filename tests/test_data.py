"Tests of the ReID readers, DataBlock, DataLoaders and PK sampler (fixture trees use each dataset's real naming)."
import os, re, random, signal, tempfile, warnings
from contextlib import contextmanager
from pathlib import Path
import numpy as np, pandas as pd, pytest, torch
from PIL import Image
import matplotlib; matplotlib.use('Agg')
from fastai.vision.all import Learner, vision_learner, resnet18, CrossEntropyLossFlat, TensorImage
from torch import nn
from fastreid_rollback.synthetic import synthetic_reid
from fastreid_rollback.data import *
from fastreid_rollback.data import pk_batches, ReIDDL, ReIDDataLoaders, _pk_n_batches
from hypothesis import given, settings, strategies as st

def img(fn, colour=(120, 60, 30), size=(16, 32)):
    fn.parent.mkdir(parents=True, exist_ok=True)
    Image.new('RGB', size, colour).save(fn)
    return fn

# ---------------------------------------------------------------- fixture trees with the real naming
def market_tree(base):
    root = base/'Market-1501-v15.09.15'
    for n in ['0002_c1s1_000451_03.jpg', '0002_c2s1_000551_01.jpg', '0007_c1s6_028546_01.jpg', '0007_c3s3_064744_04.jpg']:
        img(root/'bounding_box_train'/n)
    for n in ['0001_c1s1_001051_00.jpg', '0003_c4s6_015641_00.jpg']: img(root/'query'/n)
    for n in ['0001_c2s1_000301_01.jpg', '0003_c5s1_000126_02.jpg', '0000_c6s1_000076_03.jpg', '-1_c1s1_000401_03.jpg']:
        img(root/'bounding_box_test'/n)
    (root/'bounding_box_test'/'Thumbs.db').write_bytes(b'x')          # shipped with the real archive
    (root/'gt_bbox').mkdir()
    return root

def duke_tree(base):
    root = base/'DukeMTMC-reID'
    for n in ['0001_c2_f0046182.jpg', '0001_c5_f0051341.jpg', '0003_c1_f0044158.jpg']: img(root/'bounding_box_train'/n)
    for n in ['0005_c2_f0046985.jpg']: img(root/'query'/n)
    for n in ['0005_c5_f0051781.jpg', '0019_c1_f0045731.jpg']: img(root/'bounding_box_test'/n)
    return root

def msmt_tree(base, v2=False):
    root = base/('MSMT17_V2' if v2 else 'MSMT17_V1')
    trn,tst = ('mask_train_v2', 'mask_test_v2') if v2 else ('train', 'test')
    lists = {'list_train.txt': (trn, [('0000/0000_000_01_0303morning_0015_0.jpg', 0), ('0000/0000_001_01_0303morning_0015_1.jpg', 0),
                                      ('0001/0001_000_05_0303morning_0016_0.jpg', 1)]),
             'list_val.txt': (trn, [('0001/0001_001_07_0303noon_0036_1.jpg', 1)]),
             'list_query.txt': (tst, [('0000/0000_000_12_0303morning_0032_0.jpg', 0)]),
             'list_gallery.txt': (tst, [('0000/0000_001_03_0303afternoon_0048_2.jpg', 0), ('0002/0002_000_15_0303noon_1024_0.jpg', 2)])}
    for name,(d,rows) in lists.items():
        for rel,_ in rows: img(root/d/rel)
        (root/name).parent.mkdir(parents=True, exist_ok=True)
        (root/name).write_text(''.join(f'{rel} {pid}\n' for rel,pid in rows))
    return root

def cuhk_tree(base):
    root = base/'cuhk03-np'
    for kind in ('labeled', 'detected'):
        for n in ['0001_c1_1.png', '0001_c2_6.png', '0002_c1_2.png']: img(root/kind/'bounding_box_train'/n)
        img(root/kind/'query'/'0700_c1_1.png')
        for n in ['0700_c2_7.png', '0701_c2_9.png']: img(root/kind/'bounding_box_test'/n)
    return root

def check_df(df, n, train_ids, ncams=None):
    assert list(df.columns) == ['path', 'pid', 'camid', 'split']
    assert len(df) == n and set(df.split) == {'train', 'query', 'gallery'}
    assert df.pid.dtype == 'int64' and df.camid.dtype == 'int64'
    assert all(isinstance(p, Path) and p.is_absolute() and p.exists() for p in df.path)
    assert set(df[df.split == 'train'].pid) == train_ids

# ---------------------------------------------------------------- readers
def test_market1501(tmp_path):
    root = market_tree(tmp_path)
    df = market1501(root)
    check_df(df, 10, {2, 7})
    assert market1501(tmp_path).equals(df)                         # the folder above works too
    g = df[df.split == 'gallery']
    assert sorted(g.pid) == [-1, 0, 1, 3]                          # junk and distractor kept
    assert df.set_index(df.path.map(lambda p: p.name)).loc['0003_c4s6_015641_00.jpg'].tolist()[1:] == [3, 4, 'query']

def test_dukemtmc_reid(tmp_path):
    duke_tree(tmp_path)
    df = dukemtmc_reid(tmp_path)
    check_df(df, 6, {1, 3})
    assert sorted(df.camid) == [1, 1, 2, 2, 5, 5]

@pytest.mark.parametrize('v2', [False, True])
def test_msmt17(tmp_path, v2):
    root = msmt_tree(tmp_path, v2)
    df = msmt17(tmp_path)
    check_df(df, 6, {1, 2})                                         # the lists' identities plus 1
    assert len(df[df.split == 'train']) == 3                       # list_val is left out by default
    assert sorted(df[df.split == 'gallery'].camid) == [3, 15]
    assert df[df.split == 'query'].camid.tolist() == [12]
    assert len(msmt17(root, include_val=True).query("split=='train'")) == 4

def test_cuhk03_np(tmp_path):
    root = cuhk_tree(tmp_path)
    for kind in ('labeled', 'detected'):
        df = cuhk03_np(tmp_path, kind=kind)
        check_df(df, 6, {1, 2})
        assert all(kind in p.parts for p in df.path)
    assert cuhk03_np(root).equals(cuhk03_np(tmp_path))

def test_synthetic_loads_with_market1501(tmp_path):
    df = market1501(synthetic_reid(tmp_path, n_ids=6, n_cams=2, imgs_per_id_cam=2, n_distractors=2, n_junk=1))
    assert (df.split == 'train').sum() == 12 and set(df[df.split == 'query'].pid) == {4, 5, 6}

# ---------------------------------------------------------------- reader errors
def test_missing_folder_names_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match='bounding_box_train'): market1501(tmp_path/'nothing')
    (tmp_path/'empty').mkdir()
    with pytest.raises(FileNotFoundError, match='bounding_box_test'): dukemtmc_reid(tmp_path/'empty')
    with pytest.raises(FileNotFoundError, match='list_train.txt'): msmt17(tmp_path/'empty')
    with pytest.raises(FileNotFoundError, match='labeled/bounding_box_train'): cuhk03_np(tmp_path/'empty')
    root = market_tree(tmp_path/'m')
    (root/'query').rename(root/'queries')
    with pytest.raises(FileNotFoundError, match='query'): market1501(root)

def test_unparsable_name(tmp_path):
    root = market_tree(tmp_path)
    img(root/'query'/'person_12.jpg')
    with pytest.raises(ValueError, match=r"person_12\.jpg.*pattern"): market1501(root)
    root = duke_tree(tmp_path/'d')
    img(root/'bounding_box_test'/'0001_c2s1_000451_03.jpg')          # a Market name in a Duke folder
    with pytest.raises(ValueError, match='0001_c2s1_000451_03.jpg'): dukemtmc_reid(root)

def test_empty_split(tmp_path):
    root = market_tree(tmp_path)
    for f in (root/'bounding_box_test').glob('*.jpg'): f.unlink()
    with pytest.raises(ValueError, match="'gallery' split is empty"): market1501(root)
    root = msmt_tree(tmp_path/'m')
    (root/'list_query.txt').write_text('')
    with pytest.raises(ValueError, match="'query' split is empty"): msmt17(root)

def test_msmt17_errors(tmp_path):
    root = msmt_tree(tmp_path)
    (root/'list_gallery.txt').write_text('0000/0000_001_03_0303afternoon_0048_2.jpg\n')
    with pytest.raises(ValueError, match='line 1 of .*list_gallery.txt'): msmt17(root)
    root = msmt_tree(tmp_path/'b')
    (root/'test').rename(root/'images')
    with pytest.raises(FileNotFoundError, match='mask_test_v2'): msmt17(root)
    with pytest.raises(ValueError, match='kind'): cuhk03_np(cuhk_tree(tmp_path/'c'), kind='raw')

def test_several_datasets_below(tmp_path):
    market_tree(tmp_path/'a'); market_tree(tmp_path/'b')
    (tmp_path/'b'/'Market-1501-v15.09.15').rename(tmp_path/'a'/'Market-copy')
    assert market1501(tmp_path/'a').path[0].parent.parent.name == 'Market-1501-v15.09.15'   # the standard name wins
    (tmp_path/'a'/'Market-1501-v15.09.15').rename(tmp_path/'a'/'Market-copy2')
    with pytest.raises(ValueError, match='several'): market1501(tmp_path/'a')

# ---------------------------------------------------------------- DataLoaders
@pytest.fixture(scope='module')
def small(tmp_path_factory):
    root = synthetic_reid(tmp_path_factory.mktemp('syn'), n_ids=12, n_cams=3, imgs_per_id_cam=3, n_distractors=3, n_junk=2)
    return market1501(root)

def test_reid_dls(small):
    dls = reid_dls(small, size=(64, 32), bs=8, seed=0)
    assert isinstance(dls, ReIDDataLoaders) and len(dls.loaders) == 4
    assert dls.n_ids == 6 and list(dls.vocab) == [1, 2, 3, 4, 5, 6] and dls.c == 6
    x,y = dls.one_batch()
    assert isinstance(x, TensorImage) and x.shape == (8, 3, 64, 32) and y.shape == (8,)
    assert abs(float(x.mean())) < 1.5                               # normalised
    q,g = small[small.split == 'query'], small[small.split == 'gallery']
    for dl,part in ((dls.query, q), (dls.gallery, g)):
        assert dl.pids.dtype == torch.long and dl.pids.tolist() == part.pid.tolist()
        assert dl.camids.tolist() == part.camid.tolist() and dl.items == list(part.path)
        b = list(dl)
        assert all(len(o) == 1 for o in b) and sum(len(o[0]) for o in b) == len(part)
        assert torch.equal(b[0][0], dl.one_batch()[0])             # deterministic: no augmentation
    # training batches are augmented (flip) but query batches of the same image are not
    dls.cpu()
    assert all(dl.device == torch.device('cpu') for dl in dls.loaders)
    assert type(dls.new_empty()) is ReIDDataLoaders

def test_seed_reproducible(small):
    a = [y.tolist() for x,y in reid_dls(small, size=(32, 16), bs=8, seed=3).train]
    b = [y.tolist() for x,y in reid_dls(small, size=(32, 16), bs=8, seed=3).train]
    assert a == b

def test_valid_split_within_identities(small):
    dls = reid_dls(small, size=(32, 16), bs=8, valid_pct=0.3, seed=0)
    tr,va = dls.train.dataset.items, dls.valid.dataset.items
    assert len(va) == 6*3 and set(va.pid) == set(tr.pid) and not set(va.path) & set(tr.path)
    with pytest.raises(ValueError, match='valid_pct'): reid_dls(small, valid_pct=1.0)

def test_overridable_tfms(small):
    from fastai.vision.all import Resize
    dls = reid_dls(small, bs=4, item_tfms=[Resize((40, 20))], batch_tfms=[])
    x,_ = dls.one_batch()
    assert x.shape[-2:] == (40, 20) and float(x.max()) <= 1.0       # no normalisation when batch_tfms are replaced
    dls = reid_dls(small, size=(32, 16), bs=4, erasing=1.0)
    assert any(type(t).__name__ == 'RandomErasing' for t in dls.train.after_batch.fs)
    assert dls.query.one_batch()[0].shape[-2:] == (32, 16)

def test_show_batch_titles(small):
    import matplotlib.pyplot as plt
    dls = reid_dls(small, size=(32, 16), bs=8)
    state = dls.train.rng.getstate()
    axs = dls.show_batch(max_n=4)
    assert dls.train.rng.getstate() == state                       # the training order is untouched
    titles = [ax.get_title() for ax in axs]
    assert all(t.startswith('id ') and ' cam ' in t for t in titles)
    axs = dls.query.show_batch(max_n=3)
    assert [ax.get_title() for ax in axs][:3] == [f"id {p} · cam {c}" for p,c in zip(dls.query.pids[:3].tolist(), dls.query.camids[:3].tolist())]
    plt.close('all')

def test_reid_dls_errors(small):
    with pytest.raises(ValueError, match="split 'query'"): reid_dls(small[small.split != 'query'])
    with pytest.raises(ValueError, match='columns'): reid_dls(small.drop(columns='camid'))
    with pytest.raises(ValueError, match='sampler'): reid_dls(small, sampler='balanced')
    with pytest.raises(ValueError, match='on_bad_image'): reid_dls(small, on_bad_image='ignore')

# ---------------------------------------------------------------- PK sampler
def test_pk_batches_structure_and_coverage():
    rng = np.random.default_rng(0)
    for trial in range(20):
        labels = np.repeat(np.arange(15), rng.integers(1, 12, 15))
        p,k = int(rng.integers(2, 6)), int(rng.integers(2, 5))
        bs = pk_batches(labels, p, k, np.random.default_rng(trial))
        for b in bs:
            ids = labels[b].reshape(p, k)
            assert (ids == ids[:, :1]).all() and len(set(ids[:, 0])) == p
        seen = np.concatenate(bs)
        assert set(seen) == set(range(len(labels)))                 # every image at least once
        assert len(seen) < len(labels) + 15*k + p*k                 # and not much more than once
        # replacement only where an identity has fewer than k images
        for b in bs:
            for grp in np.asarray(b).reshape(p, k):
                if len(set(grp)) < k: assert (labels == labels[grp[0]]).sum() < k

def test_pk_errors():
    with pytest.raises(ValueError, match='p=5'): pk_batches(np.arange(4), 5, 2, np.random.default_rng(0))

def test_pk_dataloader(small):
    dls = reid_dls(small, size=(32, 16), sampler='pk', p=3, k=4, bs=5, seed=0)
    dl = dls.train
    assert isinstance(dl, ReIDDL) and dl.bs == 12
    ys = [y for x,y in dl]
    assert len(ys) == len(dl) and all(len(y) == 12 for y in ys)
    for y in ys:
        ids = y.view(3, 4)
        assert (ids == ids[:, :1]).all() and len(set(ids[:, 0].tolist())) == 3
    dl.rng = random.Random(5); a = dl.get_idxs()
    dl.rng = random.Random(5); b = dl.get_idxs()
    dl.rng = random.Random(6); c = dl.get_idxs()
    assert a == b and a != c and set(a) == set(range(len(dl.dataset)))
    dl.rng = random.Random(5); e1 = [y.tolist() for x,y in dl]
    dl.rng = random.Random(5); e2 = [y.tolist() for x,y in dl]
    assert e1 == e2                                                # an epoch is a function of dl.rng
    assert dls.valid.bs == 5 and dls.query.bs == 5
    seq = dl.new(shuffle=False, drop_last=False)                   # what get_preds asks for: every item, in order
    assert seq.get_idxs() == list(range(len(dl.dataset))) and len(seq) == -(-len(dl.dataset)//12)
    with pytest.raises(ValueError, match='p=7'): list(reid_dls(small, sampler='pk', p=7, k=2).train.get_idxs())

# ---------------------------------------------------------------- bad images
def corrupt(df, how, first=False):
    df = df.copy()
    src = df.path[df.split == 'train'].iloc[0]
    bad = src.parent/('0001_c1s1_999999_01.jpg' if how == 'truncated' else '0001_c2s1_999999_01.jpg')
    bad.write_bytes(src.read_bytes()[:200] if how == 'truncated' else b'this is not a jpeg' * 10)
    row = pd.DataFrame([dict(path=bad, pid=1, camid=1, split='train')])
    return pd.concat([row, df] if first else [df, row], ignore_index=True), bad

@pytest.mark.parametrize('how', ['truncated', 'garbage'])
def test_bad_image_raises_with_name(small, how):
    df,bad = corrupt(small, how)
    dls = reid_dls(df, size=(32, 16), bs=4, seed=0)
    with pytest.raises(OSError, match=bad.name): [b for b in dls.train]
    assert find_bad_images(df) == [bad]
    # the first training image is decoded when the DataLoaders are built: the same error, earlier
    df,bad = corrupt(small, how, first=True)
    with pytest.raises(OSError, match=bad.name): reid_dls(df, size=(32, 16), bs=4)
    bad.unlink()

def test_bad_image_in_worker_names_file(small):
    df,bad = corrupt(small, 'garbage')
    dls = reid_dls(df, size=(32, 16), bs=4, seed=0, num_workers=1)
    with pytest.raises(Exception, match=bad.name): [b for b in dls.train]
    bad.unlink()

def test_bad_image_skip(small):
    df,bad = corrupt(small, 'truncated')
    with pytest.warns(UserWarning, match=bad.name): dls = reid_dls(df, size=(32, 16), bs=4, on_bad_image='skip')
    assert bad not in list(dls.train.dataset.items.path) and len(dls.train.dataset) == len(df[df.split == 'train']) - 1
    assert len([b for b in dls.train]) == len(dls.train)
    bad.unlink()

# ---------------------------------------------------------------- training
@pytest.mark.parametrize('valid_pct', [0.0, 0.25])
def test_fit(small, valid_pct):
    dls = reid_dls(small, size=(32, 16), bs=8, valid_pct=valid_pct, seed=0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, dls.n_ids))
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss())
    learn.fit(1, 1e-2)
    assert learn.dls is dls and learn.dls.query is dls.query
    losses = learn.recorder.values[-1]
    assert np.isfinite(losses[0]) and ((losses[1] is None) if valid_pct == 0 else np.isfinite(losses[1]))

def test_fit_resnet18(small):
    df = small[(small.split != 'train') | (small.pid <= 3)]          # 3 identities: a few batches on a busy CPU
    dls = reid_dls(df, size=(32, 16), bs=8, valid_pct=0.25, seed=0)
    learn = vision_learner(dls, resnet18, pretrained=False, loss_func=CrossEntropyLossFlat())
    learn.fit(1, 1e-3)
    assert np.isfinite(learn.recorder.values[-1]).all()

def test_fit_pk(small):
    dls = reid_dls(small, size=(32, 16), sampler='pk', p=3, k=2, seed=0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, dls.n_ids))
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss())
    learn.fit(1, 1e-2)
    assert learn.recorder.losses and all(np.isfinite(float(l)) for l in learn.recorder.losses)

# ---------------------------------------------------------------- bad arguments and odd input: clear errors, no hang
@contextmanager
def no_hang(seconds=20):
    "Fail with TimeoutError instead of hanging"
    def _raise(*_): raise TimeoutError(f"still running after {seconds} s")
    old = signal.signal(signal.SIGALRM, _raise); signal.alarm(seconds)
    try: yield
    finally: signal.alarm(0); signal.signal(signal.SIGALRM, old)

@pytest.mark.parametrize('kw,word', [(dict(p=-1), 'p must be >= 1, got -1'), (dict(p=0), 'p must be >= 1, got 0'),
                                     (dict(k=0), 'k must be >= 1, got 0'), (dict(k=-1), 'k must be >= 1, got -1'),
                                     (dict(p=2.5), 'p must be an int, got 2.5'), (dict(p=1, k=1), 'p*k=1'), (dict(p=7), 'p=7')])
def test_pk_bad_arguments(small, kw, word):
    "Bad p/k: a ValueError naming the argument when the DataLoaders are built, not a hang or a crash later"
    with no_hang(), pytest.raises(ValueError, match=re.escape(word)):
        dl = reid_dls(small, size=(32, 16), sampler='pk', **{'p': 3, 'k': 2, **kw}).train
        len(dl), dl.get_idxs()

def test_pk_functions_check_p_k():
    with no_hang():
        for p,k in [(-1, 2), (0, 2), (2, 0), (2, -1)]:
            with pytest.raises(ValueError, match=f'p must be >= 1, got {p}' if p < 1 else f'k must be >= 1, got {k}'):
                pk_batches(np.arange(8)//2, p, k, np.random.default_rng(0))
        with pytest.raises(ValueError, match='p must be >= 1, got -1'): _pk_n_batches([1, 2, 3], -1)

@pytest.mark.parametrize('kw,word', [(dict(bs=0), 'bs must be >= 1, got 0'), (dict(bs=-3), 'bs must be >= 1, got -3'),
                                     (dict(bs=2.5), 'bs must be an int, got 2.5'), (dict(bs=None), 'bs must be an int, got None'),
                                     (dict(bs=0, sampler='pk', p=3, k=2), 'bs must be >= 1, got 0')])
def test_bs_checked(small, kw, word):
    with no_hang(), pytest.raises(ValueError, match=re.escape(word)): len(reid_dls(small, size=(32, 16), **kw).train)

@pytest.mark.parametrize('kw,word', [(dict(bs=1), 'bs=1: a training batch needs at least 2 images'),   # BatchNorm fails on one
                                     (dict(bs=55), 'bs=55 is more than the 54 training images'),       # no full batch: nothing trained
                                     (dict(bs=40, valid_pct=0.34), 'bs=40 is more than the 36 training images')])
def test_training_refuses_bad_batches(small, kw, word):
    "A fit whose training batches would be of one image or none stops at once with the reason"
    dls = reid_dls(small, size=(32, 16), seed=0, **kw)
    learn = Learner(dls, nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, dls.n_ids)),
                    loss_func=nn.CrossEntropyLoss())
    with no_hang(), pytest.raises(ValueError, match=re.escape(word)): learn.fit(1, 1e-2)
    assert len(dls.query) == -(-len(dls.query.dataset)//dls.query.bs)   # evaluation batches are fine

@pytest.mark.parametrize('kw,msg', [(dict(size=(0, 16)), 'size must be (height, width)'), (dict(size=(32.5, 16)), 'size must be (height, width)'),
                                    (dict(size='32x16'), 'size must be (height, width)'), (dict(size=(32, 16, 3)), 'size must be (height, width)'),
                                    (dict(erasing=1.5), 'erasing must be a probability'), (dict(erasing=-0.1), 'erasing must be a probability')])
def test_transform_arguments_checked(small, kw, msg):
    with pytest.raises(ValueError, match=re.escape(msg)): reid_dls(small, **{'size': (32, 16), **kw})

def test_bs_edges_work(small):
    dls = reid_dls(small, size=(32, 16), bs=54)                    # every training image in one batch
    assert len(dls.train) == 1 and len(dls.train.one_batch()[1]) == 54
    dls = reid_dls(small, size=(32, 16), bs=1, sampler='pk', p=2, k=2)   # bs is only the evaluation batch size here
    assert dls.train.bs == 4 and dls.query.bs == 1 and len(dls.query) == len(dls.query.dataset)

def test_empty_eval_sets_have_no_loader(small):
    dls = reid_dls(small, size=(32, 16), bs=8)
    two = ReIDDataLoaders(dls.train, dls.valid)                    # no query/gallery loaders: None, not an IndexError
    assert two.query is None and two.gallery is None

def with_value(df, col, row, value):
    df = df.copy().astype({col: object})
    df.loc[row, col] = value
    return df

@pytest.mark.parametrize('col,value', [('camid', np.nan), ('camid', None), ('camid', 1.5), ('camid', 'c1'),
                                       ('pid', np.nan), ('pid', 7.5), ('pid', 'seven'), ('pid', -2), ('pid', True), ('pid', 2**70)])
@pytest.mark.parametrize('split', ['train', 'query', 'gallery'])
def test_ids_checked_where_the_df_enters(small, col, value, split):
    "NaN, fractional, string, boolean, huge ids and pids below -1: a ValueError naming the column and the row"
    row = small.index[small.split == split][1]
    with pytest.raises(ValueError, match=rf"column {col!r}.*row {row}\b"): reid_dls(with_value(small, col, row, value), size=(32, 16))

def test_reid_dl_checks_ids(small):
    dls = reid_dls(small, size=(32, 16), bs=8)
    q = small[small.split == 'query']
    with pytest.raises(ValueError, match=rf"column 'camid', row {q.index[0]}: nan"): dls.reid_dl(with_value(q, 'camid', q.index[0], np.nan))
    assert dls.reid_dl(q.astype({'pid': float})).pids.tolist() == q.pid.tolist()
    with pytest.raises(ValueError, match='df has no row'): dls.reid_dl(q.iloc[:0])

def test_integral_float_ids_are_ints(small):
    "A DataFrame read from a CSV with floats 7.0 works: ids become int64"
    df = small.astype({'pid': float, 'camid': float})
    dls = reid_dls(df, size=(32, 16), bs=8)
    assert dls.query.pids.dtype == torch.long and dls.query.pids.tolist() == small[small.split == 'query'].pid.tolist()
    assert list(dls.vocab) == [1, 2, 3, 4, 5, 6]

def test_pid_zero_outside_gallery_warns(small):
    "pid 0 marks distractors, -1 junk (gallery only): a DataFrame numbering identities from 0 is told"
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        reid_dls(small, size=(32, 16), bs=8)                       # the Market convention: no warning
    df = small[small.pid > 0].assign(pid=lambda d: d.pid - 1)      # identities numbered from 0
    with pytest.warns(UserWarning, match=r"9 'train' rows have pid 0.*distractor.*number them from 1"): reid_dls(df, size=(32, 16), bs=8)
    df = with_value(small, 'pid', small.index[small.split == 'query'][0], 0)
    with pytest.warns(UserWarning, match=r"1 'query' row has pid 0"): reid_dls(df, size=(32, 16), bs=8)

# ---------------------------------------------------------------- readers: odd files
@pytest.mark.parametrize('reader,tree,old,new', [
    (market1501, market_tree, 'bounding_box_train/0002_c1s1_000451_03.jpg', 'bounding_box_train/0002_c1s1_000451_03.png'),
    (market1501, market_tree, 'query/0001_c1s1_001051_00.jpg', 'query/0001_c1s1_001051_00.JPG'),
    (market1501, market_tree, 'bounding_box_test/0003_c5s1_000126_02.jpg', 'bounding_box_test/0003_c5s1_000126_02.jpeg'),
    (dukemtmc_reid, duke_tree, 'query/0005_c2_f0046985.jpg', 'query/0005_c2_f0046985.PNG'),
    (cuhk03_np, cuhk_tree, 'labeled/query/0700_c1_1.png', 'labeled/query/0700_c1_1.JPG')])
def test_other_image_formats_are_read(tmp_path, reader, tree, old, new):
    root = tree(tmp_path)
    n = len(reader(root))
    (root/old).unlink(); img(root/new)
    df = reader(root)
    assert len(df) == n and (root/new).resolve() in set(df.path)

def test_symlink_loop_named(tmp_path):
    root = market_tree(tmp_path)
    loop = root/'query'/'0005_c1s1_000001_00.jpg'
    os.symlink(loop.name, loop)                                    # a link to itself
    with pytest.raises(ValueError, match=re.escape(str(loop))): market1501(root)

def test_binary_msmt_list_named(tmp_path):
    root = msmt_tree(tmp_path)
    (root/'list_query.txt').write_bytes(bytes(range(256)))
    with pytest.raises(ValueError, match=r'list_query\.txt.*not a text file'): msmt17(root)

def test_msmt17_ids_from_one(tmp_path):
    "MSMT17 numbers identities from 0; pid 0 means a distractor here, so the reader adds 1 (else identity 0's queries are dropped)"
    df = msmt17(msmt_tree(tmp_path))
    assert set(df.pid) == {1, 2, 3} and (df.pid > 0).all()

def test_cuhk03_hints_kind(tmp_path):
    root = cuhk_tree(tmp_path)
    import shutil; shutil.rmtree(root/'labeled')
    with pytest.raises(FileNotFoundError, match="kind='detected'"): cuhk03_np(root)
    assert len(cuhk03_np(root, kind='detected')) == 6

# ---------------------------------------------------------------- readers: property-based tests of the file names
def write_tree(root, names_by_dir):
    for d in ('bounding_box_train', 'query', 'bounding_box_test'): (root/d).mkdir(parents=True, exist_ok=True)
    for d,names in names_by_dir.items():
        for n in names: (root/d/n).write_bytes(b'')               # the readers parse names; they do not open images

exts = st.sampled_from(['.jpg', '.JPG', '.jpeg', '.Jpeg', '.png', '.PNG'])
pids,cams,nums = st.integers(-1, 99999), st.integers(0, 99), st.integers(0, 999999)

@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(pids, cams, nums, nums, exts), min_size=3, max_size=12, unique_by=lambda t: t[:4]))
def test_market_names_round_trip(boxes):
    "Every valid Market-1501 name is read back with its identity and camera, whatever the image extension"
    with tempfile.TemporaryDirectory() as d:
        names = [f"{'-1' if p == -1 else f'{p:04d}'}_c{c}s{s % 10}_{f:06d}_{f % 100:02d}{e}" for p,c,s,f,e in boxes]
        dirs = {'bounding_box_train': names[0::3], 'query': names[1::3], 'bounding_box_test': names[2::3]}
        write_tree(Path(d), dirs)
        df = market1501(d)
        got = {(p.name, pid, cam) for p,pid,cam in zip(df.path, df.pid, df.camid)}
        assert got == {(n, p, c) for n,(p,c,*_) in zip(names, boxes)}

@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(pids, cams, nums, exts), min_size=3, max_size=12, unique_by=lambda t: t[:3]))
def test_duke_names_round_trip(boxes):
    with tempfile.TemporaryDirectory() as d:
        names = [f"{p:04d}_c{c}_f{f:07d}{e}" for p,c,f,e in boxes]
        write_tree(Path(d), {'bounding_box_train': names[0::3], 'query': names[1::3], 'bounding_box_test': names[2::3]})
        df = dukemtmc_reid(d)
        assert sorted(zip(df.pid, df.camid)) == sorted((p, c) for p,c,*_ in boxes)

odd_names = st.text(st.characters(blacklist_characters='/\x00', blacklist_categories=('Cs',)), min_size=1, max_size=40).filter(lambda n: n not in ('.', '..'))

@settings(max_examples=80, deadline=None)
@given(odd_names, st.sampled_from(['', '.jpg', '.png', '.JPG', '.txt']))
def test_odd_names_named_or_ignored(name, ext):
    "Any other file name is ignored (not an image) or read, or gives a ValueError naming the file: never another error"
    with tempfile.TemporaryDirectory() as d:
        good = {'bounding_box_train': ['0001_c1s1_000001_01.jpg'], 'query': ['0002_c1s1_000001_01.jpg'], 'bounding_box_test': ['0002_c2s1_000001_01.jpg']}
        write_tree(Path(d), good)
        try: (Path(d)/'query'/(name+ext)).write_bytes(b'')
        except OSError: return                                      # a name the file system refuses (too long, ...)
        try: df = market1501(d)
        except ValueError as e: assert (name+ext) in str(e); return
        assert set(df.pid) <= {1, 2} or Path(d, 'query', name+ext).resolve() in set(df.path)

@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_characters='\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029', blacklist_categories=('Cs',)), max_size=40), min_size=1, max_size=3))
def test_msmt_odd_lines_named(lines):
    "Any MSMT17 list line is read, or gives a ValueError naming the list and the line"
    with tempfile.TemporaryDirectory() as d:
        root = msmt_tree(Path(d))
        with open(root/'list_gallery.txt', 'a') as f: f.write(''.join(l+'\n' for l in lines))
        try: msmt17(root)
        except ValueError as e: assert 'list_gallery.txt' in str(e) and re.search(r'line \d+', str(e))
        except FileNotFoundError as e: assert 'list_gallery.txt' in str(e)

def test_input_size(small):
    "`reid_dls` records its input size; `input_size` reads it, else the one test-time `Resize`, else says how to set it"
    from fastai.data.core import DataLoaders
    from fastai.vision.augment import Resize
    dls = reid_dls(small, size=(32, 16), bs=4)
    assert dls.size == input_size(dls) == (32, 16)
    assert input_size(DataLoaders(*dls.loaders[:2])) == (32, 16)
    assert reid_dls(small, item_tfms=[Resize((24, 12))], bs=4).size is None
    assert input_size(reid_dls(small, item_tfms=[Resize((24, 12))], bs=4)) == (24, 12)
    with pytest.raises(ValueError, match=re.escape('set dls.size = (height, width)')): input_size(reid_dls(small, item_tfms=[], bs=4))
    assert reid_dls(small, bs=4).size == reid_size
