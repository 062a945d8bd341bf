#!/usr/bin/env python
"""One prepared device call: ours against the authors' code for VQ-Flow, HGAD and HVQ-Trans, fp32 and bf16.

For each method, at the authors' configuration (`--size authors`, the default on CUDA), in its own process with its
own time cap (one method's failure or timeout loses nothing of the others):
  1. both sides built by `vs_authors.py`'s set-up (their model from their checkout, every weight transplanted);
  2. the equality table in fp32 (`vs_authors.equivalence` / the method module's `equivalence`, with its tolerances);
  3. bf16: the same equality table with BOTH sides under `torch.autocast(bfloat16)` (the trainer's
     `Schedule.precision='bf16'` context, `train.Amp`), and each side's loss and image scores under bf16 against its own
     fp32 ones from the same state. bf16 is changed maths: these rows have no tolerance, they say how far it moves;
  4. time, fp32: the authors' step and inference against ours and our variants, alternating rounds (`--pairs`, 3);
  5. time, bf16: the authors' step and inference under bf16 autocast against ours under bf16 (the trainer's
     mixed precision for ours; their model wrapped in the same autocast), alternating rounds. Inference under
     bf16 is what bf16 inference would give (the package evaluates in fp32 even when it trains in bf16);
  6. peak memory per side, each side in its own process (`torch.cuda.max_memory_allocated` on CUDA, VmHWM on a CPU),
     several processes at a time (`--mem-parallel`; per-process peaks do not add up), after all timings.
Writes <out>/vs_authors_gpu.json and .md (device named: torch.cuda.get_device_name, torch and CUDA versions) and
prints a compact summary. `--table <json>` prints the markdown table for docs/performance.md from such a JSON.

On the device: `benchmarks/gpu_vs_authors.sh` (its header says how to call it with the device tool, what to carry
and the timeout). Here, to test this script on the CPU (tiny sizes, every part, all three methods):
    PYTHONPATH=. python benchmarks/gpu_vs_authors.py --smoke --out /tmp/gva \
        --authors-vqflow DIR --authors-hgad DIR --authors-hvqtrans DIR
"""
from __future__ import annotations
import argparse, concurrent.futures as cf, contextlib, copy, json, os, statistics, subprocess, sys, time, traceback, types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path: sys.path.insert(0, p)

METHODS = ('vqflow', 'hgad', 'hvqtrans')
NAMES = dict(vqflow='VQ-Flow', hgad='HGAD', hvqtrans='HVQ-Trans')
from _vs_common import CHECKOUTS
MARK = {m: mark for m, (_, mark) in CHECKOUTS.items()}   # the file that recognises each checkout
from vs_authors import BF16, is_bf16, base_side as base, side_kind as kind, bf16_ctx, under_bf16   # the bf16 sides
# sides timed per method: fp32 group (theirs first), bf16 group (both sides under bf16 autocast)
PLAN = dict(
    vqflow=dict(fp32=['theirs', 'ours', 'ours+quant'], bf16=['theirs+bf16', 'ours+bf16'],
                memory=['theirs', 'ours', 'ours+quant', 'theirs+bf16', 'ours+bf16']),
    hgad=dict(fp32=['theirs', 'theirs_flows', 'ours', 'ours+backbone', 'ours+dense'],
              bf16=['theirs+bf16', 'theirs_flows+bf16', 'ours+bf16'],
              memory=['theirs', 'ours', 'ours+backbone', 'theirs+bf16', 'ours+bf16']),
    hvqtrans=dict(fp32=['theirs', 'ours', 'ours+cached', 'ours+batched', 'ours+avgpool'], bf16=['theirs+bf16', 'ours+bf16'],
                  memory=['theirs', 'ours', 'ours+cached', 'theirs+bf16', 'ours+bf16']))
# the smoke run (CPU, tiny sizes) keeps every part but fewer sides, so that all three methods fit in about a minute
SMOKE_PLAN = dict(
    vqflow=dict(fp32=['theirs', 'ours'], bf16=['theirs+bf16', 'ours+bf16'], memory=['theirs+bf16']),
    hgad=dict(fp32=['theirs', 'theirs_flows', 'ours'], bf16=['theirs+bf16', 'theirs_flows+bf16', 'ours+bf16'], memory=['ours+bf16']),
    hvqtrans=dict(fp32=['theirs', 'ours', 'ours+cached'], bf16=['theirs+bf16', 'ours+bf16'], memory=['theirs+bf16']))
# seconds each method's process may take (its parts are skipped or cut when it runs out), and the memory part's share
CAPS = dict(vqflow=60, hgad=90, hvqtrans=60, memory=75)

