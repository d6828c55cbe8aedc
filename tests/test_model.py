"Failure cases and compatibility checks of `fastreid_rollback.model` that do not fit the notebook"
import os, pickle, pytest, torch
from torch import nn
from torchvision.models import get_model, ResNet18_Weights
from fastreid_rollback.backbones import *
from fastreid_rollback.model import *


@pytest.fixture
def hub_dir(tmp_path):
    "A fresh, empty torch hub cache for one test"
    old = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path/'hub'))
    yield tmp_path/'hub'
    torch.hub.set_dir(old)


@pytest.fixture
def no_download(monkeypatch):
    "Fail loudly if anything tries to download"
    def _boom(*a, **k): raise AssertionError('tried to download')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', _boom)
    monkeypatch.setattr(torch.hub, 'download_url_to_file', _boom)


def test_pretrained_true_missing_says_where(hub_dir, no_download):
    with pytest.raises(FileNotFoundError) as e: create_reid_model('resnet18', n_ids=3, pretrained=True)
    msg = str(e.value)
    assert str(hub_dir/'checkpoints'/'resnet18-f37072fd.pth') in msg and 'pretrained=<path' in msg


def test_pretrained_true_from_cache(hub_dir, no_download):
    tv = get_model('resnet18', weights=None)
    fn = weights_cache_file(ResNet18_Weights.DEFAULT)
    assert fn == hub_dir/'checkpoints'/'resnet18-f37072fd.pth'
    fn.parent.mkdir(parents=True)
    torch.save(tv.state_dict(), fn)
    for pretrained in (True, ResNet18_Weights.IMAGENET1K_V1):
        m = create_reid_model('resnet18', n_ids=3, pretrained=pretrained)
        assert torch.equal(m.backbone.layer4[1].bn2.running_var, tv.layer4[1].bn2.running_var)
        assert list(m.pretrained_state) == ['stem', 'layer1', 'layer2', 'layer3', 'layer4']
        assert torch.equal(m.pretrained_state['stem']['conv1.weight'], tv.conv1.weight)
        assert all(v.device.type == 'cpu' for s in m.pretrained_state.values() for v in s.values())
        assert not any(k.startswith(('head', 'classifier')) for s in m.pretrained_state.values() for k in s)


def test_pretrained_state_is_a_copy(tmp_path):
    src = create_reid_model('resnet18', n_ids=3)
    m = create_reid_model('resnet18', n_ids=3, pretrained=save_backbone(src, tmp_path/'b.pth'))
    with torch.no_grad(): m.backbone.conv1.weight.add_(1.)
    assert torch.equal(m.pretrained_state['stem']['conv1.weight'], src.backbone.conv1.weight)


def test_local_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothing.pth'): create_reid_model('resnet18', n_ids=3, pretrained=tmp_path/'nothing.pth')
    sd = get_model('resnet18', weights=None).state_dict()
    del sd['layer2.0.conv1.weight']; sd['extra.weight'] = torch.zeros(1)
    torch.save(sd, tmp_path/'bad.pth')
    with pytest.raises(ValueError) as e: create_reid_model('resnet18', n_ids=3, pretrained=tmp_path/'bad.pth')
    assert 'bad.pth' in str(e.value) and "'layer2.0.conv1.weight'" in str(e.value) and "'extra.weight'" in str(e.value)
    sd = get_model('resnet18', weights=None).state_dict()
    sd['conv1.weight'] = torch.zeros(64, 3, 3, 3)
    torch.save(sd, tmp_path/'shape.pth')
    with pytest.raises(ValueError, match="'conv1.weight' has shape"): create_reid_model('resnet18', n_ids=3, pretrained=tmp_path/'shape.pth')
    with pytest.raises(ValueError, match='pretrained=3'): create_reid_model('resnet18', n_ids=3, pretrained=3)


def write_unusable(fn, content):
    "Files that are no state dict"
    if content == 'garbage': fn.write_bytes(bytes(range(256))*8)
    elif content == 'text': fn.write_text('these are not weights\n')
    elif content == 'empty': fn.write_bytes(b'')
    elif content == 'pickle': fn.write_bytes(pickle.dumps({'a': 1}))             # plain pickle, not torch.save
    elif content == 'list': torch.save([torch.zeros(2)], fn)
    elif content == 'tensor': torch.save(torch.zeros(2), fn)
    elif content == 'module': torch.save(nn.Linear(2, 2), fn)                  # a whole module, not its state dict
    return fn

