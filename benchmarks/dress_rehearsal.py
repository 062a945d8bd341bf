#!/usr/bin/env python
"""Dress rehearsal: each method at its authors' configuration, through its replication notebook, on MVTec-sized data.

For every method (VQ-Flow, HGAD, HVQ-Trans; PatchCore on request) the replication notebook `nbs/replicate/mvtec_ad.ipynb`
is executed by the runner's own `vqflow_nb.execute.execute_notebook` (papermill), with profile 'authors', the method's
authors' backbone preset and image size (`METHODS[m].authors`), on the MVTec-sized synthetic preset
(`make_synthetic(root, preset='mvtec_sized')`: MVTec AD's classes, counts, image sides and greyscale classes), for a
few epochs with a validation after every epoch. Measured, per method:

* seconds per training epoch (`history.csv`, the median over the epochs after the first when there are two or more;
  else the first epoch's, from `estimate.json`);
* seconds per validation: each epoch's wall time (from the run's `progress.json`, polled) minus its training time, so
  it includes the checkpoint the trainer writes after every epoch; the first epoch's (`estimate.json`) when the run
  was cut short;
* set-up seconds: from the call to the first epoch (kernel start, imports, data scan, model build, and, for the
  methods that train on cached features, the feature extraction, timed from the moment its cache folder appears);
* peak memory: the kernel's host peak (VmHWM of /proc/self/status, read in the kernel when it exits; else the
  polled resident size of the kernel's process tree) and, on CUDA, `torch.cuda.max_memory_allocated`;
* the projected hours of the authors' full schedule (`projected_hours`): set-up + epochs x s/epoch + validations x
  s/validation, each scaled from the images this run had to the full MVTec AD counts (training steps for an epoch,
  test images for a validation, all images for the feature extraction), with the method's own epochs and validation
  interval.

`--authors DIR` (a folder with the authors' checkouts) times the authors' own training step on the same device through
`benchmarks/vs_authors.py:authors_step_seconds(method, authors_dir, device, steps)`; their projected training hours are
epochs x steps per epoch x s/step (their validations are not timed), and the ratio is theirs / ours over training
(ours: set-up + epochs x s/epoch). Where the function is absent, a line says so.

The authors' presets name timm backbones whose pretrained weights cannot be downloaded on an offline machine:
`--weights random` (the default) builds the same network with random weights. Speed and memory are those of the
authors' configuration; the metrics of such a run are not a result, and the output says so.

Writes <out>.json and <out>.md (default results/benchmarks/dress_rehearsal). `--smoke` runs three classes at tiny
sizes on the CPU (one epoch, small images, the small models on the packaged offline backbone) to test this script (tests/test_dress_rehearsal.py).
`--engine direct` runs `run_experiment` (the notebook's body) in a subprocess instead of papermill, for a machine
without the Jupyter stack; the output names the engine that ran.
"""
from __future__ import annotations
import argparse, json, math, os, platform, shutil, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path: sys.path.insert(0, p)

NOTEBOOK = ROOT/'nbs'/'replicate'/'mvtec_ad.ipynb'
METHODS_DEFAULT = ('vqflow', 'hgad', 'hvqtrans')
SMOKE_CLASSES = ['bottle', 'grid', 'toothbrush']   # an object, a greyscale texture, the smallest class

# ---------------------------------------------------------------------------------------------------------------
# the arithmetic (tested in tests/test_dress_rehearsal.py)
def n_validations(epochs:int, eval_every:int, eval_first:bool=False) -> int:
    """Validations in a schedule, by the trainer's own rule (`Schedule.evaluates`): the authors' validation epochs
    (every `eval_every`-th, counted from the first epoch when `eval_first`, as HVQ-Trans) and always the last."""
    from vqflow_nb.method import Schedule
    s = Schedule(epochs=epochs, eval_every=eval_every, eval_first=eval_first)
    return sum(s.evaluates(e) for e in range(epochs))

def steps_per_epoch(n:int, batch_size:int, drop_last:bool) -> int:
    "Optimiser steps in one pass over `n` images."
    return n // batch_size if drop_last else math.ceil(n / batch_size)

def projected_hours(epochs:int, eval_every:int, s_epoch:float, s_val:float, setup_s:float=0.0, eval_first:bool=False) -> float:
    "Hours of a whole schedule: set-up once, `epochs` training epochs, and its validations."
    return (setup_s + epochs * s_epoch + n_validations(epochs, eval_every, eval_first) * s_val) / 3600