# ---------------------------------------------------------------------------------------------------------------
# one adapter per method: set-up, equality table, sides (train / infer callables), image scores, what a memory
# process drops. VQ-Flow's pieces live in vs_authors.py, HGAD's and HVQ-Trans's in authors_hgad.py / authors_hvqtrans.py.
class VQFlowAdapter:
    method = 'vqflow'
    NOTES = {'ours': 'the package as configured (on a GPU the dense convolution of the condition, as theirs)',
             'ours+quant': "quant_conv='all': the condition's convolutions as gathers of precomputed code products (exact)"}
    CHANGED = {}
    def __init__(self): import vs_authors as V; self.V = V

    def setup(self, authors, size, device):
        ns = argparse.Namespace(authors=authors, size=size)
        S = self.V.setup(ns, device)
        S['feats'], S['device'] = self.V.make_feats(S['size'], device), device
        S['spec'] = {k: list(v) if isinstance(v, tuple) else v for k, v in S['size'].items()}
        return S

    def equivalence(self, S) -> dict: return self.V.equivalence(S, S['feats'], S['device'])

    def equivalence_bf16(self, S) -> dict:
        with bf16_ctx(S['device']): return self.equivalence(S)

    def equal(self, e) -> dict:
        "VQ-Flow's vs_authors has no tolerance table: the rows are reported, none is judged (CUDA's were larger than the CPU's)."
        return {}

    def sides(self, S, names, share=False) -> dict:
        V, A, P, c = self.V, S['A'], S['P'], S['c']
        loader = V.authors_batch(S['feats'])
        out = {}
        for n in names:
            if kind(n) == 'theirs':
                tr = lambda: V.authors_train_step(A, c, S['models'], S['params'], S['opt_a'], loader)
                inf = lambda: V.authors_infer(A, P, c, S['models'], loader)
                out[n] = dict(train=under_bf16(tr, S['device']) if is_bf16(n) else tr,
                              infer=under_bf16(inf, S['device']) if is_bf16(n) else inf, kind='theirs')
            else:   # `vs_authors._patch_variant` knows '+bf16' (the trainer's Amp around the step and the inference)
                m = S['ours'] if (n == 'ours' or share) else copy.deepcopy(S['ours'])
                amp = V._patch_variant(m, n); opt, sch = V.ours_optimizer(m)
                out[n] = dict(train=lambda m=m, opt=opt, sch=sch, amp=amp: V.ours_train_step(m, opt, sch, S['feats'], amp),
                              infer=lambda m=m, amp=amp: V._infer_ctx(dict(model=m, amp=amp), S['feats'], c.input_size), kind='ours')
        return out

    SCORE = 'add map'   # their image scores saturate at 1.0 on random features (smoke and authors' sizes): the maps move
    def image_scores(self, side, out): return out[1]   # theirs `post_process` (image, add, mul); ours (image, pixel = add, pro = mul)

    def losses(self, e): return e['loss_theirs'], e['loss_ours']

    def drop_other(self, S, side):
        if kind(side) == 'theirs': del S['ours']
        else:
            for k in ('models', 'params', 'opt_a'): del S[k]

class MethodAdapter:
    "HGAD and HVQ-Trans through their `authors_<method>.py` modules (setup, equivalence, sides, variant_model)."
    def __init__(self, method):
        import vs_authors as V
        self.V, self.method, self.M = V, method, V.method_module(method)
        self.NOTES, self.CHANGED = dict(getattr(self.M, 'SIDE_NOTES', {})), dict(getattr(self.M, 'CHANGED_MATHS', {}))
        if method == 'hgad': self.NOTES['theirs_flows'] = 'their three per-level flow steps on the pyramid their encoder made (no backbone in the step)'

    def setup(self, authors, size, device): return self.M.setup(authors, size, device)
    def equivalence(self, S) -> dict: return self.M.equivalence(S)
    def equal(self, e) -> dict: return self.V.equality_ok(self.M, e)

    def equivalence_bf16(self, S) -> dict:
        "The equality table with both sides under bf16; HVQ-Trans's test-time model read back in float32 (`authors_infer_bf16`)."
        if not hasattr(self.M, 'authors_infer_bf16'):
            with bf16_ctx(S['device']): return self.M.equivalence(S)
        real = self.M.authors_ot_model
        self.M._float_cosine(S['A'].MO)
        self.M.authors_ot_model = lambda S: self.M._FloatOut(real(S), S['device'])
        try:
            with bf16_ctx(S['device']): return self.M.equivalence(S)
        finally: self.M.authors_ot_model = real

    def sides(self, S, names, share=False) -> dict:
        sd = self.V.method_sides(self.M, S, names, share)
        return {n: sd[n] for n in names}

    SCORE = 'image scores'
    def image_scores(self, side, out):
        if self.method == 'hgad': return out[1]                    # (maps, image scores, raw/parts), both sides
        return out[1] if kind(side) == 'theirs' else out.image      # theirs (pred, score); ours a Scores

    def losses(self, e): return e['loss_theirs'], e['loss_ours']   # HGAD: per level lists

    def drop_other(self, S, side): self.V.drop_other_side(self.method, S, side)

def adapter(method:str): return VQFlowAdapter() if method == 'vqflow' else MethodAdapter(method)

# ---------------------------------------------------------------------------------------------------------------
def _rel(a, b) -> float:
    "max over entries of |a - b| / max |b| (lists of per-level losses compare level by level)."
    import numpy as np
    a, b = np.atleast_1d(np.asarray(a, dtype=np.float64)), np.atleast_1d(np.asarray(b, dtype=np.float64))
    return float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-30))

