"""Does rolling back beat plain fine-tuning when the paper's preconditions hold? (issue 11)

The setting, fixed from the paper's preconditions before any arm was compared:

- **A state worth rolling back to.** The stand-in for ImageNet is `source_backbone`: ResNet-18 trained from
  scratch on a large synthetic source domain (800 identities seen by 16 cameras, all for training; 6 epochs of
  one-cycle), disjoint from the target in identities and cameras, cached on disk. Its zero-shot mAP on the target
  is reported (`zero_shot_mAP`: the no-shift target; `zero_shot` has both).
- **Low-level blocks that must adapt.** The `shift` target adds a per-camera pixel-level shift the source
  never saw (`synthetic_reid(shift=...)`: colour mixing and cast, gamma, contrast, blur, lower resolution,
  noise); the `no_shift` target is the same people and cameras without it. Its strength is the strongest of
  `shift_candidates` at which the source is still worth returning to: a zero-shot mAP on the shifted target
  of at least half the no-shift one (`shift_rule`).
- **High-level blocks that over-fit.** Few training identities (40) and a test set of 100 identities.
- **Periods long enough to re-learn.** A probe trains the baseline's schedule on each target (seed 0) and stops
  at the end of its high-LR half, `probe_epochs` epochs; `plateau_epoch(losses, plateau_frac)` of its per-epoch
  mean training loss is the number of epochs the loss needs to come within a quarter of its whole fall of its
  lowest value. A period gets twice that (its high-LR half reaches the plateau, its low-LR half as long again),
  the larger of the two targets, at least 2 and at most `max_period` (the compute budget).

Arms, each with every seed, paired by seed (same data order, augmentations and head initialisation):
(a) `baseline`: one period of n_periods x P epochs; (b) `control`: `RollbackCallback(restore=False)`, the
rolling-back schedule without the roll-back; (c) `rollback`; (d) `period1`: the end of period 1 of the
rolling-back run, read from its evaluation there (no extra training: period 1 is the same computation in
every arm that has it; the control's period-1 evaluation must equal it, which is checked and reported).

The decision rule (`fastreid_rollback.experiment.decision_rule`) was committed before the final run; the
outcome is reported whichever way it falls. Every run is single-threaded (`torch.set_num_threads(1)`) in one of
`--workers` processes and seeded, so the same command on the same machine gives the same numbers whatever the
load; the times depend on the load.

Run: `python benchmarks/rollback_evidence.py` (about 40 minutes on 2 idle cores when the source backbone is not
cached yet) writes `benchmarks/results/rollback_evidence.json` and the plots `nbs/images/evidence_*.png`.
`--small` runs a tiny configuration (minutes) into `--out`, for checking the plumbing and the reproducibility.
"""
import argparse, json, os, sys, time, tempfile, warnings, platform
import multiprocessing as mp
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ('shift', 'no_shift')

CONFIG = dict(
    arch='resnet18', size=[64, 32], bs=32, lr=0.01, n_periods=4, seeds=[0, 1, 2],
    source=dict(n_ids=800, n_cams=16, imgs_per_id_cam=1, epochs=6, lr=0.05, bs=32, seed=0),
    target=dict(n_ids=140, n_train_ids=40, n_cams=4, imgs_per_id_cam=3, seed=0),
    shift_candidates=[1.0, 0.5, 0.25], shift_rule=0.5, probe_epochs=12, plateau_frac=0.25, max_period=8,
)
SMALL = dict(
    arch='resnet18', size=[64, 32], bs=16, lr=0.01, n_periods=2, seeds=[0, 1, 2],
    source=dict(n_ids=40, n_cams=3, imgs_per_id_cam=2, epochs=2, lr=0.05, bs=16, seed=0),
    target=dict(n_ids=24, n_train_ids=8, n_cams=3, imgs_per_id_cam=2, seed=0),
    shift_candidates=[1.0, 0.5], shift_rule=0.5, probe_epochs=4, plateau_frac=0.1, max_period=2,
)
ARMS = ('baseline', 'control', 'rollback')

def _quiet():
    "One thread per process and no warnings: the numbers must not depend on how many cores are free"
    import torch
    torch.set_num_threads(1)
    warnings.simplefilter('ignore')

def _dls(root, cfg, seed):
    from fastreid_rollback.data import market1501, reid_dls
    return reid_dls(market1501(root), size=tuple(cfg['size']), bs=cfg['bs'], seed=seed)