def scale_to_full(run:dict, full:dict, batch_size:int, drop_last:bool) -> dict:
    """Per-epoch, per-validation and set-up seconds of the full data set from a run on fewer images: training in
    proportion to optimiser steps, validation to test images, feature extraction to all images; the rest of the
    set-up (kernel start, imports, model build) is the same whatever the data."""
    st_run, st_full = steps_per_epoch(run['n_train'], batch_size, drop_last), steps_per_epoch(full['n_train'], batch_size, drop_last)
    if st_run < 1: raise ValueError(f"{run['n_train']} training images make no step at batch size {batch_size}")
    out = dict(s_epoch=run['s_epoch'] * st_full / st_run, s_step=run['s_epoch'] / st_run, steps_full=st_full,
               s_val=None if run.get('s_val') is None else run['s_val'] * full['n_test'] / run['n_test'])
    if run.get('setup_s') is None: out['setup_s'] = None
    else:
        ext = run.get('extract_s') or 0.0
        out['setup_s'] = run['setup_s'] - ext + ext * (full['n_train'] + full['n_test']) / (run['n_train'] + run['n_test'])
    return out

def authors_schedule(method:str) -> dict:
    "The method's own schedule (what profile 'authors' runs): epochs, validation interval, batch size, drop_last."
    if method == 'vqflow':
        from vqflow_nb.vqflow import VQFlowConfig; c = VQFlowConfig()
        return dict(epochs=c.epochs, eval_every=c.eval_every, batch_size=c.batch_size, drop_last=True)
    if method == 'hgad':
        from vqflow_nb.hgad import HGADConfig; c = HGADConfig()
        return dict(epochs=c.meta_epochs * c.sub_epochs, eval_every=c.eval_every, batch_size=c.batch_size, drop_last=True)
    if method == 'hvqtrans':
        from vqflow_nb.hvqtrans import HVQTransConfig; c = HVQTransConfig()
        return dict(epochs=c.epochs, eval_every=c.eval_every, eval_first=True, batch_size=c.batch_size, drop_last=False)
    if method == 'patchcore':
        from vqflow_nb.patchcore import PatchCoreConfig; c = PatchCoreConfig()
        return dict(epochs=1, eval_every=1, batch_size=c.batch_size, drop_last=False)
    raise ValueError(f'no schedule known for method {method!r}')

# ---------------------------------------------------------------------------------------------------------------
# peak memory, read inside the kernel (or the direct child) when it finishes a cell and when it exits
MEMORY_HOOK = r'''
import atexit as _atexit, json as _json, os as _os, sys as _sys
def _vqflow_rehearsal_memory(*_):
    out = {}
    try:
        for l in open('/proc/self/status'):
            if l.startswith('VmHWM:'): out['host_peak_gb'] = int(l.split()[1]) / 1024 ** 2
    except (OSError, ValueError): pass
    t = _sys.modules.get('torch')
    try:
        if t is not None and t.cuda.is_available() and t.cuda.is_initialized():
            out['cuda_peak_gb'] = t.cuda.max_memory_allocated() / 1024 ** 3; out['gpu'] = t.cuda.get_device_name()
    except Exception: pass
    p = _os.environ.get('VQFLOW_REHEARSAL_MEMORY')
    if p:
        with open(p + '.tmp', 'w') as f: _json.dump(out, f)
        _os.replace(p + '.tmp', p)
_atexit.register(_vqflow_rehearsal_memory)
try: get_ipython().events.register('post_run_cell', _vqflow_rehearsal_memory)
except NameError: pass
'''

def _tree_rss_gb(pid:int) -> float:
    import psutil
    try:
        p = psutil.Process(pid); procs = [p] + p.children(recursive=True)
    except psutil.Error: return 0.0
    tot = 0
    for q in procs:
        try: tot += q.memory_info().rss
        except psutil.Error: pass
    return tot / 1024 ** 3