def bf16_part(ad, S, e32:dict, device) -> dict:
    """Changed maths, measured: (a) the equality table with both sides under bf16 autocast; (b) each side's loss under
    bf16 against its fp32 loss from the same state (from the two tables: each table starts from the same state and
    restores it); (c) each side's image scores under bf16 against its fp32 ones (one inference each, same state)."""
    from _vs_common import maxdiff
    import numpy as np
    res = dict(score=ad.SCORE, image_score_vs_fp32={}, errors={})
    saved = snapshot(S)   # the table restores the state it changes, but not when it fails half-way
    try:
        e16 = ad.equivalence_bf16(S)
        lt32, lo32 = ad.losses(e32); lt16, lo16 = ad.losses(e16)
        res.update(equivalence=e16, loss_rel_vs_fp32=dict(theirs=_rel(lt16, lt32), ours=_rel(lo16, lo32)))
    except Exception as e: res['errors']['equivalence'] = _err(e)
    finally: restore(S, saved)
    sd = ad.sides(S, ['theirs', 'ours', 'theirs+bf16', 'ours+bf16'], share=True)
    for k in ('theirs', 'ours'):
        try:
            s32 = np.asarray(ad.image_scores(k, sd[k]['infer']()), dtype=np.float64)
            s16 = np.asarray(ad.image_scores(k, sd[k + BF16]['infer']()), dtype=np.float64)
            res['image_score_vs_fp32'][k] = dict(max_abs=maxdiff(s16, s32), scale=float(np.abs(s32).max()),
                                                 rel=maxdiff(s16, s32) / max(float(np.abs(s32).max()), 1e-30),
                                                 finite=bool(np.isfinite(s16).all()))
        except Exception as e: res['errors'][f'scores_{k}'] = _err(e)
    for k, v in res['errors'].items(): print(f'  bf16 {k} FAILED: {v}', flush=True)
    return res

def _stateful(S) -> dict:
    "Every module and optimiser of both sides (HGAD's flows and optimiser hang off their model outside its state_dict)."
    import torch
    objs = {k: v for k, v in S.items() if isinstance(v, (torch.nn.Module, torch.optim.Optimizer))}
    th = S.get('theirs')
    if th is not None and isinstance(getattr(th, 'nfs', None), (list, tuple)):
        objs.update({f'theirs.nfs.{i}': nf for i, nf in enumerate(th.nfs)})
    if th is not None and isinstance(getattr(th, 'optimizer', None), torch.optim.Optimizer): objs['theirs.optimizer'] = th.optimizer
    return objs

def snapshot(S) -> dict: return {k: copy.deepcopy(o.state_dict()) for k, o in _stateful(S).items()}

def restore(S, saved:dict):
    for k, o in _stateful(S).items():
        if k in saved: o.load_state_dict(saved[k])
    for o in _stateful(S).values():
        if hasattr(o, 'zero_grad') and isinstance(o, __import__('torch').nn.Module): o.zero_grad(set_to_none=True)

def _err(e) -> str: return f'{type(e).__name__}: {e}\n' + traceback.format_exc()[-2000:]

def timing_part(ad, S, names:list, pairs:int, warmup:int, device, label:str) -> dict:
    "Alternating rounds of every side's training step, then of every side's inference; ratios theirs / ours per round."
    from _vs_common import alternate, ratios, timed
    sd = ad.sides(S, names)
    refs = [k for k, d in sd.items() if d['kind'] == 'theirs']
    ours = [k for k, d in sd.items() if d['kind'] == 'ours']
    out, failed = {}, {}
    for what, key in (('train_step', 'train'), ('inference', 'infer')):
        # one call each first, in order: a side that fails is left out; the call is the first warm-up round, or, without
        # warm-up, the first timed round (then the next round runs in the reverse order)
        fns, first = {}, {}
        for k, d in sd.items():
            if d[key] is None or k in failed: continue
            try: first[k] = timed(d[key], device); fns[k] = d[key]
            except Exception as e: failed[k] = f'{what}: ' + _err(e); print(f'  {label} {k} FAILED: {failed[k]}', flush=True)
        if warmup >= 1: t = alternate(fns, pairs, warmup - 1, device, f'{label} {what}')
        else:
            print(f'  {label} {what} round 1/{pairs}: ' + ', '.join(f'{k} {v:.3f}s' for k, v in first.items()), flush=True)
            rest = alternate(dict(reversed(list(fns.items()))), pairs - 1, 0, device, f'{label} {what} (after round 1)')
            t = {k: [first[k]] + rest[k] for k in fns}
        out[what] = dict(seconds=t, ratios={r: {v: ratios(t[r], t[v]) for v in ours if v in t} for r in refs if r in t})
    if failed: out['failed'] = failed
    del sd
    return out

def run_one(args) -> dict:
    "`--one METHOD`: every in-process part for one method; the JSON file is rewritten after each part."
    import torch, gc
    t0 = time.time()
    device = torch.device(args.device)
    if device.type == 'cpu' or args.threads: torch.set_num_threads(args.threads or 1)
    plan = (SMOKE_PLAN if args.smoke else PLAN)[args.one]
    res = dict(method=args.one, size=args.size, device=str(device), pairs=args.pairs, warmup=args.warmup,
               plan=plan, parts={}, errors={})
    def save(): Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    ad, S = adapter(args.one), {}
    res.update(notes={**ad.NOTES, '+bf16': "the side under the trainer's bf16 autocast (changed maths)"}, changed_maths=ad.CHANGED)
    def part(name, fn, need=0.):
        left = args.cap - (time.time() - t0)
        if left < need:
            res['errors'][name] = f'skipped: {left:.0f} s of the method\'s {args.cap:.0f} s left'; print(f'[{args.one}] {name} skipped', flush=True)
            save(); return
        t = time.time(); print(f'[{args.one}] {name} at {t - t0:.0f} s', flush=True)
        try: fn()
        except Exception as e:
            res['errors'][name] = f'{type(e).__name__}: {e}\n' + traceback.format_exc()[-2500:]
            print(f'[{args.one}] {name} FAILED: {res["errors"][name]}', flush=True)
        res['parts'][name] = round(time.time() - t, 2); save()

    def setup():
        S.update(ad.setup(args.authors, args.size, device))
        res.update(n_numbers=S['n_numbers'], size_spec=S['spec'])
    part('setup', setup)
    if 'setup' in res['errors']: return res
    def eq32():
        e = ad.equivalence(S)
        res.update(equivalence=e, equal=ad.equal(e))
        if ad.method != 'vqflow': res['tolerance'] = ad.M.TOLERANCE
        print(f'[{args.one}] fp32 equality', {k: f'{v:.3g}' for k, v in e.items() if isinstance(v, float)}, flush=True)
    part('equivalence_fp32', eq32)
    if 'equivalence' in res:
        def b16():
            res['bf16'] = b = bf16_part(ad, S, res['equivalence'], device)
            print(f"[{args.one}] bf16 vs fp32: loss {b.get('loss_rel_vs_fp32')}, {b['score']} "
                  f"{ {k: v['rel'] for k, v in b['image_score_vs_fp32'].items()} }", flush=True)
        part('bf16_checks', b16)
    res['timing'] = {}
    for group in ('fp32', 'bf16'):
        def tim(group=group):
            res['timing'][group] = timing_part(ad, S, plan[group], args.pairs, args.warmup, device, f'[{args.one} {group}]')
        part(f'timing_{group}', tim, need=5)
    res['seconds'] = round(time.time() - t0, 1)
    save()
    return res

