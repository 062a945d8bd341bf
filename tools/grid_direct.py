#!/usr/bin/env python
"""Run a replication grid (the YAML of `vqflow-replicate`) without Jupyter: each run calls `run_experiment` directly,
in worker processes, and writes the same run folder (metrics.json, tables, curves, figures, complete.json) under the
same run id as the papermill runner would — only the executed `run.ipynb` is missing.

For machines that have torch but no Jupyter/papermill (a lent GPU machine), and for spreading a grid over a few
processes on one GPU. `make replicate` and CI never use it; `vqflow-replicate` stays the way to run the notebooks.

    python tools/grid_direct.py --config replicate/synthetic_seeds.yaml --workers 6 [--results DIR] [-p device=cuda]
"""
import argparse, os, sys, time, traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

def one(job):
    "Run one grid entry in this (worker) process; returns (label, status, seconds, message)."
    os.environ.setdefault('VQFLOW_THREADS', '1')
    from vqflow_nb.replicate import run_experiment, run_figures
    from vqflow_nb.core import record
    r, out = job
    t0, label = time.time(), f"{r['dataset']}/{r['method']}/{Path(out).name}"
    try:
        params = {k: v for k, v in r['params'].items() if k != 'dataset'}
        run = run_experiment(r['dataset'], **params, out_dir=out, progress=False)
        try: run_figures(run)
        except Exception as e: print(f'{label}: figures failed: {e!r}', flush=True)
        status = 'degenerate' if run['metrics'].get('degenerate') else 'ok'
        record(Path(out), 'complete', dict(status=status, seconds=time.time() - t0, engine='grid_direct',
                                           time=time.strftime('%Y-%m-%dT%H:%M:%S%z')))
        m = run['metrics']['last']['mean']
        return label, status, time.time() - t0, f"I-AUROC {m.get('i_auroc'):.3f} P-AUROC {m.get('p_auroc'):.3f}"
    except Exception as e:
        return label, 'error', time.time() - t0, ''.join(traceback.format_exception(e))[-2000:]

def main(argv=None):
    import yaml
    from vqflow_nb.replicate import _plan, _value
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--config', required=True)
    p.add_argument('--results', default=None, help="results folder (default: the config's `results`)")
    p.add_argument('--workers', type=int, default=1)
    p.add_argument('-p', '--param', action='append', default=[], help='NAME=VALUE added to every run (e.g. device=cuda)')
    a = p.parse_args(argv)
    cfg = yaml.safe_load(Path(a.config).read_text())
    extra = dict(kv.split('=', 1) for kv in a.param)
    for r in cfg['runs']: r['parameters'] = {**r.get('parameters', {}), **{k: _value(v) for k, v in extra.items()}}
    results = Path(a.results or ROOT/cfg.get('results', 'results'))
    jobs = []
    for r in _plan(cfg, results, ROOT):   # the runner's plan: the same run ids and folders
        if not r['run']: print(f"finished already: {r['out']}"); continue
        r['out'].mkdir(parents=True, exist_ok=True); jobs.append((r, str(r['out'])))
    print(f'{len(jobs)} runs, {a.workers} workers', flush=True)
    failed, t0 = 0, time.time()
    import multiprocessing as mp
    with ProcessPoolExecutor(a.workers, mp_context=mp.get_context('spawn')) as ex:
        for f in as_completed([ex.submit(one, j) for j in jobs]):
            label, status, s, msg = f.result()
            failed += status == 'error'
            print(f'[{time.time()-t0:6.0f} s] {status:10s} {s:6.0f} s  {label}  {msg}', flush=True)
    print(f'{len(jobs) - failed} finished, {failed} failed in {time.time()-t0:.0f} s')
    return 1 if failed else 0

if __name__ == '__main__': sys.exit(main())
