#!/usr/bin/env python
"""A/B of our exact fast paths against the dense maths they replace, in one process (alternating, median of pairs).

Cases (cached features, the trainer's step: loss, backward, clip 2.0, fused Adam; and `score` for inference):
- vqflow_authors: the authors' VQFlowConfig at convnextv2_base widths, 384 px, batch 4: `quant_conv` 'cpu' (the
  condition convolved from its codes), 'none' with `broadcast_cond` (prototype broadcast only), 'none' (dense);
- vqflow_small: `VQFlowConfig.small` on tf_efficientnet_lite0's widths at 256 px, batch 8: 'cpu' vs 'none';
- hgad_authors: HGAD at the authors' configuration (see `_hgad_case`): `pos_broadcast` on vs off.
Random features (only the shapes matter for time). Ratios are dense / fast: > 1 means the fast path is faster.
Usage: python benchmarks/bench_fast_paths.py [case ...] [--pairs N] [--threads T]; writes results/benchmarks/fast_paths.{json,md}.
"""
import argparse, json, os, platform, statistics, sys, time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))

def _vqflow_case(authors:bool):
    import torch
    from vqflow_nb.vqflow import VQFlow, VQFlowConfig
    from vqflow_nb.train import make_optimizer, Schedule
    if authors: chans, bs, sizes = [128, 256, 512, 1024], 4, [96, 48, 24, 12]                # convnextv2_base, 384 px
    else: chans, bs, sizes = [24, 40, 112, 320], 8, [64, 32, 16, 8]                        # tf_efficientnet_lite0, 256 px
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(bs, c, s, s, generator=g) for c, s in zip(chans, sizes)]
    base = (VQFlowConfig.for_channels if authors else VQFlowConfig.small)(chans, seed=0)
    variants = dict(quant=dict(quant_conv='cpu'), dense=dict(quant_conv='none'))
    if authors: variants['bcond'] = dict(quant_conv='none', broadcast_cond=True)
    if ONLY: variants = {k: v for k, v in variants.items() if k in ONLY}
    # one model and one optimiser for every variant (only the config differs; weights do not change the time):
    # a copy per variant would hold 3 x 5 GB of weights, gradients and Adam state at the authors' size
    torch.manual_seed(0); m = VQFlow(base)
    opt = make_optimizer(list(m.parameters()), Schedule(lr=1e-4))
    sides = {}
    for name, kw in variants.items():
        cfg = replace(base, **kw)
        def step(cfg=cfg):
            m.cfg = cfg; m.train(); out = m.loss(feats); opt.zero_grad(); out['loss'].backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 2.0); opt.step()
        def infer(cfg=cfg):
            m.cfg = cfg; m.eval()
            with torch.no_grad(): m.score(feats, None)
        sides[name] = dict(train_step=step, inference=infer)
    return sides, 'dense', dict(channels=chans, batch=bs, maps=sizes, config='authors' if authors else 'small')

def _hgad_case():
    """HGAD at the authors' configuration (200-channel maps of 64/32/16 positions a side, 12 blocks, 256-d condition, 15 classes, batch 8):
    the training step of the middle level (stage 2, forward + backward; the three levels' steps have the same structure) and
    `score` of one image (three levels); `pos_broadcast` on vs off."""
    import torch
    from vqflow_nb.hgad import HGAD, HGADConfig
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(8, 200, s, s, generator=g) for s in (64, 32, 16)]
    cls = torch.arange(8) % 15
    base = HGADConfig.for_channels((200, 200, 200), 15, seed=0)
    torch.manual_seed(0); m = HGAD(base)
    sides = {}
    for name, pb in (('broadcast', True), ('dense', False)):
        cfg = replace(base, pos_broadcast=pb)
        def step(cfg=cfg):
            m.cfg = cfg; m.train(); m.zero_grad(); m._level_loss(1, feats[1], cls, True)['loss'].backward()
        def infer(cfg=cfg):
            m.cfg = cfg; m.eval()
            with torch.no_grad(): m.score([f[:1] for f in feats], dict(cls_index=cls[:1]))
        sides[name] = dict(train_step=step, inference=infer)
    return sides, 'dense', dict(channels=[200] * 3, batch=8, maps=[64, 32, 16], config='authors, level 2 step')