# ---------------------------------------------------------------------------------------------------------------
def mem_child(args):
    "`--mem-child METHOD --side SIDE`: build, keep one side, run inference then training steps; print the peaks."
    import torch, gc
    import vs_authors as V
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or (1 if device.type == 'cpu' else 4))
    ad = adapter(args.mem_child)
    S = ad.setup(args.authors, args.size, device)
    side = args.side
    keep = ad.sides(S, [side], share=True)[side]
    if keep['train'] is None: return print('MEMORY ' + json.dumps(dict(side=side, error='inference-only side')), flush=True)
    ad.drop_other(S, side)
    gc.collect()
    try:   # give the dropped side's freed pages back to the system, so the kept side's peak is its own (CPU)
        import ctypes; ctypes.CDLL('libc.so.6').malloc_trim(0)
    except Exception: pass
    V.print_peaks(side, dict(inference=keep['infer'], train=keep['train']), device, args.mem_steps)

def memory_part(args, authors:dict, sides:list, deadline:float) -> dict:
    "Each (method, side) in its own process, `--mem-parallel` at a time; none is started after the deadline."
    env = {**os.environ, 'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', '')}
    def one(ms):
        m, side = ms
        left = deadline - time.time()
        if left < 10: return ms, dict(error=f'not started: {left:.0f} s of the budget left')
        cmd = [sys.executable, __file__, '--mem-child', m, '--side', side, '--authors', authors[m], '--device', args.device,
               '--size', args.size, '--mem-steps', str(args.mem_steps)] + (['--threads', str(args.threads)] if args.threads else [])
        t = time.time()
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=left)
            line = [l for l in r.stdout.splitlines() if l.startswith('MEMORY ')]
            d = json.loads(line[0][7:]) if line and not r.returncode else dict(error=(r.stderr or r.stdout)[-1500:])
        except subprocess.TimeoutExpired: d = dict(error=f'timed out after {left:.0f} s')
        d['seconds'] = round(time.time() - t, 1)
        print(f'  memory {m} {side}: ' + ', '.join(f'{k} {v:.3f}' for k, v in d.items() if k.endswith('_gb') and isinstance(v, float))
              + (f" ERROR {d['error'][-300:]}" if 'error' in d else ''), flush=True)
        return ms, d
    out = {}
    with cf.ThreadPoolExecutor(max(1, args.mem_parallel)) as ex:
        for (m, side), d in ex.map(one, sides): out.setdefault(m, {})[side] = d
    return out

# ---------------------------------------------------------------------------------------------------------------
def env_info(device) -> dict:
    import torch, platform
    d = dict(torch=torch.__version__, python=platform.python_version(), device=str(device), host_cpus=os.cpu_count())
    if device.type == 'cuda':
        p = torch.cuda.get_device_properties(device)
        d.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda, gpu_memory_gb=round(p.total_memory / 1024 ** 3, 1),
                 cudnn=torch.backends.cudnn.version(), cudnn_allow_tf32=torch.backends.cudnn.allow_tf32,
                 matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_benchmark=torch.backends.cudnn.benchmark)
    else:
        import vs_authors as V
        d['cpu'] = V.cpu_info()
    return d

def find_authors(args) -> dict:
    "Each method's checkout: --authors-<method>, else $VQFLOW_AUTHORS_<METHOD>, else _authoring/authors_<method>."
    out = {}
    for m in METHODS:
        d = getattr(args, f'authors_{m}') or os.environ.get(f'VQFLOW_AUTHORS_{m.upper()}') or str(ROOT / '_authoring' / f'authors_{m}')
        out[m] = d if (Path(d) / MARK[m]).exists() else None
    return out

def stub_missing():
    """Stand-ins for packages the device image lacks and these benchmarks never call: imagecodecs (vqflow_nb.data's
    image decoding, imported through vqflow_nb.features). fastcore and FrEIA are real requirements: carried as wheels."""
    import importlib.util as u
    stubbed = []
    for name in ('imagecodecs',):
        if u.find_spec(name) is None: sys.modules[name] = types.ModuleType(name); stubbed.append(name)
    return stubbed