class Watcher(threading.Thread):
    """Polls a run folder's progress.json (the time each epoch count first appears), the feature cache folder (the time
    the extraction starts: its lock file appears) and the RSS of this process's children."""
    def __init__(self, run_dir:Path, cache_dir:Path|None=None, every:float=0.05):
        super().__init__(daemon=True)
        self.run_dir, self.cache_dir, self.every, self.stop, self.seen, self.rss_peak = run_dir, cache_dir, every, threading.Event(), {}, 0.0
        self.extract_start = None
    def run(self):
        import psutil
        me, k = psutil.Process(), 0
        while not self.stop.is_set():
            try: e = json.loads((self.run_dir/'progress.json').read_text())['epoch']; self.seen.setdefault(int(e), time.time())
            except (OSError, ValueError, KeyError, TypeError): pass
            if self.extract_start is None and self.cache_dir is not None and self.cache_dir.is_dir() and any(self.cache_dir.iterdir()):
                self.extract_start = time.time()
            if k % 10 == 0:   # the resident size of the children, every half second
                try: self.rss_peak = max(self.rss_peak, sum(_tree_rss_gb(c.pid) for c in me.children()))
                except psutil.Error: pass
            k += 1; self.stop.wait(self.every)

# ---------------------------------------------------------------------------------------------------------------
def run_params(method:str, args, data_root:Path, run_dir:Path, cache_dir:Path) -> dict:
    "The notebook's parameters: profile 'authors' at the authors' backbone preset and image size, a few epochs."
    from vqflow_nb.method import method_spec
    import vqflow_nb.config   # registers the methods
    spec = method_spec(method); a = spec.authors
    authors = args.preset == 'authors'   # 'offline': the packaged EfficientNet-Lite0 preset (the smoke test)
    p = dict(dataset='mvtec_sized', data_root=str(data_root), method=method, profile='authors',
             backbone=a['backbone'] if authors else spec.offline, image_size=args.image_size.get(method, a['image_size'] if authors else None),
             epochs=args.epochs, eval_every=1, seed=0, out_dir=str(run_dir), cache_dir=str(cache_dir), model_size=args.model_size)
    if args.weights and authors: p['weights'] = args.weights
    if args.batch_size: p['batch_size'] = args.batch_size
    if args.device: p['device'] = args.device
    if args.classes: p['classes'] = list(args.classes)
    return p

def execute(engine:str, params:dict, run_dir:Path, cap:float|None, threads:int|None, mem_file:Path) -> tuple:
    "Run one method's notebook (papermill) or its body (direct); return (status, error, message)."
    env_keep = {k: os.environ.get(k) for k in ('IPYTHONDIR', 'VQFLOW_REHEARSAL_MEMORY', 'IN_TEST')}
    ipy = Path(tempfile.mkdtemp(prefix='rehearsal_ipython_'))
    (ipy/'profile_default'/'startup').mkdir(parents=True)
    (ipy/'profile_default'/'startup'/'00-rehearsal-memory.py').write_text(MEMORY_HOOK)
    os.environ.update(IPYTHONDIR=str(ipy), VQFLOW_REHEARSAL_MEMORY=str(mem_file))
    os.environ.pop('IN_TEST', None)   # the notebook's own smoke sizes must not replace ours
    try:
        if engine == 'papermill':
            from vqflow_nb.execute import execute_notebook, kernel_env
            with kernel_env(threads): return execute_notebook(NOTEBOOK, run_dir, params, timeout=cap)
        cmd = [sys.executable, str(Path(__file__).resolve()), '--child', json.dumps(params)]
        env = dict(os.environ, **({'VQFLOW_THREADS': str(threads)} if threads else {}))
        try: p = subprocess.run(cmd, cwd=ROOT, env=env, timeout=cap, capture_output=True, text=True)
        except subprocess.TimeoutExpired: return 'failed', 'Timeout', f'stopped after {cap:.0f} s'
        (run_dir/'direct.log').write_text((p.stdout or '') + (p.stderr or ''))
        if p.returncode: return 'failed', 'ChildFailed', ((p.stderr or '').strip().splitlines() or [''])[-1][:500]
        return 'ok', '', ''
    finally:
        shutil.rmtree(ipy, ignore_errors=True)
        for k, v in env_keep.items():
            if v is None: os.environ.pop(k, None)
            else: os.environ[k] = v

def child(params_json:str):
    "The direct engine's process: the memory hook, then `run_experiment` (the replication notebook's body)."
    exec(MEMORY_HOOK, {})
    from vqflow_nb.run import run_experiment
    run_experiment(**json.loads(params_json), progress=False)

def _median(xs): return statistics.median(xs) if xs else None

