#!/usr/bin/env python
"""One prepared GPU check of VQ-Flow speed, precision and memory against the authors' code (aim: < 5 minutes).

Run from the repository root, with the repository on PYTHONPATH and a checkout of cool-xuan/vqflow:

    PYTHONPATH=. python3 benchmarks/device_check.py --authors _authoring/authors_vqflow

At the authors' configuration (convnextv2_base widths, 384 px, batch 4), on CUDA when there is one:
(a) ours vs the authors' training step and inference, fp32, alternating pairs (`vs_authors.timing`), also with the
    broadcast-condition variant (`ours+bcond`); identical weights are transplanted and the numbers compared first;
(b) ours with bf16 / fp16 mixed precision (the trainer's `Schedule.precision`) vs fp32: step time and loss difference;
(c) torch.compile of the flow subnets (`ours+compile`), if time is left;
(d) peak GPU memory per side, each in its own process.
Each part runs in its own try/except, so one failure does not lose the others. Prints a compact summary and writes
JSON to $OUT/device_check.json when $OUT is set (else to results/benchmarks/device_check.json with --write).
`--smoke` runs every part at tiny sizes (CPU is fine) to test the script itself.
"""
from __future__ import annotations
import argparse, importlib, json, os, sys, time, traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path: sys.path.insert(0, p)

MODULES = ('torch', 'numpy', 'scipy', 'pandas', 'tqdm', 'einops', 'fastcore', 'FrEIA', 'timm', 'sklearn', 'skimage',
           'PIL', 'torchvision')

def modules() -> dict:
    "Which packages import here (vqflow_nb needs torch, numpy, scipy, pandas, tqdm, einops, fastcore; the authors' FrEIA)."
    out = {}
    for m in MODULES:
        try: out[m] = getattr(importlib.import_module(m), '__version__', 'ok')
        except Exception as e: out[m] = f'MISSING ({type(e).__name__})'
    return out

def stub_optional(mods:dict) -> list:
    """Stand-ins for packages that vqflow_nb imports but this check never calls (tables, progress bars, HGAD's random
    rotations); fastcore, einops and FrEIA are real requirements and are never stubbed."""
    import types
    stubbed = []
    def mod(name, **attrs):
        m = types.ModuleType(name); m.__dict__.update(attrs); sys.modules[name] = m; return m
    if str(mods.get('pandas', '')).startswith('MISSING'):
        mod('pandas', DataFrame=type('DataFrame', (), {}), Series=type('Series', (), {}), isna=lambda x: x != x); stubbed.append('pandas')
    if str(mods.get('tqdm', '')).startswith('MISSING'):
        mod('tqdm'); mod('tqdm.auto', tqdm=lambda it=None, *a, **k: it); stubbed.append('tqdm')
    if str(mods.get('scipy', '')).startswith('MISSING'):
        mod('scipy'); mod('scipy.stats', special_ortho_group=None); stubbed.append('scipy')
    return stubbed