@pytest.mark.parametrize('content', ['garbage', 'text', 'empty', 'pickle', 'list', 'tensor', 'module'])
def test_unusable_pretrained_file_named(tmp_path, content):
    "A file that is no state dict: a ValueError naming it, never torch's advice to load untrusted pickles"
    fn = write_unusable(tmp_path/f'{content}.pth', content)
    with pytest.raises(ValueError) as e: create_reid_model('resnet18', n_ids=3, pretrained=fn)
    msg = str(e.value)
    assert str(fn) in msg and 'weights_only' not in msg and 'state dict' in msg, msg
    assert e.value.__cause__ is None and (e.value.__context__ is None or e.value.__suppress_context__)   # no chained torch message either


def test_loads_fastai_and_ddp_files(tmp_path):
    src = create_reid_model('resnet18', n_ids=4)
    torch.save({'model': src.state_dict(), 'opt': {}}, tmp_path/'learn.pth')     # as fastai's learn.save writes
    torch.save({f'module.{k}':v for k,v in src.state_dict().items()}, tmp_path/'ddp.pth')
    for fn in ('learn.pth', 'ddp.pth'):
        m = create_reid_model('resnet18', n_ids=9, pretrained=tmp_path/fn)
        assert torch.equal(m.backbone.layer1[0].conv1.weight, src.backbone.layer1[0].conv1.weight)


def test_state_file_with_numpy_scalars(tmp_path):
    "What fastai optimizer states hold besides tensors (numpy scalars, dtypes, fastcore `L`s) loads with `weights_only`"
    import numpy as np
    from fastcore.foundation import L
    sd = {'w': torch.ones(2), 'lr': np.float64(0.01), 'step': np.int64(3), 'mom': np.float32(0.9), 'dt': np.dtype('float32'), 'groups': L([1, 2])}
    torch.save(sd, tmp_path/'opt.pth')
    got = load_state_file(tmp_path/'opt.pth', 'opt.pth')
    assert [type(got[k]) for k in ('lr', 'step', 'mom')] == [np.float64, np.int64, np.float32]
    assert got['lr'] == 0.01 and got['step'] == 3 and got['dt'] == np.float32 and list(got['groups']) == [1, 2] and torch.equal(got['w'], sd['w'])

def test_bad_arguments():
    with pytest.raises(ValueError, match="arch='vgg16'"): create_reid_model('vgg16', n_ids=3)
    with pytest.raises(ValueError, match='n_ids must be >= 1, got 0'): create_reid_model('resnet18', n_ids=0)
    with pytest.raises(ValueError, match='n_ids must be an int, got 2.5'): create_reid_model('resnet18', n_ids=2.5)
    with pytest.raises(ValueError, match='n_ids must be an int, got True'): create_reid_model('resnet18', n_ids=True)
    with pytest.raises(ValueError, match="neck='fancy'"): create_reid_model('resnet18', n_ids=3, neck='fancy')
    with pytest.raises(ValueError, match="no module 'layer5' for block 'layer5'"):
        create_reid_model(get_model('resnet18'), n_ids=3, blocks=['layer1', 'layer5'])
    with pytest.raises(ValueError, match='pretrained=True needs an architecture name'):
        create_reid_model(nn.Sequential(nn.Conv2d(3, 4, 3)), n_ids=3, blocks=['0'], pretrained=True)
    with pytest.raises(ValueError, match='expected a ReIDModel'): reid_splitter(nn.Linear(2, 2))


def test_numpy_n_ids():
    import numpy as np
    m = create_reid_model('resnet18', n_ids=np.int64(7))                              # e.g. a count from pandas
    assert m.n_ids == 7 and type(m.n_ids) is int and m.head.classifier.out_features == 7

@pytest.mark.parametrize('arch', ['resnet34', 'resnext50_32x4d', 'wide_resnet50_2'])
def test_every_resnet_family(arch):
    m = create_reid_model(arch, n_ids=5)
    assert m.block_names == ['stem', 'layer1', 'layer2', 'layer3', 'layer4']
    assert m.feat_dim == (512 if arch == 'resnet34' else 2048)
    groups = reid_splitter(m)
    assert [len(g) for g in groups[:-1]] == [len(list(p for o in block_modules(m, n) for p in o.parameters())) for n in m.block_names]