def measure(run_dir:Path, seen:dict, t_call:float, extract_start:float|None=None) -> dict:
    "Seconds per epoch, per validation and of the set-up, from the run's records and the polled epoch times."
    import pandas as pd
    est = json.loads((run_dir/'estimate.json').read_text()) if (run_dir/'estimate.json').exists() else None
    hist = pd.read_csv(run_dir/'history.csv')['seconds'].tolist() if (run_dir/'history.csv').exists() else []
    # an epoch's wall time (training, validation, checkpoint) less its training time, for every epoch seen to start and end
    vals = [seen[e + 1] - seen[e] - hist[e] for e in range(len(hist)) if e in seen and e + 1 in seen]
    later = lambda xs: xs[1:] if len(xs) >= 2 else xs   # past the first epoch's warm-up when there is more than one
    s_epoch = _median(later(hist)) if hist else (est or {}).get('train_seconds_per_epoch')
    s_val = _median(later(vals)) if vals else (est or {}).get('eval_seconds')
    ext = (seen[0] - extract_start) if 0 in seen and extract_start is not None and extract_start < seen[0] else None
    return dict(s_epoch=s_epoch, s_val=s_val, setup_s=(seen[0] - t_call) if 0 in seen else None, extract_s=ext,
                epochs_done=max(seen) if seen else 0, train_seconds=hist, validation_seconds=vals, estimate=est)

def data_counts(root:Path, classes=None) -> dict:
    from vqflow_nb.data import scan_dataset
    return dict(n_train=len(scan_dataset(root, 'train', classes)), n_test=len(scan_dataset(root, 'test', classes)))

from _vs_common import CHECKOUTS   # each authors' checkout and the file that recognises it

def authors_checkout(method:str, authors_dir:str) -> Path|None:
    "The method's authors' checkout: `authors_dir` itself or one of its sub-folders, found by its marker file."
    if method not in CHECKOUTS: return None
    mark, d = CHECKOUTS[method][1], Path(authors_dir)
    others = [m for k, (_, m) in CHECKOUTS.items() if k != method]
    ok = lambda p: (p/mark).exists() and not any((p/o).exists() for o in others)
    if ok(d): return d
    subs = sorted(p for p in d.iterdir() if p.is_dir() and ok(p)) if d.is_dir() else []
    return subs[0] if subs else None

def authors_side(method:str, authors_dir:str|None, device:str, steps:int=3, isolate:bool=True) -> dict:
    """The authors' own training step timed on this device by `vs_authors.authors_step_seconds`, or why not. `isolate`:
    in a process of its own (the authors' checkouts share top-level module names such as `utils`, and their CUDA
    memory must not count against the next run)."""
    if not authors_dir: return dict(available=False, why='no --authors given')
    if isolate:
        cmd = [sys.executable, str(Path(__file__).resolve()), '--authors-child', json.dumps([method, authors_dir, device, steps])]
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        try: return json.loads(p.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):
            return dict(available=False, why=f'authors_step_seconds process failed: {((p.stderr or "").strip().splitlines() or [""])[-1][:300]}')
    try:
        import vs_authors
        fn = vs_authors.authors_step_seconds
    except (ImportError, AttributeError) as e:
        return dict(available=False, why=f'benchmarks/vs_authors.py has no authors_step_seconds ({type(e).__name__}): not available')
    d = authors_checkout(method, authors_dir)
    if d is None:
        repo = CHECKOUTS[method][0] if method in CHECKOUTS else "the authors' code"
        return dict(available=False, why=f'no checkout of {repo} in or under {authors_dir}')
    try: return dict(available=True, checkout=str(d), **fn(method, str(d), device, steps=steps))
    except (Exception, SystemExit) as e:   # vs_authors stops with SystemExit on a wrong checkout
        return dict(available=False, why=f'authors_step_seconds failed: {type(e).__name__}: {str(e)[:300]}')