def run_task(task):
    "One training run in a worker process: ('probe'|arm, setting, seed) -> its record"
    _quiet()
    from fastreid_rollback.experiment import train_arm, train_reid, run_record, EpochLosses
    from fastreid_rollback.test_utils import StopAfter
    kind, setting, seed, cfg, root, pretrained, period = task
    dls, losses = _dls(root, cfg, seed), EpochLosses()
    kw = dict(arch=cfg['arch'], pretrained=pretrained, lr=cfg['lr'], seed=seed)
    t0, c0 = time.perf_counter(), time.process_time()
    with open(os.devnull, 'w') as null, _redirect(null):
        if kind == 'probe':   # the baseline's schedule, stopped at the end of its high-LR half
            n = cfg['probe_epochs']
            run = train_reid(dls, n_periods=1, epochs_per_period=2*n, eval_every=n, name='probe', cbs=[losses, StopAfter(n)], **kw)
        else:   # the baseline is evaluated at its end only; the two schedules at every period end
            if kind == 'baseline': kw['eval_every'] = cfg['n_periods']*period
            run = train_arm(dls, kind, n_periods=cfg['n_periods'], epochs_per_period=period, cbs=[losses], **kw)
    return (kind, setting, seed), {**run_record(run, losses), 'wall_s': round(time.perf_counter()-t0, 1), 'cpu_s': round(time.process_time()-c0, 1)}

class _redirect:
    "Send stdout to `f` (fastai's progress output) inside a worker"
    def __init__(self, f): self.f = f
    def __enter__(self): self.old, sys.stdout = sys.stdout, self.f
    def __exit__(self, *a): sys.stdout = self.old

def run_all(tasks, workers):
    "Run `tasks` in `workers` single-threaded processes (each run seeded: the order does not matter)"
    if workers <= 1: return dict(map(run_task, tasks))
    with mp.get_context('spawn').Pool(workers) as pool: return dict(pool.imap_unordered(run_task, tasks))

def render_target(data, cfg, shift):
    "The target with low-level shift `shift` (cached on disk by `synthetic_reid`)"
    from fastreid_rollback.synthetic import synthetic_reid
    return synthetic_reid(Path(data)/f'shift{shift}', size=tuple(cfg['size']), shift=shift, **cfg['target'])

def zero_shot(root, cfg, pretrained):
    "mAP and rank-1 of the source backbone on the target's test set, before any fine-tuning"
    from fastreid_rollback.learner import reid_learner
    learn = reid_learner(_dls(root, cfg, 0), arch=cfg['arch'], pretrained=pretrained)
    r = learn.reid_evaluate()
    return {'mAP': r.mAP, 'rank1': r.rank(1)}

def grad_summary(records, cfg, period):
    "Block-gradient summaries: starvation in the baseline, rolling back against the control for the kept blocks"
    blocks = ['stem', 'layer1', 'layer2', 'layer3', 'layer4']
    g = lambda r: np.array([r['block_grads'][b] for b in blocks])   # blocks x epochs
    seeds = cfg['seeds']
    base = [g(records[('baseline', s)]) for s in seeds]
    # mean squared gradient of each block relative to layer4's, geometric mean over epochs and seeds
    rel = {b: float(np.exp(np.mean([np.log(x[i]/x[-1]) for x in base]))) for i,b in enumerate(blocks)}
    ratios = {}   # rollback / control, per block, over the epochs of periods 2.., geometric mean over epochs and seeds
    for i,b in enumerate(blocks):
        per_seed = [np.exp(np.mean(np.log(g(records[('rollback', s)])[i, period:] / g(records[('control', s)])[i, period:]))) for s in seeds]
        ratios[b] = {'per_seed': [float(v) for v in per_seed], 'geo_mean': float(np.exp(np.mean(np.log(per_seed))))}
    kept = {}     # the blocks kept at each boundary, in the period that follows it
    for k in range(1, cfg['n_periods']):
        e = slice(k*period, (k+1)*period)
        for i,b in enumerate(blocks[:k]):
            v = [float(np.exp(np.mean(np.log(g(records[('rollback', s)])[i, e] / g(records[('control', s)])[i, e])))) for s in seeds]
            kept[f'period{k+1}:{b}'] = v
    change = {a: {b: [records[(a, s)]['weight_change'][b] for s in seeds] for b in blocks} for a in ARMS}
    return {'baseline_relative_to_layer4': rel, 'weight_change': change, 'rollback_over_control_after_period1': ratios, 'kept_blocks_rollback_over_control': kept,
            'starved': bool(rel['stem'] < 1 and rel['layer1'] < 1),
            'rollback_raises_kept': bool(all(x > 1 for v in kept.values() for x in v))}

