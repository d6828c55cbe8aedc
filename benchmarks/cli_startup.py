"""Start-up time of the command line: `--help` and an argument error against bare Python and `import torch`, in the same run.

    .venv/bin/python benchmarks/cli_startup.py             # 9 runs of each (about 30 s idle)
    .venv/bin/python benchmarks/cli_startup.py --runs 5

Each case is a fresh process (`python -m fastreid_rollback.cli ...`, as the `fastreid-rollback` script runs
`main`), started in turn with the others so a change of load hits every case alike; the figures are medians of
the wall-clock seconds and the largest resident memory of each process. The target (issue 23): `--help`
within 1.5x `python -c pass` plus 0.3 s on an idle machine; the load average in the file says whether it was.
Writes benchmarks/results/cli_startup.json and prints a table.
"""
import argparse, json, os, platform, statistics, subprocess, sys, time
from pathlib import Path

cases = {  # name: the Python arguments
    'python_pass': ['-c', 'pass'],
    'import_torch': ['-c', 'import torch'],
    'help': ['-m', 'fastreid_rollback.cli', '--help'],
    'command_help': ['-m', 'fastreid_rollback.cli', 'export', '--help'],
    'argument_error': ['-m', 'fastreid_rollback.cli', 'train', '--bs', 'x'],
}

def run_once(args):
    "Wall-clock seconds and largest resident memory (MB) of one `python args` process, and its exit status"
    t0 = time.perf_counter()
    p = subprocess.Popen([sys.executable, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _,status,usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return time.perf_counter() - t0, usage.ru_maxrss/1024, p.returncode

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--runs', type=int, default=9)
    p.add_argument('--out', default=str(Path(__file__).parent/'results'/'cli_startup.json'))
    a = p.parse_args()
    load = os.getloadavg()[0]
    times,mem,codes = {n: [] for n in cases},{n: [] for n in cases},{}
    for n,args in cases.items(): run_once(args)  # warm the file cache
    for _ in range(a.runs):
        for n,args in cases.items():
            t,m,codes[n] = run_once(args)
            times[n].append(t); mem[n].append(m)
    s = {n: statistics.median(v) for n,v in times.items()}
    target = 1.5*s['python_pass'] + 0.3
    doc = dict(runs=a.runs, python=platform.python_version(), cpus=os.cpu_count(), load_average_before=round(load, 2),
               load_average_after=round(os.getloadavg()[0], 2), exit_status=codes,
               median_s={n: round(v, 3) for n,v in s.items()}, median_max_rss_mb={n: round(statistics.median(v), 1) for n,v in mem.items()},
               target_help_s=round(target, 3), help_within_target=s['help'] <= target, help_over_python_pass=round(s['help']/s['python_pass'], 2))
    from fastreid_rollback.model import atomic_write   # after the runs: torch in this process's page cache could not speed them up
    atomic_write(a.out, lambda f: f.write((json.dumps(doc, indent=2) + '\n').encode()))
    print(f"{'case':16} {'median s':>9} {'max RSS MB':>11}")
    for n in cases: print(f"{n:16} {s[n]:9.3f} {doc['median_max_rss_mb'][n]:11.1f}")
    print(f"target for --help: {target:.3f} s ({'met' if doc['help_within_target'] else 'missed'}); load average {load:.2f} before, "
          f"{doc['load_average_after']:.2f} after; wrote {a.out}")

if __name__ == '__main__': main()
