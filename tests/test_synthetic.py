"Tests of `synthetic_reid`: layout, determinism, disjoint domains, errors."
import json, os, random, re
import numpy as np, pytest
from PIL import Image
from fastreid_rollback.synthetic import synthetic_reid

SMALL = dict(n_ids=6, n_cams=3, imgs_per_id_cam=2, n_distractors=3, n_junk=2, size=(64, 32))

def files(root): return {str(f.relative_to(root)): f.read_bytes() for f in sorted(root.rglob('*')) if f.is_file()}

def parse(name):
    pid,rest = name.split('_c', 1)
    return int(pid), int(rest.split('s', 1)[0])

def test_layout(tmp_path):
    root = synthetic_reid(tmp_path, **SMALL)
    assert root == tmp_path/'Market-1501-v15.09.15'
    sets = {d: [parse(f.name) for f in (root/d).glob('*.jpg')] for d in ('bounding_box_train', 'query', 'bounding_box_test')}
    assert {p for p,c in sets['bounding_box_train']} == {1, 2, 3}
    assert {p for p,c in sets['query']} == {4, 5, 6}
    assert len(sets['bounding_box_train']) == 3*3*2
    g = sets['bounding_box_test']
    assert sum(p == 0 for p,c in g) == 3 and sum(p == -1 for p,c in g) == 2
    qcam = {p: c for p,c in sets['query']}
    assert len({(p, c) for p,c in sets['query']}) == 3            # one query camera per test identity
    assert all(c != qcam[p] for p,c in g if p > 0)                # gallery from the other cameras
    assert {c for p,c in sets['query'] + g} <= {1, 2, 3}
    im = Image.open(next((root/'query').iterdir()))
    assert im.format == 'JPEG' and im.size == (32, 64) and im.mode == 'RGB'
    assert not [f for f in tmp_path.iterdir() if f.name.startswith('.')]   # no temporary folder left

def test_same_arguments_same_bytes(tmp_path):
    random.seed(1); np.random.seed(1)
    a = files(synthetic_reid(tmp_path/'a', **SMALL))
    random.seed(2); np.random.seed(2)                              # global RNGs play no part
    b = files(synthetic_reid(tmp_path/'b', **SMALL))
    assert a == b
    c = files(synthetic_reid(tmp_path/'c', **SMALL, seed=1))
    assert a.keys() != c.keys() or a != c
    assert {k: v for k,v in a.items() if k.endswith('.jpg')} != {k: v for k,v in c.items() if k.endswith('.jpg')}

def test_identity_and_camera_are_functions_of_seed(tmp_path):
    # identity 1 seen by camera 1 looks the same whatever else the dataset holds
    a = synthetic_reid(tmp_path/'a', **SMALL)
    b = synthetic_reid(tmp_path/'b', **{**SMALL, 'n_ids': 10, 'n_cams': 4, 'n_distractors': 0})
    fa = sorted((a/'bounding_box_train').glob('0001_c1s*.jpg'))
    fb = sorted((b/'bounding_box_train').glob('0001_c1s*.jpg'))
    assert len(fa) == 2 and [f.name for f in fa] == [f.name for f in fb[:2]]
    assert [f.read_bytes() for f in fa] == [f.read_bytes() for f in fb[:2]]

def test_disjoint_source_domain(tmp_path):
    tgt = synthetic_reid(tmp_path/'tgt', **SMALL)
    src = synthetic_reid(tmp_path/'src', **SMALL, id_start=1001, cam_start=7)
    ids = lambda r: {parse(f.name)[0] for f in r.rglob('*.jpg')} - {0, -1}
    cams = lambda r: {parse(f.name)[1] for f in r.rglob('*.jpg')}
    assert ids(src) == set(range(1001, 1007)) and not ids(src) & ids(tgt)
    assert cams(src) == {7, 8, 9} and not cams(src) & cams(tgt)

def test_identities_differ_and_persist(tmp_path):
    "Images of one identity are closer to each other than to other identities (in the same camera)"
    root = synthetic_reid(tmp_path, n_ids=12, n_cams=2, imgs_per_id_cam=4, n_distractors=0, n_junk=0)
    def crop(f): return np.asarray(Image.open(f), dtype=float)[16:-16, 16:-16].mean((0, 1))  # mean colour of the person area
    same,other = [],[]
    for p in range(1, 7):
        x = [crop(f) for f in sorted((root/'bounding_box_train').glob(f'{p:04d}_c1s*.jpg'))]
        y = [crop(f) for f in sorted((root/'bounding_box_train').glob(f'{p%6+1:04d}_c1s*.jpg'))]
        same.append(np.linalg.norm(x[0]-x[1])); other.append(np.linalg.norm(x[0]-y[0]))
    assert np.mean(same) < np.mean(other)

def test_cached_and_errors(tmp_path):
    root = synthetic_reid(tmp_path, **SMALL)
    stamp = (root/'query').stat().st_mtime_ns
    assert synthetic_reid(tmp_path, **SMALL) == root and (root/'query').stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match='overwrite=True'): synthetic_reid(tmp_path, **{**SMALL, 'seed': 3})
    root2 = synthetic_reid(tmp_path, **{**SMALL, 'seed': 3}, overwrite=True)
    assert root2 == root and files(root) != {}
    (tmp_path/'mine'/'x').mkdir(parents=True)
    with pytest.raises(FileExistsError, match='mine'): synthetic_reid(tmp_path, name='mine', overwrite=True)
    assert (tmp_path/'mine'/'x').exists()                           # never deletes a folder it did not make
    for kw,word in [(dict(n_ids=1), 'n_ids'), (dict(n_cams=1), 'n_cams'), (dict(imgs_per_id_cam=0), 'imgs_per_id_cam'),
                    (dict(id_start=0), 'id_start'), (dict(size=(8, 4)), 'size')]:
        with pytest.raises(ValueError, match=word): synthetic_reid(tmp_path/'e', **kw)