def test_model_from_parts():
    "A ReIDModel is its parts, as `create_reid_model` assembles them"
    m = ReIDModel(create_backbone('resnet18'), ClassBlock(512, 9), resnet_blocks, neck_feat=True)
    assert (m.n_ids, m.feat_dim, m.block_names, m.pretrained_state, m.neck_feat) == (9, 512, list(resnet_blocks), None, True)
    with pytest.raises(ValueError, match="no module 'layer9'"): ReIDModel(create_backbone('resnet18'), ClassBlock(512, 9), ['layer9'])
    a = create_reid_model('resnet18', n_ids=7, neck='bnneck', with_feats=True)
    assert type(a) is ReIDModel and a.with_feats and isinstance(a.head, BNNeck)
    assert a.training and a.backbone.training   # finding the feature size left the body in training mode

def test_torchvision_module_backbone():
    tv = get_model('resnet18', weights=None)
    m = create_reid_model(tv, n_ids=5, neck='bnneck')
    assert m.block_names == ['stem', 'layer1', 'layer2', 'layer3', 'layer4'] and m.feat_dim == 512 and m.backbone.layer4 is tv.layer4
    assert not hasattr(m.backbone, 'fc') and list(m.backbone.state_dict()) == [k for k in tv.state_dict() if not k.startswith('fc.')]
    assert m.features(torch.randn(2, 3, 64, 32)).shape == (2, 512)


def test_neck_feat():
    m = create_reid_model('resnet18', n_ids=5, neck='bnneck', neck_feat=True).eval()
    x = torch.randn(3, 3, 64, 32)
    assert torch.allclose(m.features(x), m.head.neck(m.pooled(x)))
    m = create_reid_model('resnet18', n_ids=5, neck_feat=True).eval()
    assert m.features(x).shape == (3, 512)


def test_load_block_state_keeps_device_dtype_and_objects():
    m = create_reid_model('resnet18', n_ids=5)
    snap = snapshot_blocks(m)
    m = m.double()
    p = m.backbone.layer3[0].conv1.weight
    with torch.no_grad(): p.mul_(0.)
    load_block_state(m, 'layer3', snap['layer3'])
    assert m.backbone.layer3[0].conv1.weight is p and p.dtype == torch.float64
    assert torch.allclose(p, snap['layer3']['layer3.0.conv1.weight'].double())
    with pytest.raises(ValueError, match="'layer3.0.conv1.weight' has shape"):
        load_block_state(m, 'layer3', {**snap['layer3'], 'layer3.0.conv1.weight': torch.zeros(1)})


def test_wrappers_and_syncbn():
    m = create_reid_model('resnet18', n_ids=5)
    dp = nn.DataParallel(m)
    assert unwrap_model(dp) is m and block_names(dp) == m.block_names
    assert [id(p) for g in reid_splitter(dp) for p in g] == [id(p) for g in reid_splitter(m) for p in g]
    s = nn.SyncBatchNorm.convert_sync_batchnorm(create_reid_model('resnet18', n_ids=5, neck='bnneck'))
    assert isinstance(block_modules(s, 'layer1')[0][0].bn1, nn.SyncBatchNorm)
    assert isinstance(s.head.neck[0], nn.SyncBatchNorm)
    load_block_state(s, 'layer1', block_state(m, 'layer1'))
    assert torch.equal(s.backbone.layer1[0].bn1.running_var, m.backbone.layer1[0].bn1.running_var)


def test_splitter_puts_pool_params_with_head():
    "Every backbone tensor is in one block; the GeM exponent (outside the backbone) trains with the head"
    body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 8, 3))
    with pytest.raises(ValueError, match=r"no block: \['1.weight', '1.bias', '1.running_mean'"): create_reid_model(body, n_ids=3, blocks=['0', '2'])
    m = create_reid_model(body, n_ids=3, blocks={'low': ['0', '1'], 'high': ['2']}, pool='gem')
    groups = reid_splitter(m)
    assert len(groups) == 3 and groups[0] == list(body[:2].parameters()) and groups[1] == list(body[2].parameters())
    assert groups[2] == [m.pool.p, *m.head.parameters()]
    assert sum(map(len, groups)) == len(list(m.parameters()))