def rehearse(method:str, args, data_root:Path, work:Path, engine:str) -> dict:
    "Run one method and return its row: measured seconds, memory, the full-schedule projection, the authors' side."
    from vqflow_nb.synthetic import mvtec_sized_plan
    run_dir, mem_file = work/method, work/f'{method}.memory.json'
    shutil.rmtree(run_dir, ignore_errors=True); mem_file.unlink(missing_ok=True); run_dir.mkdir(parents=True)
    cache = work/'cache'/method
    params = run_params(method, args, data_root, run_dir, cache)
    shutil.rmtree(cache, ignore_errors=True)   # never time a feature cache of an earlier rehearsal
    sch = authors_schedule(method)
    bs = args.batch_size or sch['batch_size']
    print(f'[{method}] {engine}: {params["backbone"]} at {params["image_size"]} px, weights {params.get("weights", "preset")}, '
          f'batch {bs}, {args.epochs} epoch(s), cap {args.cap:.0f} s', flush=True)
    w = Watcher(run_dir, cache); t_call = time.time(); w.start()
    status, err, msg = execute(engine, params, run_dir, args.cap, args.threads, mem_file)
    if err in ('CellTimeoutError', 'TimeoutError', 'Timeout'): msg = f'stopped at the cap of {args.cap:.0f} s'
    wall = time.time() - t_call; w.stop.set(); w.join()
    m = measure(run_dir, w.seen, t_call, w.extract_start)
    mem = json.loads(mem_file.read_text()) if mem_file.exists() else {}
    counts = data_counts(data_root, args.classes)
    full_plan = mvtec_sized_plan(1.0, 1.0, args.classes)
    full = dict(n_train=sum(p['train'] for p in full_plan.values()),
                n_test=sum(p['good'] + sum(p['kinds'].values()) for p in full_plan.values()))
    row = dict(method=method, engine=engine, status=status, error=err, message=msg, wall_s=wall, backbone=params['backbone'],
               image_size=params['image_size'], weights=params.get('weights', 'preset'), batch_size=bs, epochs_run=args.epochs,
               schedule=sch, counts=counts, full_counts=full, host_peak_gb=mem.get('host_peak_gb') or (w.rss_peak or None),
               host_peak_source='VmHWM' if mem.get('host_peak_gb') else 'polled RSS', cuda_peak_gb=mem.get('cuda_peak_gb'),
               device=mem.get('gpu') or f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)", **m)
    if row['s_epoch'] is not None and row['s_epoch'] > 0:
        f = scale_to_full(dict(counts, s_epoch=row['s_epoch'], s_val=row['s_val'], setup_s=row['setup_s'], extract_s=row['extract_s']),
                          full, bs, sch['drop_last'])
        row['full'] = f
        row['projected_hours'] = projected_hours(sch['epochs'], sch['eval_every'], f['s_epoch'], f['s_val'] or 0.0, f['setup_s'] or 0.0,
                                                 sch.get('eval_first', False))
        row['projected_train_hours'] = ((f['setup_s'] or 0.0) + sch['epochs'] * f['s_epoch']) / 3600
        row['n_validations'] = n_validations(sch['epochs'], sch['eval_every'], sch.get('eval_first', False))
    # what a validation of the whole test set holds in host memory (not seen at a reduced scale): every test map
    # (float32) and mask (bool) at the run's mask size (the method's authors': HGAD's 256, else the input size)
    from vqflow_nb.method import method_spec
    side = params.get('mask_size') or method_spec(method).data['mask_size'] or params['image_size']
    row['metric_store_gb_full'] = full['n_test'] * side ** 2 * 5 / 1024 ** 3 if side else None
    import torch
    a = authors_side(method, args.authors, args.device or ('cuda' if torch.cuda.is_available() else 'cpu'), args.authors_steps)
    if a.get('available') and row.get('full'):
        steps = steps_per_epoch(full['n_train'], a['batch_size'], sch['drop_last'])
        a['projected_train_hours'] = sch['epochs'] * steps * a['seconds_per_step'] / 3600
        a['ratio_train'] = a['projected_train_hours'] / row['projected_train_hours']
    row['authors'] = a
    if not a.get('available'): print(f'[{method}] authors\' loop: {a["why"]}', flush=True)
    print(f'[{method}] {status}{" " + err + ": " + msg if err else ""}; ' + ', '.join(
        f'{k}={row[k]:.3g}' for k in ('s_epoch', 's_val', 'setup_s', 'host_peak_gb', 'cuda_peak_gb', 'projected_hours')
        if isinstance(row.get(k), (int, float))), flush=True)
    return row

# ---------------------------------------------------------------------------------------------------------------
def _f(x, nd=3): return '–' if x is None else f'{x:.{nd}g}'

