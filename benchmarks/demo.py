"""`fastreid-rollback demo` as a fresh clone runs it: a cold cache, end-to-end wall time and peak memory.

Runs the installed command in a child process with `FASTREID_ROLLBACK_CACHE` pointing to an empty folder (so the
source backbone is built, as on a fresh machine), then writes what the demo wrote (`results.json`) plus the wall
time, the peak resident memory and what the command printed to `benchmarks/results/demo.json`, and copies its
plots to `nbs/images/` for the README. The target is at most 4 minutes on 2 idle cores.

Run: `python benchmarks/demo.py [--quick]`.
"""
import argparse, json, os, resource, shutil, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLOTS = ['loss.png', 'cmc.png', 'block_grads.png', 'ranked.png']

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--quick', action='store_true', help='the quick demo, into a temporary file (a check)')
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix='demo_bench_'))
    env = {**os.environ, 'FASTREID_ROLLBACK_CACHE': str(tmp/'cache')}
    cmd = [sys.executable, '-W', 'ignore', '-m', 'fastreid_rollback.cli', 'demo', '--out', str(tmp/'demo_out')] + (['--quick'] if a.quick else [])
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode: sys.exit(f'the demo failed:\n{proc.stderr[-3000:]}')
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20   # kB on Linux
    doc = json.loads((tmp/'demo_out'/'results.json').read_text())
    import torch
    from fastreid_rollback.model import atomic_write
    doc.update(wall_s=round(wall, 1), peak_rss_gb=round(peak_gb, 2), cold_cache=True, stdout=proc.stdout,
               machine={'cpus': os.cpu_count(), 'torch_threads': torch.get_num_threads(), 'torch': torch.__version__})
    out = tmp/'demo.json' if a.quick else ROOT/'benchmarks'/'results'/'demo.json'
    atomic_write(out, lambda f: f.write(json.dumps(doc, indent=1).encode()))
    if not a.quick:
        for f in PLOTS: shutil.copy(tmp/'demo_out'/f, ROOT/'nbs'/'images'/f)
    print(proc.stdout)
    print(f'wall {wall:.1f} s, peak RSS {peak_gb:.2f} GB; wrote {out}')

if __name__ == '__main__': main()