def test_save_backbone_is_atomic_and_loadable(tmp_path):
    m = create_reid_model('resnet18', n_ids=5)
    fn = save_backbone(nn.DataParallel(m), tmp_path/'sub'/'bb.pth')
    assert fn.is_file() and [p.name for p in fn.parent.iterdir()] == ['bb.pth']
    sd = torch.load(fn, weights_only=True)
    assert not any(k.startswith(('fc.', 'head.')) for k in sd)
    m2 = create_reid_model(get_model('resnet18'), n_ids=2, pretrained=fn)
    assert torch.equal(m2.backbone.bn1.running_mean, m.backbone.bn1.running_mean)


@pytest.mark.parametrize('umask', [0o022, 0o077, 0o002])
def test_atomic_save_respects_umask(tmp_path, umask):
    "The file's mode is what the umask gives a new file (the temporary file's 0600 must not survive the rename)"
    old = os.umask(umask)
    try:
        fn = atomic_save({'x': torch.zeros(2)}, tmp_path/'a.pth')
        assert fn.stat().st_mode & 0o777 == 0o666 & ~umask
        atomic_save({'x': torch.ones(2)}, fn)                                  # replacing a file: same rule
        assert fn.stat().st_mode & 0o777 == 0o666 & ~umask and torch.load(fn)['x'].sum() == 2
    finally: os.umask(old)
    assert [p.name for p in tmp_path.iterdir()] == ['a.pth']


@pytest.mark.parametrize('umask', [0o022, 0o077, 0o002])
def test_atomic_write_mode_when_the_writer_replaces_the_file(tmp_path, umask):
    "A writer that writes by name and replaces the file (safetensors' `save_file` makes it 0600) still gives the umask's mode"
    from safetensors.torch import save_file
    old = os.umask(umask)
    try:
        fn = atomic_write(tmp_path/'a.safetensors', lambda f: save_file({'x': torch.zeros(2)}, f.name))
        def replace(f): os.unlink(f.name); os.close(os.open(f.name, os.O_CREAT | os.O_WRONLY, 0o400))
        fn2 = atomic_write(tmp_path/'b.bin', replace)
    finally: os.umask(old)
    assert [oct(f.stat().st_mode & 0o777) for f in (fn, fn2)] == [oct(0o666 & ~umask)]*2
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a.safetensors', 'b.bin']


def test_atomic_write_to_a_folder_or_under_a_file(tmp_path):
    "The error names the path asked for and says what is wrong (not the temporary file's rename)"
    (tmp_path/'d').mkdir(); (tmp_path/'f').write_text('x')
    with pytest.raises(IsADirectoryError, match=r"'.*/d' is a folder: expected the name of a file to write"): atomic_save({}, tmp_path/'d')
    with pytest.raises(NotADirectoryError, match=r"'.*/f/sub/a.pth': '.*/f' is a file, not a folder"): atomic_save({}, tmp_path/'f'/'sub'/'a.pth')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['d', 'f'] and not list((tmp_path/'d').iterdir())


def test_atomic_save_failure_keeps_the_old_file(tmp_path):
    fn = atomic_save({'x': torch.zeros(2)}, tmp_path/'a.pth')
    with pytest.raises(Exception): atomic_save({'x': lambda: 0}, fn)          # unpicklable
    assert torch.equal(torch.load(fn)['x'], torch.zeros(2)) and [p.name for p in tmp_path.iterdir()] == ['a.pth']


def test_triplet_loss_grad_and_half():
    f = torch.randn(8, 16, requires_grad=True)
    t = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    loss = batch_hard_triplet(f, t, margin=0.3, normalize=True)
    loss.backward()
    assert torch.isfinite(f.grad).all()
    assert batch_hard_triplet(f.detach().bfloat16(), t).dtype == torch.float32
    # identical features (zero distances) give finite gradients
    z = torch.zeros(4, 3, requires_grad=True)
    batch_hard_triplet(z, torch.tensor([0, 0, 1, 1]), margin=0.3).backward()
    assert torch.isfinite(z.grad).all()
