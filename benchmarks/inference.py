"""Feature extraction on the CPU: `load_reid`'s PyTorch path before and after issue 25, and ONNX Runtime, side by side.

    .venv/bin/python benchmarks/inference.py             # resnet50 and mobilenet_v2 at 256x128, batches of 32 (a few minutes)
    .venv/bin/python benchmarks/inference.py --quick     # batches of 8, 2 repeats (about a minute)
    .venv/bin/python benchmarks/inference.py --threads 1
    .venv/bin/python benchmarks/inference.py --profile   # where the old path spends its time (resnet50); writes nothing

For each architecture a randomly initialised ReIDModel (no download; speed does not depend on the weights)
is saved with `save_reid` and run three ways on the same uint8 batches at the input size, with the same
number of threads: `old` is `load_reid(fold_bn=False, channels_last=False, fuse_relu=False)` (the path before issue 25),
`new` is `load_reid()` (its defaults), `onnxruntime` the `export_onnx` file under ONNX Runtime. Each does
the whole feature computation (uint8 -> normalised, the network on the image and its mirror, L2
normalisation). After one warm-up batch each, the repeats are interleaved (old, new, onnxruntime, old, ...)
so that a change in the machine's load hits all three alike; images/s are medians. Features are compared
with the old path's (max abs difference, min cosine). Reading, decoding and resizing JPEG files (the same
code for all) is timed alone. The 1-minute load average is recorded before and after: figures measured
on a busy machine are not the hardware's. Writes benchmarks/results/inference.json (atomically).
"""
import argparse, json, os, platform, statistics, tempfile, time, warnings
from pathlib import Path
import torch
import torch.nn.functional as F
from fastreid_rollback.model import create_reid_model, atomic_write
from fastreid_rollback.synthetic import synthetic_reid
from fastreid_rollback.inference import save_reid, load_reid, export_onnx, _Images

ARCHS = ('resnet50', 'mobilenet_v2')

def cpu_name():
    "The CPU's model name (Linux), else the machine type"
    try: return next(l.split(':', 1)[1].strip() for l in open('/proc/cpuinfo') if l.startswith('model name'))
    except (OSError, StopIteration): return platform.machine()

def load_average():
    try: return round(os.getloadavg()[0], 2)
    except OSError: return None

def seconds(f, x):
    t0 = time.perf_counter(); f(x); return time.perf_counter() - t0

def interleaved_images_per_s(paths:dict, x, repeats:int) -> dict:
    "Median images/s of each `paths[name](x)`, after a warm-up call each, the repeats taken in turn"
    for f in paths.values(): f(x)
    times = {k:[] for k in paths}
    for _ in range(repeats):
        for k,f in paths.items(): times[k].append(seconds(f, x))
    return {k:len(x)/statistics.median(t) for k,t in times.items()}

def agreement(f, ref) -> dict:
    return dict(max_abs_diff=float((f - ref).abs().max()), cosine_min=float(F.cosine_similarity(f, ref).min()))

def ort_runner(predictor, fname, threads):
    import onnxruntime as ort
    export_onnx(predictor, fname)
    so = ort.SessionOptions(); so.intra_op_num_threads = so.inter_op_num_threads = threads
    sess = ort.InferenceSession(str(fname), so, providers=['CPUExecutionProvider'])
    return lambda x: torch.from_numpy(sess.run(['features'], {'images': x.numpy()})[0])

def read_decode_resize(d:Path, predictor, n:int, repeats:int) -> float:
    "Median images/s of opening, decoding and resizing `n` JPEG files as `ReIDPredictor` does"
    files = sorted((synthetic_reid(d/'data', n_ids=8, n_cams=4, imgs_per_id_cam=4, n_distractors=0, n_junk=0)/'bounding_box_test').iterdir())
    imgs = _Images(files[:n], predictor.resize)
    return len(imgs)/statistics.median(seconds(lambda ds: [ds[i] for i in range(len(ds))], imgs) for _ in range(repeats))