def analyse(records, cfg, period):
    "Per setting: the arms' metrics per seed, means, paired differences, the consistency check and the decision"
    from fastreid_rollback.experiment import decide, paired_difference
    out = {}
    for setting in SETTINGS:
        rec = {k[0]: {} for k in records}
        for (arm, st, seed), r in records.items():
            if st == setting: rec[arm][seed] = r
        res = {a: {m: [rec[a][s][m] for s in cfg['seeds']] for m in ('mAP', 'rank1', 'mINP')} for a in ARMS}
        p1 = period-1
        res['period1'] = {m: [rec['rollback'][s]['evals'][p1][m] for s in cfg['seeds']] for m in ('mAP', 'rank1', 'mINP')}
        control_p1 = [rec['control'][s]['evals'][p1]['mAP'] for s in cfg['seeds']]
        for a in res: res[a].update({f'{m}_mean': float(np.mean(v)) for m,v in list(res[a].items())}, **{f'{m}_std': float(np.std(v, ddof=1)) for m,v in list(res[a].items())})
        per_period = {a: [[rec[a][s]['evals'][(k+1)*period-1]['mAP'] for s in cfg['seeds']] for k in range(cfg['n_periods'])] for a in ('control', 'rollback')}
        out[setting] = {**res, 'decision': decide({a: res[a]['mAP'] for a in ARMS}),
                        'rank1_vs': {o: paired_difference(res['rollback']['rank1'], res[o]['rank1']) for o in ('baseline', 'control', 'period1')},
                        'mAP_vs_period1': paired_difference(res['rollback']['mAP'], res['period1']['mAP']),
                        'period1_control_equals_rollback': control_p1 == res['period1']['mAP'],
                        'mAP_at_period_ends': per_period,
                        'block_grads': grad_summary({(a, s): rec[a][s] for a in ARMS for s in cfg['seeds']}, cfg, period)}
    return out

def plot_all(records, settings, probe, cfg, period, images, prefix='evidence'):
    "The probe, the mAP of every arm and seed, and the block gradients (seed 0, shift target)"
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt, pandas as pd
    from fastreid_rollback.rollback import plot_block_grads
    images.mkdir(parents=True, exist_ok=True)
    def save(fig, name): fig.savefig(images/f'{prefix}_{name}.png', dpi=90, bbox_inches='tight'); plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for st, p in probe.items():
        l = p['epoch_loss']
        ax.plot(range(1, len(l)+1), l, marker='.', label=f"{st}: plateau after {p['plateau']} epochs")
    ax.axvline(cfg['probe_epochs']+0.5, color='k', ls=':', lw=1, label='LR x0.1')
    ax.set_xlabel('epoch'); ax.set_ylabel('mean training loss'); ax.set_title(f'probe (baseline schedule): period = {period} epochs'); ax.legend(fontsize='small')
    save(fig, 'probe')
    fig, axs = plt.subplots(1, 2*len(settings), figsize=(5*2*len(settings), 3.8))
    colours = {'baseline': 'C0', 'control': 'C1', 'rollback': 'C2', 'period1': 'C3'}
    for j, (st, res) in enumerate(settings.items()):
        ax = axs[2*j]
        x = np.arange(1, cfg['n_periods']+1)*period
        for a in ('control', 'rollback'):
            v = np.array(res['mAP_at_period_ends'][a])
            ax.plot(x, v, color=colours[a], alpha=0.25)
            ax.plot(x, v.mean(1), color=colours[a], marker='o', label=a)
        ax.plot([x[-1]]*len(cfg['seeds']), res['baseline']['mAP'], '.', color=colours['baseline'], alpha=0.4)
        ax.plot([x[-1]], [res['baseline']['mAP_mean']], 's', color=colours['baseline'], label='baseline (end)')
        ax.set_xlabel('epoch'); ax.set_ylabel('test mAP'); ax.set_title(f'{st}: mAP at each period end (mean, seeds faint)', fontsize=9); ax.legend(fontsize='small')
        ax = axs[2*j+1]
        names = ['period1', *ARMS]
        for s in range(len(cfg['seeds'])): ax.plot(names, [res[a]['mAP'][s] for a in names], color='grey', alpha=0.4, marker='.')
        for i, a in enumerate(names): ax.plot([i], [res[a]['mAP_mean']], 'o', color=colours[a], ms=9)
        ax.set_ylabel('final test mAP'); ax.set_title(f"{st}: per seed (grey), mean; {res['decision']['outcome']}", fontsize=9)
    fig.tight_layout(); save(fig, 'map')
    blocks = ['stem', 'layer1', 'layer2', 'layer3', 'layer4', 'head']
    fig, axs = plt.subplots(1, 4, figsize=(22, 4))
    s0 = cfg['seeds'][0]
    for ax, a in zip(axs, ARMS):
        r = records[(a, 'shift', s0)]
        plot_block_grads(pd.DataFrame({b: r['block_grads'][b] for b in blocks}), r['rollback_epochs'], ax=ax)
        ax.set_title(f'{a} (shift, seed {s0}): mean squared gradient', fontsize=9)
    ax = axs[3]
    rb, ct = records[('rollback', 'shift', s0)], records[('control', 'shift', s0)]
    for b in blocks[:-1]: ax.plot(np.array(rb['block_grads'][b])/np.array(ct['block_grads'][b]), marker='.', label=b)
    for e in rb['rollback_epochs']: ax.axvline(e-0.5, color='k', ls='--', lw=1)
    ax.axhline(1, color='k', lw=0.5); ax.set_xlabel('epoch'); ax.legend(fontsize='small')
    ax.set_title('rollback / control, per block (same LRs)', fontsize=9)
    fig.tight_layout(); save(fig, 'block_grads')

