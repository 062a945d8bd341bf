"Small helpers shared by `vs_authors.py` and its per-method sides (authors_hgad.py, authors_hvqtrans.py)."
from __future__ import annotations
import statistics, time

# each authors' checkout, recognised by a file only it has (what vs_authors.py imports from it)
CHECKOUTS = dict(vqflow=('cool-xuan/vqflow', 'post_process.py'), hgad=('xcyao00/HGAD', 'models/nf_model.py'),
                 hvqtrans=('RuiyingLu/HVQ-Trans', 'models/HVQ_TR_switch.py'))

def sync(device):
    import torch
    if getattr(device, 'type', str(device)).startswith('cuda'): torch.cuda.synchronize(device)

def timed(fn, device):
    sync(device); t = time.perf_counter(); fn(); sync(device); return time.perf_counter() - t

def maxdiff(a, b) -> float:
    "max |a - b| in float64 (tensors or arrays)."
    import torch, numpy as np
    a = a.detach().double().cpu().numpy() if torch.is_tensor(a) else np.asarray(a, dtype=np.float64)
    b = b.detach().double().cpu().numpy() if torch.is_tensor(b) else np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max())

def rel(a, b) -> float:
    "max |a - b| / max |a|."
    import torch
    return maxdiff(a, b) / max(float(torch.as_tensor(a).abs().max()), 1e-30)

def ratios(ta, to) -> dict:
    r = [a / b for a, b in zip(ta, to)]
    return dict(pairs=len(r), median=statistics.median(r), min=min(r), max=max(r),
                theirs_median_s=statistics.median(ta), ours_median_s=statistics.median(to))

def alternate(fns:dict, pairs:int, warmup:int, device, label:str='') -> dict:
    "Time every callable of `fns` once per round, the order reversed every other round (A B C, C B A, ...); warm-ups first."
    for _ in range(warmup):
        for f in fns.values(): f()
    names, t = list(fns), {k: [] for k in fns}
    for i in range(pairs):
        for k in (names if i % 2 == 0 else names[::-1]): t[k].append(timed(fns[k], device))
        print(f'  {label} round {i + 1}/{pairs}: ' + ', '.join(f'{k} {t[k][-1]:.3f}s' for k in names), flush=True)
    return t

def loadavg() -> list:
    try: return [float(x) for x in open('/proc/loadavg').read().split()[:3]]
    except OSError: return []

AUTHORS_TOP = ('models', 'utils', 'datasets', 'train', 'main', 'default', 'post_process', 'evaluations', 'distributed', 'tools')

def forget_other_authors(authors_dir:str):
    """The three authors' repositories reuse top-level names (`models`, `utils`, `train`, ...): drop such modules
    imported from another checkout, so that several methods can be set up in one process (one after the other)."""
    import sys
    from pathlib import Path
    d = str(Path(authors_dir).resolve())
    for name in list(sys.modules):
        if name.split('.')[0] not in AUTHORS_TOP: continue
        f = getattr(sys.modules[name], '__file__', None) or ''
        paths = list(getattr(sys.modules[name], '__path__', []) or [])
        where = f or (paths[0] if paths else '')
        if where and not str(Path(where).resolve()).startswith(d): del sys.modules[name]
    # another checkout on the path would shadow this one: HVQ-Trans's `models` has no __init__.py (a namespace
    # package), which loses to a regular package `models` anywhere on the path
    for p in list(sys.path):
        if p and str(Path(p).resolve()) != d and (Path(p) / 'models').is_dir() and (Path(p) / 'README.md').exists():
            sys.path.remove(p)
