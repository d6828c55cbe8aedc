"""Feature extraction on the CPU: PyTorch (`ReIDPredictor`) against ONNX Runtime (`export_onnx`), side by side.

    .venv/bin/python benchmarks/inference.py           # resnet50 at 256x128, batches of 32 (about a minute)
    .venv/bin/python benchmarks/inference.py --quick   # resnet18, fewer repeats
    .venv/bin/python benchmarks/inference.py --threads 1

A randomly initialised ReIDModel (no download; speed does not depend on the weights) is saved with
`save_reid`, loaded with `load_reid(device='cpu')` and exported with `export_onnx`. Both run the whole
feature computation (uint8 -> normalised, the network on the image and its mirror, L2 normalisation)
on the same uint8 batches already at the input size, with the same number of threads; images/s are
medians over the repeats after one warm-up batch. Reading and resizing JPEG files (the same code for
both) is timed separately. Writes benchmarks/results/inference.json and prints a table.
"""
import argparse, json, os, statistics, tempfile, time
from pathlib import Path
import torch
import torch.nn.functional as F
import onnxruntime as ort
from fastreid_rollback.model import create_reid_model
from fastreid_rollback.synthetic import synthetic_reid
from fastreid_rollback.inference import save_reid, load_reid, export_onnx, _Images

def images_per_s(f, x, repeats):
    "Median images/s of `f(x)` over `repeats` calls, after one warm-up call"
    f(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter(); f(x); times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--arch', default='resnet50'); p.add_argument('--size', type=int, nargs=2, default=[256, 128])
    p.add_argument('--bs', type=int, default=32); p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--threads', type=int, default=torch.get_num_threads()); p.add_argument('--quick', action='store_true')
    p.add_argument('--out', default=str(Path(__file__).parent/'results'/'inference.json'))
    a = p.parse_args()
    if a.quick: a.arch, a.repeats = 'resnet18', 3
    torch.manual_seed(0); torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        save_reid(create_reid_model(a.arch, n_ids=751), d/'model.reid', size=tuple(a.size))
        predictor = load_reid(d/'model.reid', device='cpu')
        export_onnx(predictor, d/'model.onnx')
        so = ort.SessionOptions(); so.intra_op_num_threads = so.inter_op_num_threads = a.threads
        sess = ort.InferenceSession(str(d/'model.onnx'), so, providers=['CPUExecutionProvider'])
        x = torch.randint(0, 256, (a.bs, 3, *a.size), dtype=torch.uint8)
        run_ort = lambda x: sess.run(['features'], {'images': x.numpy()})[0]
        cos = float(F.cosine_similarity(torch.from_numpy(run_ort(x)), predictor.batch(x)).min())
        res = dict(arch=a.arch, size=a.size, bs=a.bs, threads=a.threads, repeats=a.repeats, torch=torch.__version__, onnxruntime=ort.__version__,
                   pytorch_images_per_s=images_per_s(predictor.batch, x, a.repeats), onnxruntime_images_per_s=images_per_s(run_ort, x, a.repeats),
                   cosine_min=cos)
        files = sorted((synthetic_reid(d/'data', n_ids=8, n_cams=4, imgs_per_id_cam=4, n_distractors=0, n_junk=0)/'bounding_box_test').iterdir())
        imgs = _Images(files[:a.bs], predictor.resize)
        res['read_resize_images_per_s'] = images_per_s(lambda ds: [ds[i] for i in range(len(ds))], imgs, a.repeats)
    res['onnxruntime_over_pytorch'] = res['onnxruntime_images_per_s'] / res['pytorch_images_per_s']
    try: res['load_average'] = os.getloadavg()[0]
    except OSError: pass
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2))
    print(f"{a.arch} at {a.size[0]}x{a.size[1]}, batches of {a.bs}, {a.threads} thread(s), flip-averaged features (two passes)")
    print(f"{'':<24}{'images/s':>10}")
    print(f"{'PyTorch':<24}{res['pytorch_images_per_s']:>10.1f}")
    print(f"{'ONNX Runtime':<24}{res['onnxruntime_images_per_s']:>10.1f}   x{res['onnxruntime_over_pytorch']:.2f}, cosine >= {cos:.6f}")
    print(f"{'read + resize (both)':<24}{res['read_resize_images_per_s']:>10.1f}")
    print(f"wrote {a.out}")

if __name__ == '__main__': main()