def part(name:str, res:dict, fn, t0:float, budget:float, need:float=0.):
    "Run one part; record its result or its error; skip it when less than `need` seconds of the budget are left."
    left = budget - (time.time() - t0)
    if left < need:
        res[name] = dict(skipped=f'{left:.0f} s of the budget left, part needs ~{need:.0f} s'); print(f'[{name}] skipped', flush=True); return
    print(f'[{name}] start at {time.time() - t0:.0f} s', flush=True)
    t = time.time()
    try: res[name] = fn()
    except Exception as e:
        res[name] = dict(error=f'{type(e).__name__}: {e}', traceback=traceback.format_exc()[-3000:])
        print(f'[{name}] FAILED: {res[name]["error"]}\n{res[name]["traceback"]}', flush=True)
    if isinstance(res[name], dict): res[name].setdefault('part_seconds', round(time.time() - t, 1))

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--authors', default=str(ROOT / '_authoring' / 'authors_vqflow'))
    ap.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    ap.add_argument('--smoke', action='store_true', help='tiny sizes: test the script itself (CPU is fine)')
    ap.add_argument('--pairs', type=int, default=None)
    ap.add_argument('--budget', type=float, default=420., help='seconds; later parts are skipped when it runs out')
    ap.add_argument('--no-compile', action='store_true')
    ap.add_argument('--write', action='store_true', help='also write results/benchmarks/device_check.json')
    args = ap.parse_args()
    t0 = time.time()
    res = dict(modules=modules())
    print('modules:', res['modules'], flush=True)
    res['stubbed'] = stub_optional(res['modules'])
    if res['stubbed']: print('stubbed (not used by this check):', res['stubbed'], flush=True)
    import torch
    import vs_authors as V
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cpu': torch.set_num_threads(int(os.environ.get('VQFLOW_THREADS', 1)))
    size = 'smoke' if args.smoke else 'authors'
    pairs = args.pairs or (2 if args.smoke else 5)
    warm = 1 if args.smoke else 2
    res['env'] = V.env_info(device)
    if device.type == 'cuda':
        res['env'].update(cudnn_allow_tf32=torch.backends.cudnn.allow_tf32, matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                          cudnn_benchmark=torch.backends.cudnn.benchmark, cuda=torch.version.cuda)
    res['size'] = size; res['size_spec'] = V.SIZES[size]
    print('env:', res['env'], flush=True)
    ns = argparse.Namespace(authors=args.authors, device=str(device), size=size, threads=torch.get_num_threads(), mem_steps=2)
    S, feats = {}, []

    def setup():
        S.update(V.setup(ns, device)); feats.extend(V.make_feats(S['size'], device))
        eq = V.equivalence(S, feats, device)
        print('  equivalence (max |theirs - ours|):', {k: f'{v:.3g}' for k, v in eq.items()}, flush=True)
        return dict(n_parameters=S['n_numbers'], equivalence=eq)
    part('setup_equivalence', res, setup, t0, args.budget)
    if 'error' in res['setup_equivalence']: return finish(res, args, t0)

    precs = ['bf16'] + (['fp16'] if device.type == 'cuda' else [])
    def fp32():
        return V.timing(S, feats, device, pairs, warm, ['ours', 'ours+bcond', 'ours+quant'])   # ours+quant: quant_conv='all' (on a CPU 'ours' already is)
    part('a_fp32_vs_authors', res, fp32, t0, args.budget)

    def amp():
        out = dict(loss_vs_fp32={})
        variants = [f'ours+{p}' for p in precs] + ['ours+bcond+bf16']
        for v in variants:
            try: out['loss_vs_fp32'][v] = V.variant_equivalence(S, feats, v)
            except Exception as e: out['loss_vs_fp32'][v] = dict(error=f'{type(e).__name__}: {e}')
            print(f'  {v} vs fp32:', out['loss_vs_fp32'][v], flush=True)
        ok = [v for v in variants if 'error' not in out['loss_vs_fp32'][v]]
        out['timing'] = V.timing(S, feats, device, pairs, warm, ['ours'] + ok)
        out['speedup_vs_ours_fp32'] = _vs_ours(out['timing'])
        return out
    part('b_mixed_precision', res, amp, t0, args.budget, need=30 if not args.smoke else 0)

    if not args.no_compile:
        def comp():
            out = dict(loss_vs_fp32=V.variant_equivalence(S, feats, 'ours+compile'))
            out['timing'] = V.timing(S, feats, device, pairs, warm, ['ours', 'ours+compile'])
            out['speedup_vs_ours_fp32'] = _vs_ours(out['timing'])
            return out
        part('c_compile', res, comp, t0, args.budget, need=120 if not args.smoke else 0)

    S.clear(); feats.clear()
    import gc; gc.collect()
    if device.type == 'cuda': torch.cuda.empty_cache()

    def mem():
        sides = ['theirs', 'ours', 'ours+bcond', 'ours+quant'] + [f'ours+{p}' for p in precs]
        left = max(args.budget - (time.time() - t0), 60)
        return V.memory(ns, sides, timeout=left / len(sides))
    part('d_peak_memory', res, mem, t0, args.budget + 120, need=60 if not args.smoke else 0)
    return finish(res, args, t0)