@pytest.mark.parametrize('kw,msg', [(dict(seed=-1), 'seed must be >= 0, got -1'), (dict(seed=1.5), 'seed must be an int, got 1.5'),
                                    (dict(size=64), 'size must be (height, width)'), (dict(size=(64,)), 'size must be (height, width)'),
                                    (dict(size='64x32'), 'size must be (height, width)'), (dict(size=(64.5, 32)), 'size must be (height, width)'),
                                    (dict(n_distractors=-1), 'n_distractors must be >= 0, got -1'), (dict(n_junk=-2), 'n_junk must be >= 0, got -2'),
                                    (dict(quality=500), 'quality must be in 1..95'), (dict(quality=0), 'quality must be in 1..95'),
                                    (dict(n_ids=6.5), 'n_ids must be an int'), (dict(n_cams=True), 'n_cams must be an int')])
def test_bad_arguments_named(tmp_path, kw, msg):
    "Every bad argument: a ValueError naming it, before anything is written"
    with pytest.raises(ValueError, match=re.escape(msg)): synthetic_reid(tmp_path/'d', **{**SMALL, **kw})
    assert not (tmp_path/'d').exists()

@pytest.mark.parametrize('text', ['{"n_ids": 6,', '[1, 2]', '\udcff'])
def test_damaged_marker_named(tmp_path, text):
    root = synthetic_reid(tmp_path, **SMALL)
    before = files(root/'query')
    (root/'synthetic_reid.json').write_bytes(text.encode('utf-8', 'surrogateescape'))
    for overwrite in (False, True):
        with pytest.raises(ValueError, match='synthetic_reid.json'): synthetic_reid(tmp_path, **SMALL, overwrite=overwrite)
    assert files(root/'query') == before                           # nothing deleted

def test_modes_follow_the_umask(tmp_path):
    "The dataset folder is not left with the temporary folder's mode 0700"
    old = os.umask(0o022)
    try: root = synthetic_reid(tmp_path, **SMALL)
    finally: os.umask(old)
    assert root.stat().st_mode & 0o777 == 0o755 and (root/'query').stat().st_mode & 0o777 == 0o755
    assert {f.stat().st_mode & 0o777 for f in root.rglob('*') if f.is_file()} == {0o644}

def test_n_train_ids(tmp_path):
    "Few training identities and a large test set: the first `n_train_ids` identities train, the rest are queried"
    root = synthetic_reid(tmp_path, **{**SMALL, 'n_train_ids': 2})
    ids = lambda d: {parse(f.name)[0] for f in (root/d).glob('*.jpg')} - {0, -1}
    assert ids('bounding_box_train') == {1, 2} and ids('query') == {3, 4, 5, 6} and ids('bounding_box_test') == {3, 4, 5, 6}
    marker = json.loads((root/'synthetic_reid.json').read_text())
    assert marker['n_train_ids'] == 2 and 'shift' not in marker
    default = synthetic_reid(tmp_path/'d', **SMALL)
    assert not {'n_train_ids', 'shift'} & set(json.loads((default/'synthetic_reid.json').read_text()))  # old markers stay valid
    assert files(synthetic_reid(tmp_path/'e', **{**SMALL, 'n_train_ids': 3})) == files(default) | {
        'synthetic_reid.json': (tmp_path/'e'/'Market-1501-v15.09.15'/'synthetic_reid.json').read_bytes()}  # n_ids//2 given explicitly

def test_shift(tmp_path):
    "A low-level shift changes the pixels per camera, not the layout; shift=0 is the default, byte for byte"
    base = synthetic_reid(tmp_path/'0', **SMALL)
    assert files(synthetic_reid(tmp_path/'z', **SMALL, shift=0.)) == files(base)
    a,b = synthetic_reid(tmp_path/'a', **SMALL, shift=1.),synthetic_reid(tmp_path/'b', **SMALL, shift=1.)
    assert files(a) == files(b)
    assert json.loads((a/'synthetic_reid.json').read_text())['shift'] == 1.
    jpgs = lambda r: sorted(str(f.relative_to(r)) for f in r.rglob('*.jpg'))
    assert jpgs(a) == jpgs(base)
    def mean_diff(r, cam):
        fs = [f for f in sorted(r.rglob(f'*_c{cam}s*.jpg'))]
        return np.mean([np.abs(np.asarray(Image.open(f), float) - np.asarray(Image.open(base/f.relative_to(r)), float)).mean() for f in fs])
    weak = synthetic_reid(tmp_path/'w', **SMALL, shift=0.3)
    for cam in (1, 2, 3): assert mean_diff(a, cam) > mean_diff(weak, cam) > 1   # stronger shift, larger change, in every camera
    # the camera's shift is a function of (seed, camera): the same camera looks the same whatever else the dataset holds
    c = synthetic_reid(tmp_path/'c', **{**SMALL, 'n_ids': 8, 'n_train_ids': 3}, shift=1.)
    fa = sorted((a/'bounding_box_train').glob('0001_c2s*.jpg'))
    assert [x.read_bytes() for x in fa] == [(c/'bounding_box_train'/x.name).read_bytes() for x in fa]

def test_new_arguments_checked(tmp_path):
    for kw,word in [(dict(n_train_ids=6), 'n_train_ids'), (dict(n_train_ids=0), 'n_train_ids'), (dict(shift=-1.), 'shift')]:
        with pytest.raises(ValueError, match=word): synthetic_reid(tmp_path/'e', **{**SMALL, **kw})