def table(rows:list) -> str:
    "The markdown table of a rehearsal."
    head = ('| method | device | backbone @ px (weights) | status | s/epoch (run) | s/validation (run) | set-up s, of it extraction (run) | '
            's/epoch full set | s/validation full set | peak host GB | peak CUDA GB | metric store full set GB | schedule | projected h ours | '
            'authors\' h (training) | ratio theirs/ours (training) |')
    lines = [head, '|' + '---|' * head.count(' | ') + '---|']
    for r in rows:
        f, a, s = r.get('full') or {}, r['authors'], r['schedule']
        lines.append(f"| {r['method']} | {r['device']} | {r['backbone']} @ {r['image_size']} ({r['weights']}) | {r['status']} | "
                     f"{_f(r['s_epoch'])} | {_f(r['s_val'])} | {_f(r['setup_s'])}{', ' + _f(r['extract_s']) if r.get('extract_s') else ''} | {_f(f.get('s_epoch'))} | {_f(f.get('s_val'))} | "
                     f"{_f(r['host_peak_gb'])} | {_f(r['cuda_peak_gb'])} | {_f(r.get('metric_store_gb_full'))} | "
                     f"{s['epochs']} ep, {r.get('n_validations', '–')} val | "
                     f"{_f(r.get('projected_hours'))} | {_f(a.get('projected_train_hours'))} | {_f(a.get('ratio_train'))} |")
    return '\n'.join(lines)

def write(res:dict, out:Path):
    "Write <out>.json and <out>.md, every machine path made portable (`execute.portable`: results are committed)."
    from vqflow_nb.execute import portable
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix('.json').write_text(portable(json.dumps(res, indent=1, default=str)) + '\n')
    notes = [f"# Dress rehearsal{' (smoke: tiny sizes, not a measurement)' if res['smoke'] else ''}", '',
             f"`{res['command']}`; data: MVTec-sized synthetic preset, scale {res['scale']} (counts), size_scale {res['size_scale']} "
             f"(sides), {res['n_train']} training / {res['n_test']} test images in {len(res['classes'])} classes; "
             f"{res['epochs']} epoch(s) per method, a validation after each; engine {res['engine']}.", '',
             table(res['rows']), '',
             "*Full set*: the run's seconds scaled to MVTec AD's counts (training by optimiser steps, validation by test images, "
             "feature extraction by all images, the rest of the set-up as it was). *Projected h ours*: set-up + epochs x s/epoch + validations x s/validation of the method's "
             "own schedule. *Peak* memory is this run's, at its scale; *metric store full set*: the test maps (float32) and masks (bool) "
             "at the input size that one validation of the whole test set holds. *Authors' h*: their training step (benchmarks/vs_authors.py `authors_step_seconds`, same device) "
             "x steps x epochs, validations not timed; the ratio compares training only (ours: set-up + epochs x s/epoch)."]
    if any(r['weights'] == 'random' for r in res['rows']):
        notes += ['', "Weights 'random': timm's pretrained weights cannot be downloaded here, so the authors' backbones ran with "
                      "random weights — the same network, the same speed and memory; the metrics of these runs are not results."]
    notes += [''] + [f"- {r['method']}: authors' loop {r['authors']['why']}" for r in res['rows'] if not r['authors'].get('available')]
    notes += [f"- {r['method']}: {r['status']} ({r['error']}: {r['message']})" for r in res['rows'] if r['status'] != 'ok']
    out.with_suffix('.md').write_text(portable('\n'.join(notes).rstrip()) + '\n')

def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--methods', default=','.join(METHODS_DEFAULT), help='comma-separated (vqflow,hgad,hvqtrans,patchcore)')
    ap.add_argument('--data', default=None, help='the MVTec-sized preset folder (built if missing); default data/mvtec_sized[_s<scale>_z<size_scale>]')
    ap.add_argument('--scale', type=float, default=1.0, help="the preset's counts x this (make_synthetic scale=)")
    ap.add_argument('--size-scale', type=float, default=1.0, help="the preset's image sides x this (make_synthetic size_scale=)")
    ap.add_argument('--classes', default=None, help='comma-separated subset of the 15 classes (default all)')
    ap.add_argument('--epochs', type=int, default=2)
    ap.add_argument('--cap', type=float, default=600, help='seconds per method (the run cell\'s time limit)')
    ap.add_argument('--device', default=None, help='cuda / cpu (default: cuda if available)')
    ap.add_argument('--preset', choices=('authors', 'offline'), default='authors',
                    help="backbone preset: the authors' (default) or the packaged offline one (smoke)")
    ap.add_argument('--model-size', choices=('auto', 'small', 'full'), default='auto', help="RunConfig.model_size ('auto': full for the authors' presets)")
    ap.add_argument('--weights', default='random', help="'random' (default: no downloads), 'timm', or a checkpoint path")
    ap.add_argument('--batch-size', type=int, default=None, help="default: each method's own")
    ap.add_argument('--image-size', default=None, help='method=px,... (default: each method\'s authors\' size)')
    ap.add_argument('--threads', type=int, default=None, help='torch threads in the kernel (VQFLOW_THREADS)')
    ap.add_argument('--engine', choices=('papermill', 'direct'), default='papermill')
    ap.add_argument('--authors', default=None, help="a folder with the authors' checkouts (times their training step A/B)")
    ap.add_argument('--authors-steps', type=int, default=3)
    ap.add_argument('--work', default=None, help='run folders and feature caches (default results/_scratch/dress_rehearsal)')
    ap.add_argument('--workers', type=int, default=None, help='processes drawing the preset (default: every core)')
    ap.add_argument('--out', default=str(ROOT/'results'/'benchmarks'/'dress_rehearsal'), help='writes <out>.json and <out>.md')
    ap.add_argument('--smoke', action='store_true', help='three classes at tiny sizes on the CPU, one epoch: tests this script')
    ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
    ap.add_argument('--authors-child', default=None, help=argparse.SUPPRESS)
    return ap