def _vs_ours(timing:dict) -> dict:
    "Per-pair ratios ours-fp32 / variant (> 1: the variant is faster than our fp32), from the same alternating run."
    import statistics
    out = {}
    for what, d in timing.items():
        base = d['seconds']['ours']
        for v, ts in d['seconds'].items():
            if v in ('theirs', 'ours'): continue
            r = [a / b for a, b in zip(base, ts)]
            out[f'{what}:{v}'] = dict(median=statistics.median(r), min=min(r), max=max(r), pairs=len(r))
    return out

def summary(res:dict) -> list:
    L = [f"device: {res['env'].get('gpu', res['env']['device'])}; torch {res['env']['torch']}; size {res['size']}"]
    bad = [m for m, v in res['modules'].items() if str(v).startswith('MISSING')]
    if bad: L.append(f"missing modules: {', '.join(bad)}")
    eq = res.get('setup_equivalence', {})
    if 'equivalence' in eq:
        e = eq['equivalence']
        L.append('same numbers (max |theirs - ours|): ' + ', '.join(f"{k} {e[k]:.3g}" for k in
                 ('loss', 'latents', 'log_det', 'grad_rel', 'image_score', 'add_map', 'mul_map')) + f" (loss {e['loss_theirs']:.6g})")
    for name in ('a_fp32_vs_authors', 'b_mixed_precision', 'c_compile'):
        d = res.get(name, {})
        if 'error' in d or 'skipped' in d: L.append(f"{name}: {d.get('error') or d.get('skipped')}"); continue
        t = d.get('timing', d)
        for what in ('train_step', 'inference'):
            for v, r in t.get(what, {}).get('ratios', {}).items():
                L.append(f"{name} {what:10s} {v:16s} theirs/ours median {r['median']:.2f}x (min {r['min']:.2f}, max {r['max']:.2f}, "
                         f"{r['pairs']} pairs; theirs {r['theirs_median_s']:.3f} s, ours {r['ours_median_s']:.3f} s)")
        for k, r in d.get('speedup_vs_ours_fp32', {}).items():
            L.append(f"{name} vs our fp32 {k}: {r['median']:.2f}x (min {r['min']:.2f}, max {r['max']:.2f})")
        lv = d.get('loss_vs_fp32', {})
        for v, e in (lv.items() if 'loss' not in lv else [('ours+compile', lv)]):
            if 'error' in e: L.append(f"{name} {v}: {e['error']}")
            else: L.append(f"{name} {v}: loss rel diff {e['loss_rel']:.2e}, image score {e['image_score']:.2e}, add map {e['add_map']:.2e}")
    mem = res.get('d_peak_memory', {})
    if 'error' in mem or 'skipped' in mem: L.append(f"d_peak_memory: {mem.get('error') or mem.get('skipped')}")
    else:
        key = 'cuda_peak_gb' if res['env']['device'].startswith('cuda') else 'vmhwm_gb'
        ref = mem.get('theirs', {})
        for side, m in mem.items():
            if not isinstance(m, dict): continue
            if 'error' in m: L.append(f"memory {side}: {m['error'][-300:]}"); continue
            cells = []
            for mode in ('inference', 'train'):
                v, r = m.get(f'{mode}_{key}'), ref.get(f'{mode}_{key}')
                if v is not None: cells.append(f"{mode} {v:.2f} GB" + (f" ({100 * v / r:.0f} % of theirs)" if r else ''))
            L.append(f"memory {side}: " + ', '.join(cells))
    return L

def finish(res:dict, args, t0:float):
    res['total_seconds'] = round(time.time() - t0, 1)
    L = summary(res)
    res['summary'] = L
    print('\n==== SUMMARY ====\n' + '\n'.join(L) + f"\ntotal {res['total_seconds']} s", flush=True)
    paths = ([Path(os.environ['OUT']) / 'device_check.json'] if os.environ.get('OUT') else []) + \
            ([ROOT / 'results' / 'benchmarks' / 'device_check.json'] if args.write else [])
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True); p.write_text(json.dumps(res, indent=1, default=str)); print('wrote', p)

if __name__ == '__main__': main()