def write_json(doc, fn):
    "Write `doc` to `fn` atomically"
    fn.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=fn.parent, prefix=f'.{fn.name}.')
    with os.fdopen(fd, 'w') as f: json.dump(doc, f, indent=1)
    m = os.umask(0); os.umask(m); os.chmod(tmp, 0o666 & ~m)
    os.replace(tmp, fn)

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--small', action='store_true', help='a tiny configuration, for checks')
    p.add_argument('--workers', type=int, default=2, help='training processes (one thread each)')
    p.add_argument('--data', default=None, help='folder for the target datasets (default: a temporary folder)')
    p.add_argument('--out', default=None, help='the JSON file (default: benchmarks/results/rollback_evidence.json; with --small a temporary file)')
    p.add_argument('--images', default=None, help='folder of the plots (default: nbs/images; with --small next to --out)')
    a = p.parse_args()
    _quiet()
    import torch
    from fastreid_rollback.experiment import source_backbone, plateau_epoch, decision_rule
    cfg = SMALL if a.small else CONFIG
    out = Path(a.out) if a.out else (Path(tempfile.mkdtemp())/'rollback_evidence.json' if a.small else ROOT/'benchmarks'/'results'/'rollback_evidence.json')
    images = Path(a.images) if a.images else (out.parent if a.small else ROOT/'nbs'/'images')
    data = Path(a.data) if a.data else Path(tempfile.mkdtemp(prefix='rollback_evidence_'))
    times, t_all = {}, time.perf_counter()
    def tick(name, t0): times[name] = round(time.perf_counter()-t0, 1); print(f'{name}: {times[name]} s', flush=True)

    t0 = time.perf_counter()
    with mp.get_context('spawn').Pool(1) as pool:   # the targets are drawn on the other core while the source trains
        drawn = pool.starmap_async(render_target, [(data, cfg, sh) for sh in [0., *cfg['shift_candidates']]])
        with open(os.devnull, 'w') as null, _redirect(null): pretrained = source_backbone(arch=cfg['arch'], size=tuple(cfg['size']), **cfg['source'])
        tick('source_backbone', t0)
        drawn.get()
    tick('source_backbone_and_targets', t0)
    build = json.loads(pretrained.with_suffix('.json').read_text())
    source_built_now = times['source_backbone'] >= build['build_time_s']/2   # else it came from the cache

    t0 = time.perf_counter()
    target = lambda shift: render_target(data, cfg, shift)
    zs_all = {0.: zero_shot(target(0.), cfg, pretrained)}
    for shift in cfg['shift_candidates']:   # strongest first; stop at the first the source still serves
        zs_all[shift] = zero_shot(target(shift), cfg, pretrained)
        if zs_all[shift]['mAP'] >= cfg['shift_rule']*zs_all[0.]['mAP']: break
    else: shift = cfg['shift_candidates'][-1]
    shifts = {'shift': shift, 'no_shift': 0.}
    roots = {st: target(sh) for st, sh in shifts.items()}
    zs = {st: zs_all[sh] for st, sh in shifts.items()}
    tick('zero_shot', t0)
    print('zero-shot mAP by shift:', {k: round(v['mAP'], 4) for k, v in zs_all.items()}, '-> shift', shift, flush=True)

    t0 = time.perf_counter()
    probe = run_all([('probe', st, cfg['seeds'][0], cfg, roots[st], pretrained, None) for st in SETTINGS], a.workers)
    probe = {k[1]: v for k, v in probe.items()}
    for st, pr in probe.items(): pr['plateau'] = plateau_epoch(pr['epoch_loss'][:cfg['probe_epochs']], cfg['plateau_frac'])
    period = int(min(max(2, 2*max(pr['plateau'] for pr in probe.values())), cfg['max_period']))
    tick('probe', t0)
    print('probe plateaus:', {st: pr['plateau'] for st, pr in probe.items()}, '-> epochs per period', period, flush=True)

    t0 = time.perf_counter()
    tasks = [(arm, st, s, cfg, roots[st], pretrained, period) for st in SETTINGS for s in cfg['seeds'] for arm in ARMS]
    records = {(k[0], k[1], k[2]): v for k, v in run_all(tasks, a.workers).items()}
    tick('study', t0)

    settings = analyse(records, cfg, period)
    plot_all(records, settings, probe, cfg, period, images, prefix='evidence_small' if a.small else 'evidence')
    times['total'] = round(time.perf_counter()-t_all, 1)
    cpu = {'probe': sum(r['cpu_s'] for r in probe.values()), 'study': sum(r['cpu_s'] for r in records.values())}
    doc = {
        'zero_shot_mAP': zs['no_shift']['mAP'], 'zero_shot_mAP_is_for': 'the no_shift target', 'zero_shot': zs,
        'shift': shift, 'zero_shot_by_shift': {str(k): v for k, v in zs_all.items()},
        'seeds': cfg['seeds'], 'epochs_per_period': period, 'n_periods': cfg['n_periods'],
        'decision_rule': decision_rule,
        'outcome': {st: settings[st]['decision']['outcome'] for st in SETTINGS},
        'settings': settings,
        'probe': {st: {'epoch_loss': pr['epoch_loss'], 'plateau': pr['plateau'], 'evals': pr['evals']} for st, pr in probe.items()},
        'runs': {f'{st}/{arm}/seed{s}': r for (arm, st, s), r in sorted(records.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2]))},
        'source': {**build, 'built_by_this_run': source_built_now, 'file': pretrained.name}, 'config': {**cfg, 'workers': a.workers},
        'timings_s': times, 'cpu_s_of_the_runs': cpu, 'torch_threads_per_run': 1, 'machine': {'cpus': os.cpu_count(), 'torch': torch.__version__, 'python': platform.python_version()},
    }
    write_json(doc, out)
    print(f'\nepochs per period {period} x {cfg["n_periods"]}; zero-shot mAP: ' + ', '.join(f"{st} {z['mAP']:.3f}" for st, z in zs.items()))
    for st, res in settings.items():
        print(f'\n{st}: ' + res['decision']['outcome'])
        print(f"{'arm':10} " + ' '.join(f'seed{s}' for s in cfg['seeds']) + '   mean    std')
        for arm in ('period1', *ARMS):
            print(f'{arm:10} ' + ' '.join(f'{v:.3f}' for v in res[arm]['mAP']) + f"   {res[arm]['mAP_mean']:.3f}  {res[arm]['mAP_std']:.3f}")
        for o, v in res['decision']['vs'].items(): print(f"rollback - {o}: mAP {v['mean']:+.3f} +- {v['std']:.3f} ({v['verdict']})")
        print('period 1 of the control equals period 1 of rolling back:', res['period1_control_equals_rollback'])
    print('\ntimes (s):', times)
    print('wrote', out)

if __name__ == '__main__': main()