def drive(args):
    "The whole call: each method's process under its cap, then the memory processes; JSON and markdown; summary."
    import torch
    t0 = time.time()
    device = torch.device(args.device)
    out = Path(args.out); out.mkdir(parents=True, exist_ok=True)
    authors = find_authors(args)
    methods = [m for m in args.methods.split(',') if m]
    res = dict(env=env_info(device), size=args.size, smoke=args.smoke, pairs=args.pairs, warmup=args.warmup, budget_s=args.budget,
               authors={m: (Path(d).name if d else None) for m, d in authors.items()}, stubbed=stub_missing(), methods={})
    print('env:', res['env'], flush=True)
    env = {**os.environ, 'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), 'PYTHONUNBUFFERED': '1'}
    caps = {**CAPS, **({k: float(v) for k, v in (kv.split('=') for kv in args.caps.split(',') if kv)} if args.caps else {})}
    def left(): return args.budget - (time.time() - t0)
    for m in methods:
        if authors[m] is None:
            res['methods'][m] = dict(status=f'no checkout of the authors\' {m} code (--authors-{m}, $VQFLOW_AUTHORS_{m.upper()}, '
                                             f'_authoring/authors_{m})'); continue
        reserve = sum(caps[k] for k in methods[methods.index(m) + 1:] if authors.get(k)) + caps['memory']
        cap = max(min(caps[m], left() - reserve), min(caps[m], 20))
        if left() < 15: res['methods'][m] = dict(status=f'not started: {left():.0f} s of the budget left'); continue
        js = out / f'_part_{m}.json'
        js.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, '--one', m, '--json', str(js), '--authors', authors[m], '--device', args.device, '--size', args.size,
               '--pairs', str(args.pairs), '--warmup', str(args.warmup), '--cap', str(cap)] + \
              (['--threads', str(args.threads)] if args.threads else []) + (['--smoke'] if args.smoke else [])
        print(f'== {NAMES[m]} (cap {cap:.0f} s, {left():.0f} s of the budget left)', flush=True)
        t = time.time()
        try:
            r = subprocess.run(cmd, cwd=ROOT, env=env, timeout=cap + 15, stdout=None if args.verbose else subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
            status = 'ok' if r.returncode == 0 else f'exit {r.returncode}'
            tail = '' if args.verbose else (r.stdout or '')[-3000:]
        except subprocess.TimeoutExpired as e:
            status, tail = f'killed at its cap ({cap + 15:.0f} s)', (e.stdout or b'')[-3000:] if isinstance(e.stdout, bytes) else (e.stdout or '')[-3000:]
            if isinstance(tail, bytes): tail = tail.decode(errors='replace')
        d = json.loads(js.read_text()) if js.exists() else {}
        js.unlink(missing_ok=True)
        d['status'], d['wall_s'] = status, round(time.time() - t, 1)
        if d.get('errors'): d['status'] += ' (parts failed: ' + ', '.join(d['errors']) + ')'
        if status != 'ok' or d.get('errors'): d['log_tail'] = tail
        res['methods'][m] = d
        print(f"   {NAMES[m]}: {d['status']} in {d['wall_s']} s", flush=True)
        if status != 'ok' and tail: print(tail[-1500:], flush=True)
    if not args.no_memory:
        plan = SMOKE_PLAN if args.smoke else PLAN
        ok = [m for m in methods if authors[m] and 'setup' not in res['methods'][m].get('errors', {'setup': 1})]
        # interleaved (one side of each method in turn), so that HGAD's large processes do not all run at once
        sides = [(m, plan[m]['memory'][i]) for i in range(max([len(plan[m]['memory']) for m in ok] or [0])) for m in ok
                 if i < len(plan[m]['memory'])]
        print(f'== peak memory: {len(sides)} processes, {args.mem_parallel} at a time ({left():.0f} s left)', flush=True)
        t = time.time()
        mem = memory_part(args, authors, sides, t0 + args.budget - 5)
        for m, d in mem.items(): res['methods'][m]['memory'] = d
        res['memory_wall_s'] = round(time.time() - t, 1)
    res['total_s'] = round(time.time() - t0, 1)
    res['summary'] = summary(res)
    (out / 'vs_authors_gpu.json').write_text(_portable(json.dumps(res, indent=1, default=str)))
    (out / 'vs_authors_gpu.md').write_text(_portable('\n'.join(report_md(res))))
    print('\n==== SUMMARY ====\n' + '\n'.join(res['summary']) + f"\ntotal {res['total_s']} s; wrote {out}/vs_authors_gpu.json, .md", flush=True)
    return res

def _portable(text:str) -> str:
    "Machine paths in error tracebacks rewritten (`vqflow_nb.execute.portable`), so the files can go under results/ as they are."
    try: from vqflow_nb.execute import portable
    except Exception: return text
    return portable(text)

# ---------------------------------------------------------------------------------------------------------------
# reporting
def device_line(res) -> str:
    e = res['env']
    if 'gpu' in e: return f"{e['gpu']} ({e.get('gpu_memory_gb')} GiB), torch {e['torch']}, CUDA {e.get('cuda')}, cuDNN {e.get('cudnn')}"
    return f"CPU {e.get('cpu', {}).get('model', '?')} ({e.get('host_cpus')} CPUs), torch {e['torch']}"

def _r(r) -> str: return f"{r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})"

def timing_rows(d:dict):
    "(group, what, theirs side, ours side, ratio dict) for every timed pair of one method."
    for group, t in d.get('timing', {}).items():
        for what, w in t.items():
            if what == 'failed': continue
            for ref, rr in w['ratios'].items():
                for v, r in rr.items(): yield group, what, ref, v, r

def failed_sides(d:dict) -> dict:
    "side -> first line of its error, for sides left out of a timing group (they failed their first call)."
    return {k: v.splitlines()[0][:200] for t in d.get('timing', {}).values() for k, v in t.get('failed', {}).items()}

def mem_key(res) -> str: return 'cuda_peak_gb' if res['env']['device'].startswith('cuda') else 'vmhwm_gb'

def summary(res) -> list:
    L = [f"device: {device_line(res)}; size {res['size']}; {res['pairs']} alternating rounds after {res['warmup']} warm-up"]
    key = mem_key(res)
    for m, d in res['methods'].items():
        L.append(f"{NAMES[m]}: {d.get('status')}" + (f" ({d.get('wall_s')} s)" if 'wall_s' in d else ''))
        if 'equivalence' in d:
            e, eq = d['equivalence'], d.get('equal', {})
            bad = [k for k, ok in eq.items() if not (ok is True or ok == 'near-tie')]
            L.append(f"  fp32 equality: " + ', '.join(f'{k} {v:.2g}' for k, v in e.items() if isinstance(v, float) and k in (eq or e)
                                                  and not k.endswith(('_theirs', '_ours', '_scale')))[:400]
                     + (f"; beyond tolerance: {bad}" if bad else ('; all within tolerance' if eq else '')))
        if 'bf16' in d:
            b = d['bf16']
            lr, sc = b.get('loss_rel_vs_fp32', {}), b.get('image_score_vs_fp32', {})
            L.append(f"  bf16 (changed maths) vs fp32: loss rel " + ', '.join(f'{k} {v:.2g}' for k, v in lr.items()) + f"; {b.get('score', 'scores')} rel "
                     + ', '.join(f"{k} {v['rel']:.2g}" for k, v in sc.items())
                     + (f"; theirs-bf16 vs ours-bf16 loss {b['equivalence'].get('loss', float('nan')):.2g}" if 'equivalence' in b else '')
                     + ''.join(f"; {k} FAILED: {v.splitlines()[0][:160]}" for k, v in b.get('errors', {}).items()))
        for group, what, ref, v, r in timing_rows(d):
            L.append(f"  {group} {what:10s} {ref:>17s} / {v:<16s} {_r(r)}; {r['theirs_median_s']:.4f} / {r['ours_median_s']:.4f} s")
        for k, v in failed_sides(d).items(): L.append(f"  timing: {k} FAILED: {v}")
        for side, mm in d.get('memory', {}).items():
            if 'error' in mm: L.append(f"  memory {side}: ERROR {mm['error'][-200:]}"); continue
            ref = d['memory'].get('theirs+bf16' if is_bf16(side) else 'theirs', {})
            cells = []
            for mode in ('inference', 'train'):
                x, y = mm.get(f'{mode}_{key}'), ref.get(f'{mode}_{key}')
                if x is not None: cells.append(f"{mode} {x:.2f} GB" + (f" ({100 * x / y:.0f} % of theirs)" if y and kind(side) == 'ours' else ''))
            L.append(f"  memory {side}: " + ', '.join(cells))
        for k, v in d.get('errors', {}).items(): L.append(f"  {k}: {v.splitlines()[0][:300]}")
    return L

def report_md(res) -> list:
    "The full markdown of one call: per method the fp32 equality table, the bf16 rows, the timings and the memory."
    key = mem_key(res)
    L = ["# Ours vs the authors' code on one device: VQ-Flow, HGAD, HVQ-Trans, fp32 and bf16", '',
         f"Device: {device_line(res)}. Configuration `{res['size']}` (the authors' unless `smoke`); {res['pairs']} alternating "
         f"rounds after {res['warmup']} warm-up round(s), ratio = theirs / ours per round (> 1: ours faster); each method in its own "
         f"process, then peak memory per side in its own process. Total {res.get('total_s')} s. Command: `benchmarks/gpu_vs_authors.sh` "
         f"(`benchmarks/gpu_vs_authors.py`).", '']
    for m, d in res['methods'].items():
        L += [f"## {NAMES[m]}", '', f"Status: {d.get('status')}; configuration {d.get('size_spec')}; "
              f"{d.get('n_numbers', 0):,} trainable numbers transplanted; parts (s): {d.get('parts')}.", '']
        if 'equivalence' in d:
            e, eq, tol = d['equivalence'], d.get('equal', {}), d.get('tolerance', {})
            b = d.get('bf16', {}).get('equivalence', {})
            L += ['| quantity (max abs difference theirs vs ours) | fp32 | tolerance | within | both under bf16 (changed maths) |', '|---|---|---|---|---|']
            for k, v in e.items():
                if not isinstance(v, (int, float)) or k.endswith(('_theirs', '_ours', '_scale')) or k in ('assignments',): continue
                ok = eq.get(k)
                within = '' if ok is None else 'yes' if ok is True else 'after near-tie flips' if ok == 'near-tie' else '**no**'
                under = f'{b[k]:.3g}' if isinstance(b.get(k), (int, float)) else ''
                L.append(f"| {k} | {v:.3g} | {tol.get(k, '')} | {within} | {under} |")
            L.append('')
        if 'bf16' in d:
            bb = d['bf16']
            L += ['bf16 against fp32, each side from the same state (changed maths: no tolerance):', '',
                  f"| side | loss, relative difference | {bb.get('score', 'image scores')}, max abs (relative to the fp32 max) | finite |", '|---|---|---|---|']
            for k in ('theirs', 'ours'):
                s, lr = bb.get('image_score_vs_fp32', {}).get(k), bb.get('loss_rel_vs_fp32', {}).get(k)
                L.append(f"| {k} | {'failed' if lr is None else f'{lr:.3g}'} | " + ('failed' if s is None else f"{s['max_abs']:.3g} ({s['rel']:.2g})")
                         + f" | {'' if s is None else 'yes' if s['finite'] else '**no**'} |")
            L.append('')
            for k, v in bb.get('errors', {}).items(): L += [f'bf16 `{k}` failed:', '', '```', v[-1500:], '```', '']
        if d.get('timing'):
            L += ['| precision | what | theirs | ours | rounds | theirs / ours, median (min–max) | theirs (s) | ours (s) |', '|---|---|---|---|---|---|---|---|']
            for group, what, ref, v, r in timing_rows(d):
                L.append(f"| {group} | {what} | {ref} | {v} | {r['pairs']} | {_r(r)} | {r['theirs_median_s']:.4f} | {r['ours_median_s']:.4f} |")
            L.append('')
            for group, t in d['timing'].items():
                for what, w in t.items():
                    if what != 'failed': L.append(f"- {group} {what}, median seconds per side: " + ', '.join(
                        f'{k} {statistics.median(v):.4f}' for k, v in w['seconds'].items() if v))
            for k, v in failed_sides(d).items(): L += [f'- `{k}` left out of the timings: it failed its first call ({v})']
            L.append('')
        if d.get('memory'):
            L += [f"Peak memory ({'torch.cuda.max_memory_allocated' if key == 'cuda_peak_gb' else 'VmHWM'}, GB; each side in its own "
                  f"process; % of the authors' side at the same precision):", '',
                  '| side | inference | of theirs | training | of theirs |', '|---|---|---|---|---|']
            for side, mm in d['memory'].items():
                if 'error' in mm: L.append(f"| {side} | error: {mm['error'].strip().splitlines()[-1][:120] if mm['error'].strip() else ''} | | | |"); continue
                ref = d['memory'].get('theirs+bf16' if is_bf16(side) else 'theirs', {})
                cells = []
                for mode in ('inference', 'train'):
                    x, y = mm.get(f'{mode}_{key}'), ref.get(f'{mode}_{key}')
                    cells += [f'{x:.2f}' if x is not None else '', f'{100 * x / y:.0f} %' if x is not None and y and 'error' not in ref else '']
                L.append(f"| {side} | " + ' | '.join(cells) + ' |')
            L.append('')
        for k, v in d.get('errors', {}).items(): L += [f'Part `{k}` failed:', '', '```', v[-1500:], '```', '']
    return L

def docs_table(res) -> list:
    """The table for docs/performance.md ('On a GPU'): per method and measurement, fp32 (ours vs theirs) beside bf16
    (both sides under bf16 autocast), then peak memory; the device named in the heading line."""
    key = mem_key(res)
    cfg = "the authors' configurations" if res['size'] == 'authors' else f"configuration `{res['size']}`"
    L = [f"Device: **{device_line(res)}**; {cfg}; {res['pairs']} alternating rounds after "
         f"{res['warmup']} warm-up; theirs / ours per round, median (min–max); > 1 means ours is faster "
         f"(`benchmarks/gpu_vs_authors.sh`, `results/benchmarks/vs_authors_gpu.md`).", '',
         '| method | what | theirs / ours | fp32 | fp32 s (theirs / ours) | bf16, both sides | bf16 s (theirs / ours) |',
         '|---|---|---|---|---|---|---|']
    for m, d in res['methods'].items():
        rows = {(g, w, ref, v): r for g, w, ref, v, r in timing_rows(d)}
        if not rows: L.append(f"| {NAMES[m]} | {d.get('status', '')} | | | | | |"); continue
        failed = failed_sides(d)
        for (g, w, ref, v), r in rows.items():
            if g != 'fp32': continue
            r16 = rows.get(('bf16', w, ref + BF16, v + BF16))
            why = next((f'{k} failed' for k in (ref + BF16, v + BF16) if k in failed), '—')
            L.append(f"| {NAMES[m]} | {w.replace('_', ' ')} | {ref} / {v} | {_r(r)} | {r['theirs_median_s']:.4f} / {r['ours_median_s']:.4f} | "
                     + (f"{_r(r16)} | {r16['theirs_median_s']:.4f} / {r16['ours_median_s']:.4f} |" if r16 else f'{why} | — |'))
    used = lambda d: {x for _, _, ref, v, _ in timing_rows(d) for x in (ref, v)}
    sides = [f"{NAMES[m]} `{k}`: {v}" for m, d in res['methods'].items() for k, v in d.get('notes', {}).items() if k in used(d)] + \
            [f"{NAMES[m]} `{k}`: CHANGED MATHS, {v}" for m, d in res['methods'].items() for k, v in d.get('changed_maths', {}).items() if k in used(d)] + \
            ["`+bf16`: the side under the trainer's bf16 autocast (changed maths)"]
    L += ['', 'Sides: ' + '; '.join(sides) + '.',
          '', f"Peak memory ({'torch.cuda.max_memory_allocated' if key == 'cuda_peak_gb' else 'VmHWM'}, GB, each side in its "
          "own process; ours as % of theirs at the same precision):", '',
          '| method | side | inference | training | bf16: inference | bf16: training |', '|---|---|---|---|---|---|']
    for m, d in res['methods'].items():
        mem = d.get('memory', {})
        def cell(side, mode):
            mm, ref = mem.get(side), mem.get('theirs+bf16' if is_bf16(side) else 'theirs', {})
            if not mm: return '—'
            if 'error' in mm: return 'error'
            x, y = mm.get(f'{mode}_{key}'), (ref or {}).get(f'{mode}_{key}')
            if x is None: return '—'
            return f'{x:.2f}' + (f' ({100 * x / y:.0f} %)' if y and kind(side) == 'ours' else '')
        for side in dict.fromkeys(base(s) for s in mem):
            L.append(f"| {NAMES[m]} | {side} | {cell(side, 'inference')} | {cell(side, 'train')} | "
                     f"{cell(side + BF16, 'inference')} | {cell(side + BF16, 'train')} |")
    L += ['', 'Same numbers first (fp32, max |theirs − ours|) and what bf16 changes (relative difference to fp32 from the same state):', '',
          '| method | fp32 rows within tolerance | loss, bf16 vs fp32 (theirs / ours) | image scores, bf16 vs fp32 (theirs / ours) |', '|---|---|---|---|']
    for m, d in res['methods'].items():
        eq, b = d.get('equal'), d.get('bf16')
        within = ('—' if 'equivalence' not in d else 'no tolerance table (rows in vs_authors_gpu.md)' if not eq else
                  'yes' if all(v is True for v in eq.values()) else 'yes, after near-tie code flips' if all(v is True or v == 'near-tie' for v in eq.values())
                  else 'NO: ' + ', '.join(k for k, v in eq.items() if not (v is True or v == 'near-tie')))
        def g(dct, k, f=lambda x: x):
            return f'{f(dct[k]):.2g}' if k in dct else 'failed'
        if b: L.append(f"| {NAMES[m]} | {within} | {g(b.get('loss_rel_vs_fp32', {}), 'theirs')} / {g(b.get('loss_rel_vs_fp32', {}), 'ours')} | "
                       f"{g(b['image_score_vs_fp32'], 'theirs', lambda x: x['rel'])} / {g(b['image_score_vs_fp32'], 'ours', lambda x: x['rel'])}"
                       f"{' (' + b['score'] + ')' if b.get('score', 'image scores') != 'image scores' else ''} |")
        else: L.append(f"| {NAMES[m]} | {within} | — | — |")
    return L

# ---------------------------------------------------------------------------------------------------------------
def parser():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--methods', default=','.join(METHODS))
    for m in METHODS: ap.add_argument(f'--authors-{m}', default=None, help=f"checkout of the authors' {m} code")
    ap.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    ap.add_argument('--size', default=None, choices=['authors', 'small', 'smoke'], help='default: authors (smoke with --smoke)')
    ap.add_argument('--smoke', action='store_true', help='test this script: tiny sizes, fewer sides, CPU, 1 round, 1 thread')
    ap.add_argument('--pairs', type=int, default=None, help='alternating rounds per measurement (default 3; smoke 1)')
    ap.add_argument('--warmup', type=int, default=None, help='warm-up rounds (default 1; smoke 0)')
    ap.add_argument('--budget', type=float, default=300., help='seconds for the whole call (methods, then memory)')
    ap.add_argument('--caps', default='', help=f'per-part caps in seconds, e.g. hgad=120,memory=60 (default {CAPS})')
    ap.add_argument('--threads', type=int, default=None, help='torch threads per process (default: 1 on a CPU; torch\'s own on CUDA)')
    ap.add_argument('--mem-parallel', type=int, default=None, help='memory processes at a time (default 4 on CUDA, 2 on a CPU)')
    ap.add_argument('--mem-steps', type=int, default=2)
    ap.add_argument('--no-memory', action='store_true')
    ap.add_argument('--out', default=os.environ.get('OUT') or str(ROOT / 'results' / '_scratch' / 'gpu_vs_authors'))
    ap.add_argument('--verbose', action='store_true', help='stream each method process\'s output')
    ap.add_argument('--table', default=None, metavar='JSON', help='print the docs/performance.md table of a vs_authors_gpu.json and exit')
    # internal: one method's parts / one memory side
    ap.add_argument('--one', default=None, help=argparse.SUPPRESS); ap.add_argument('--json', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--authors', default=None, help=argparse.SUPPRESS); ap.add_argument('--cap', type=float, default=1e9, help=argparse.SUPPRESS)
    ap.add_argument('--mem-child', default=None, help=argparse.SUPPRESS); ap.add_argument('--side', default=None, help=argparse.SUPPRESS)
    return ap

def main():
    args = parser().parse_args()
    if args.table: return print('\n'.join(docs_table(json.loads(Path(args.table).read_text()))))
    stub_missing()
    import torch
    if args.device is None: args.device = 'cpu' if args.smoke or not torch.cuda.is_available() else 'cuda'
    if args.size is None: args.size = 'smoke' if args.smoke else 'authors'
    if args.pairs is None: args.pairs = 1 if args.smoke else 3
    if args.warmup is None: args.warmup = 0 if args.smoke else 1
    if args.threads is None and args.device == 'cpu': args.threads = 1
    if args.mem_parallel is None: args.mem_parallel = 4 if args.device.startswith('cuda') else 3
    if args.mem_child: return mem_child(args)
    if args.one: return run_one(args)
    drive(args)

if __name__ == '__main__': main()
