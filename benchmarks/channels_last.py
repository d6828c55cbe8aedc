"""Training speed with fastai's `ChannelsLast` against the default memory format, per architecture, on this CPU.

Why: the evidence study (`rollback_evidence.py`) trains MobileNetV2 channels-last and ResNet-18 not; this is the
measurement behind that choice. Each architecture trains a `reid_learner` (random init, the embedded dataset, batch 32,
one thread, the study's input size) for one epoch per round in each format, the two formats alternating for `--rounds`
rounds after one warm-up epoch each; the speed-up is the median of the per-round ratios (default time / channels-last
time). The features are the same up to rounding: both formats are checked against each other on one batch.

Run: `python benchmarks/channels_last.py [--rounds 5]`; writes benchmarks/results/channels_last.json.
The machine may be shared and noisy: read the medians and ratios, not single timings.
"""
import argparse, json, os, platform, statistics, tempfile, time, warnings
from pathlib import Path
import torch
from fastai.callback.channelslast import ChannelsLast
from fastreid_rollback.synthetic import synthetic_reid
from fastreid_rollback.data import market1501, reid_dls
from fastreid_rollback.learner import reid_learner
from fastreid_rollback.model import atomic_write

ARCHS = {'mobilenet_v2': (128, 64), 'resnet18': (64, 32)}   # the evidence study's sizes

def epoch_s(learn):
    "Seconds of one training epoch of `learn` (no validation)"
    with learn.no_bar(), learn.no_logging():
        t0 = time.perf_counter(); learn.fit(1, 0.01); return time.perf_counter() - t0

def compare(arch, size, root, rounds):
    "Epoch times of the default format and of channels-last, alternating, and the largest feature difference between them"
    dls = reid_dls(market1501(root), size=size, bs=32, seed=0)
    plain = reid_learner(dls, arch=arch, pretrained=False)
    fast = reid_learner(dls, arch=arch, pretrained=False, cbs=ChannelsLast())
    fast.model.load_state_dict(plain.model.state_dict())
    fast.model.to(memory_format=torch.channels_last)   # as `ChannelsLast` does at the start of a fit
    x = dls.one_batch()[0]
    with torch.no_grad():
        a, b = plain.model.eval().pooled(x), fast.model.eval().pooled(x)
    diff = float((a - b).abs().max() / a.abs().max())
    epoch_s(plain); epoch_s(fast)   # warm-up
    times = {'default': [], 'channels_last': []}
    for _ in range(rounds):
        times['default'].append(epoch_s(plain)); times['channels_last'].append(epoch_s(fast))
    ratios = [d/c for d, c in zip(times['default'], times['channels_last'])]
    return {'size': list(size), 'epoch_s': {k: [round(t, 3) for t in v] for k, v in times.items()},
            'median_epoch_s': {k: round(statistics.median(v), 3) for k, v in times.items()},
            'speedup': round(statistics.median(ratios), 3), 'ratios': [round(r, 3) for r in ratios],
            'max_rel_feature_diff': diff, 'images_per_epoch': dls.train.n}

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=5, help='epochs per format and architecture, alternating')
    p.add_argument('--out', default=str(Path(__file__).parent/'results'/'channels_last.json'))
    a = p.parse_args(argv)
    torch.set_num_threads(1); warnings.simplefilter('ignore')
    root = synthetic_reid(Path(tempfile.mkdtemp())/'data', n_ids=140, n_train_ids=40, n_cams=4, imgs_per_id_cam=3, size=(128, 64))
    load = os.getloadavg()[0]
    res = {n: compare(n, s, root, a.rounds) for n, s in ARCHS.items()}
    doc = {'archs': res, 'threads': 1, 'bs': 32, 'rounds': a.rounds, 'load_average_start': load,
           'machine': {'cpus': os.cpu_count(), 'cpu': platform.processor() or platform.machine(), 'torch': torch.__version__}}
    atomic_write(a.out, lambda f: f.write(json.dumps(doc, indent=1).encode()))
    for n, r in res.items(): print(f"{n} {r['size'][0]}x{r['size'][1]}: {r['median_epoch_s']} s an epoch; channels-last x{r['speedup']} (features differ by {r['max_rel_feature_diff']:.1e})")
    print('wrote', a.out)

if __name__ == '__main__': main()
