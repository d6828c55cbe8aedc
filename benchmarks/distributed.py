"""Training throughput (images/s) of one process against two data-parallel processes, through `train_reid`.

Both arms train the same `train_reid` run (resnet18 on the embedded dataset, a random-init backbone standing in for
pre-trained weights) with the same global batch: one process with `--bs` images per batch, or `--procs` processes
launched as `torchrun` launches them, each with `--bs / procs` images per batch (`Learner.ddp_ctx`: gloo on the CPU,
NCCL on GPUs). On the CPU the cores are split evenly: one process gets all `--cores` threads, each of two
processes half of them. Images/s = training images of an epoch (all processes) / the epoch's training time (validation and
evaluation excluded), median over the epochs after the first; the arms alternate for `--rounds` rounds, and the
speed-up is the median of the per-round ratios.

Run: `python benchmarks/distributed.py [--rounds 3] [--epochs 3] [--cores 2]`; writes benchmarks/results/distributed.json.
The machine may be shared and noisy: read the medians and ratios, not single timings.
"""
import argparse, json, os, socket, statistics, sys, tempfile, time, warnings
from pathlib import Path
import torch, torch.distributed as dist, torch.multiprocessing as mp
from fastai.callback.core import Callback
from fastreid_rollback.synthetic import synthetic_reid
from fastreid_rollback.data import market1501, reid_dls
from fastreid_rollback.model import create_reid_model, save_backbone, atomic_write
from fastreid_rollback.experiment import train_reid

class EpochTimes(Callback):
    "Wall time of the training phase of every epoch, and the images it took on this process"
    order = 100
    def before_fit(self): self.times,self.images = [],[]
    def before_train(self): self.t,self.n = time.perf_counter(),0
    def after_batch(self):
        if self.training: self.n += len(self.yb[0])
    def after_train(self): self.times.append(time.perf_counter() - self.t); self.images.append(self.n)

def one_run(rank, world, port, threads, root, pre, bs, epochs, size, result):
    "One process of an arm: `train_reid` for `epochs` epochs; the first process writes the epoch times and images to `result`"
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    warnings.simplefilter('ignore')
    sys.stdout = open(os.devnull, 'w')  # no progress bars in the benchmark's output
    timer = EpochTimes()
    dls = reid_dls(market1501(root), size=size, bs=bs, seed=0)
    train_reid(dls, arch='resnet18', pretrained=pre, n_periods=1, epochs_per_period=epochs, eval_every=epochs, cbs=[timer])
    images = torch.tensor(timer.images)
    if world > 1: dist.all_reduce(images)  # every process's images
    if rank == 0: Path(result).write_text(json.dumps({'times': timer.times, 'images': images.tolist()}))
    if dist.is_initialized(): dist.destroy_process_group()

def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]

def arm(procs, cores, root, pre, bs, epochs, size, tmp):
    "Images/s of `procs` processes sharing `cores` cores and the global batch `bs`: median over the epochs after the first"
    result = Path(tmp)/f'arm{procs}.json'
    mp.start_processes(one_run, args=(procs, free_port(), max(cores//procs, 1), root, pre, bs//procs, epochs, size, str(result)),
                       nprocs=procs, join=True, start_method='spawn')
    r = json.loads(result.read_text())
    ips = [n/t for n,t in zip(r['images'][1:], r['times'][1:])]
    return dict(images_per_s=statistics.median(ips), epoch_images=r['images'][-1], epoch_s=r['times'][1:])

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--procs', type=int, default=2, help='processes of the data-parallel arm')
    p.add_argument('--cores', type=int, default=2, help='CPU cores shared by the processes of an arm')
    p.add_argument('--rounds', type=int, default=3, help='alternating rounds of the two arms')
    p.add_argument('--epochs', type=int, default=3, help='epochs per run (the first is not timed)')
    p.add_argument('--bs', type=int, default=32, help='global batch size (each of n processes takes bs/n)')
    p.add_argument('--size', type=int, nargs=2, default=[128, 64], help='input height and width')
    p.add_argument('--n-ids', type=int, default=60, help='identities of the embedded dataset (half of them train)')
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = synthetic_reid(Path(tmp)/'data', n_ids=a.n_ids, imgs_per_id_cam=4)
        torch.manual_seed(0)
        pre = save_backbone(create_reid_model('resnet18', n_ids=2), Path(tmp)/'resnet18.pth')
        load = os.getloadavg()[0]
        device = f'{a.procs} GPUs (NCCL)' if torch.cuda.is_available() else f'CPU, {a.cores} cores (gloo)'
        print(f'torch {torch.__version__}, {device}, resnet18 {a.size[0]}x{a.size[1]}, global batch {a.bs}, load average {load:.1f}')
        rounds = []
        for r in range(a.rounds):
            order = [1, a.procs] if r % 2 == 0 else [a.procs, 1]
            res = {n: arm(n, a.cores, str(root), str(pre), a.bs, a.epochs, tuple(a.size), tmp) for n in order}
            rounds.append({'one_process': res[1], 'processes': res[a.procs], 'speedup': res[a.procs]['images_per_s']/res[1]['images_per_s']})
            print(f"round {r+1}: 1 process {res[1]['images_per_s']:.1f} images/s, {a.procs} processes {res[a.procs]['images_per_s']:.1f} images/s, "
                  f"x{rounds[-1]['speedup']:.2f}")
    med = lambda k: statistics.median(r[k]['images_per_s'] for r in rounds)
    doc = dict(settings=dict(vars(a), device=device, torch=torch.__version__, load_average_start=load),
               one_process=dict(images_per_s=med('one_process'), threads=a.cores, bs=a.bs),
               processes=dict(images_per_s=med('processes'), n=a.procs, threads_each=max(a.cores//a.procs, 1), bs_each=a.bs//a.procs),
               speedup=statistics.median(r['speedup'] for r in rounds), rounds=rounds)
    out = Path(__file__).parent/'results'/'distributed.json'
    atomic_write(out, lambda f: f.write(json.dumps(doc, indent=2).encode()))
    print(f"\n| processes | threads each | batch each | images/s (median of {a.rounds}) |\n| --- | --- | --- | --- |")
    print(f"| 1 | {a.cores} | {a.bs} | {doc['one_process']['images_per_s']:.1f} |")
    print(f"| {a.procs} | {doc['processes']['threads_each']} | {doc['processes']['bs_each']} | {doc['processes']['images_per_s']:.1f} |")
    print(f"speed-up (median of the per-round ratios): x{doc['speedup']:.2f}; wrote {out}")