def main(argv=None):
    args = parser().parse_args(argv)
    if args.child: return child(args.child)
    if args.authors_child:
        m, d, dev, n = json.loads(args.authors_child)
        return print(json.dumps(authors_side(m, d, dev, n, isolate=False), default=str))
    args.classes = args.classes.split(',') if isinstance(args.classes, str) else args.classes
    sizes = dict(kv.split('=') for kv in args.image_size.split(',')) if args.image_size else {}
    args.image_size = {k: int(v) for k, v in sizes.items()}
    if args.smoke:   # tiny: 3 classes, 26 training and 13 test images of 54-61 px, one epoch, batch 4, CPU, the small
        # models on the packaged offline backbone (the authors' presets at full model size take minutes per epoch here)
        args.scale, args.size_scale, args.epochs, args.batch_size = 0.05, 0.06, 1, 4
        args.classes, args.device, args.workers = args.classes or SMOKE_CLASSES, 'cpu', 1
        args.preset, args.model_size = 'offline', 'small'
        args.image_size = dict(dict(vqflow=64, hgad=64, hvqtrans=64, patchcore=64), **args.image_size)
    from vqflow_nb.synthetic import make_synthetic, MVTEC_SIZED
    from vqflow_nb.core import project_root
    tag = '' if (args.scale, args.size_scale) == (1.0, 1.0) else f'_s{args.scale:g}_z{args.size_scale:g}'
    work = Path(args.work) if args.work else project_root()/'results'/'_scratch'/'dress_rehearsal'
    data = Path(args.data) if args.data else (work/'data' if args.smoke else project_root()/'data'/f'mvtec_sized{tag}')
    t0 = time.time()
    root = make_synthetic(data, preset='mvtec_sized', classes=args.classes, scale=args.scale, size_scale=args.size_scale,
                          workers=args.workers, progress=True)
    gen_s = time.time() - t0
    counts = data_counts(root, args.classes)
    print(f'data: {root} ({counts["n_train"]} train / {counts["n_test"]} test images; {gen_s:.1f} s to build or reuse)', flush=True)
    engine = args.engine
    if engine == 'papermill':
        try: import papermill, ipykernel   # noqa: F401
        except ImportError as e:
            engine = 'direct'; print(f'papermill or ipykernel missing ({e}): running run_experiment directly instead', flush=True)
    res = dict(command='python benchmarks/dress_rehearsal.py ' + ' '.join(sys.argv[1:] if argv is None else argv),
               smoke=args.smoke, scale=args.scale, size_scale=args.size_scale, classes=args.classes or list(MVTEC_SIZED),
               epochs=args.epochs, engine=engine, data_seconds=gen_s, **counts, platform=platform.platform(),
               python=platform.python_version(), time=time.strftime('%Y-%m-%dT%H:%M:%S%z'), rows=[])
    for m in args.methods.split(','):   # written after every method: a run stopped from outside keeps what it measured
        res['rows'].append(rehearse(m, args, root, work, engine)); write(res, Path(args.out))
    rows = res['rows']
    print(table(rows))
    print(f'wrote {Path(args.out).with_suffix(".md")} and .json')
    return res

if __name__ == '__main__': main()