ONLY = None   # --variants: a subset of each case's variants (the reference is always kept)

CASES = dict(vqflow_authors=lambda: _vqflow_case(True), vqflow_small=lambda: _vqflow_case(False), hgad_authors=_hgad_case)

def run(name, pairs, warmup=1, inference=True):
    sides, ref, info = CASES[name]()
    out = dict(case=name, info=info, reference=ref)
    for what in ('train_step', 'inference') if inference else ('train_step',):
        fns = {k: v[what] for k, v in sides.items()}
        for _ in range(warmup):
            for f in fns.values(): f()
        names, t = list(fns), {k: [] for k in fns}
        for i in range(pairs):
            for k in (names if i % 2 == 0 else names[::-1]):
                t0 = time.perf_counter(); fns[k](); t[k].append(time.perf_counter() - t0)
            print(f'  {name} {what} pair {i + 1}/{pairs}: ' + ', '.join(f'{k} {t[k][-1]:.3f}s' for k in names), flush=True)
        out[what] = {k: dict(median_s=statistics.median(v), ratio_median=statistics.median([a / b for a, b in zip(t[ref], v)]),
                             ratio_min=min(a / b for a, b in zip(t[ref], v)), ratio_max=max(a / b for a, b in zip(t[ref], v)), seconds=v)
                     for k, v in t.items()}
    return out

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('cases', nargs='*', default=list(CASES))
    ap.add_argument('--pairs', type=int, default=5)
    ap.add_argument('--warmup', type=int, default=1)
    ap.add_argument('--no-inference', action='store_true')
    ap.add_argument('--threads', type=int, default=int(os.environ.get('VQFLOW_THREADS', 1)))
    ap.add_argument('--variants', default=None, help='comma-separated subset of the variants (e.g. quant,dense)')
    ap.add_argument('--out', default=str(ROOT / 'results' / 'benchmarks' / 'fast_paths'))
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    global ONLY
    ONLY = set(args.variants.split(',')) | {'dense'} if args.variants else None
    res = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), torch=torch.__version__, threads=args.threads,
                            load_avg_start=os.getloadavg()), cases=[run(c, args.pairs, args.warmup, not args.no_inference) for c in args.cases],
               command='python ' + ' '.join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]))
    res['machine']['load_avg_end'] = os.getloadavg()
    Path(args.out + '.json').write_text(json.dumps(res, indent=1))
    L = ['# Exact fast paths against the dense maths (one process, alternating pairs)', '',
         f"{res['machine']['platform']}, {res['machine']['cpus']} CPUs shared with other jobs (load average "
         f"{tuple(round(x, 1) for x in res['machine']['load_avg_start'])} at the start, {tuple(round(x, 1) for x in res['machine']['load_avg_end'])} at the end), "
         f"torch {res['machine']['torch']}, {args.threads} thread(s). Ratio = reference / variant per pair (> 1: the variant is faster).", '',
         '| case | what | variant | pairs | median ratio | min | max | median s |', '|---|---|---|---|---|---|---|---|']
    for c in res['cases']:
        for what in ('train_step', 'inference'):
            for k, d in c.get(what, {}).items():
                L.append(f"| {c['case']} ({c['info']['config']}, batch {c['info']['batch']}) | {what} | {k} | {len(d['seconds'])} | "
                         f"{d['ratio_median']:.2f}× | {d['ratio_min']:.2f}× | {d['ratio_max']:.2f}× | {d['median_s']:.3f} |")
    L += ['', f"Command: `{res['command']}`", '']
    Path(args.out + '.md').write_text('\n'.join(L)); print('\n'.join(L))

if __name__ == '__main__': main()