def bench_arch(arch, d:Path, a) -> dict:
    torch.manual_seed(0)
    fn = save_reid(create_reid_model(arch, n_ids=751, pretrained=False), d/f'{arch}.reid', size=tuple(a.size))
    old,new = load_reid(fn, device='cpu', fold_bn=False, channels_last=False, fuse_relu=False),load_reid(fn, device='cpu')
    paths = dict(old=old.batch, new=new.batch, onnxruntime=ort_runner(old, d/f'{arch}.onnx', a.threads))
    x = torch.randint(0, 256, (a.bs, 3, *a.size), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    ref = old.batch(x)
    ips = interleaved_images_per_s(paths, x, a.repeats)
    return dict(images_per_s=ips, new_over_onnxruntime=ips['new']/ips['onnxruntime'], new_over_old=ips['new']/ips['old'],
                vs_old={k:agreement(paths[k](x), ref) for k in ('new', 'onnxruntime')},
                read_decode_resize_images_per_s=read_decode_resize(d, new, a.bs, a.repeats))

def profile(a):
    "Print where the old path's time goes for resnet50: normalisation, the two network passes, the L2 norm, the rest"
    from torch.profiler import profile as tprofile, ProfilerActivity
    with tempfile.TemporaryDirectory() as d:
        p = load_reid(save_reid(create_reid_model('resnet50', n_ids=751, pretrained=False), Path(d)/'m.reid', size=tuple(a.size)),
                      device='cpu', fold_bn=False, channels_last=False, fuse_relu=False)
    net,x = p.net,torch.randint(0, 256, (a.bs, 3, *a.size), dtype=torch.uint8)
    med = lambda f, y: statistics.median(seconds(f, y) for _ in range(a.repeats))
    with torch.inference_mode():
        xn = (x.float()/255 - net.mean)/net.std
        f = net.model.features(xn)
        t = dict(total=med(p.batch, x), normalise=med(lambda y: (y.float()/255 - net.mean)/net.std, x), mirror=med(lambda y: y.flip(3), xn),
                 network_one_pass=med(net.model.features, xn), l2_norm=med(lambda y: F.normalize(y + y, dim=1), f))
        with tprofile(activities=[ProfilerActivity.CPU]) as prof: net.model.features(xn)
    t['rest'] = t['total'] - 2*t['network_one_pass'] - t['normalise'] - t['mirror'] - t['l2_norm']
    print(f"resnet50 at {a.size[0]}x{a.size[1]}, batch {a.bs}, {a.threads} thread(s), load average {load_average()}: seconds per batch")
    for k,v in t.items(): print(f"  {k:<18}{v:8.3f}  {100*v/t['total']:5.1f}%")
    print(prof.key_averages().table(sort_by='self_cpu_time_total', row_limit=8))

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--archs', nargs='+', default=list(ARCHS)); p.add_argument('--size', type=int, nargs=2, default=[256, 128])
    p.add_argument('--bs', type=int, default=32); p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--threads', type=int, default=torch.get_num_threads()); p.add_argument('--quick', action='store_true')
    p.add_argument('--profile', action='store_true')
    p.add_argument('--out', default=str(Path(__file__).parent/'results'/'inference.json'))
    a = p.parse_args()
    if a.quick: a.bs, a.repeats = 8, 2
    torch.set_num_threads(a.threads)
    warnings.filterwarnings('ignore')  # torch.onnx's exporter and fastai's import talk
    if a.profile: return profile(a)
    res = dict(size=a.size, bs=a.bs, threads=a.threads, repeats=a.repeats, quick=a.quick, torch=torch.__version__,
               onnxruntime=__import__('onnxruntime').__version__, cpu=cpu_name(), cpus=os.cpu_count(), load_average_start=load_average())
    with tempfile.TemporaryDirectory() as d: res['archs'] = {arch:bench_arch(arch, Path(d), a) for arch in a.archs}
    res['load_average_end'] = load_average()
    atomic_write(a.out, lambda f: f.write((json.dumps(res, indent=2) + '\n').encode()))
    print(f"{a.size[0]}x{a.size[1]}, batches of {a.bs}, {a.threads} thread(s), flip-averaged features (two passes); "
          f"load average {res['load_average_start']} -> {res['load_average_end']}")
    print(f"{'':<14}{'old':>8}{'new':>8}{'ONNX RT':>9}{'new/ORT':>9}{'decode':>8}   new vs old: max diff, min cosine")
    for arch,r in res['archs'].items():
        ips,v = r['images_per_s'],r['vs_old']['new']
        print(f"{arch:<14}{ips['old']:>8.1f}{ips['new']:>8.1f}{ips['onnxruntime']:>9.1f}{r['new_over_onnxruntime']:>9.2f}"
              f"{r['read_decode_resize_images_per_s']:>8.0f}   {v['max_abs_diff']:.1e}, {v['cosine_min']:.6f}")
    print(f"images/s; wrote {a.out}")

if __name__ == '__main__': main()
