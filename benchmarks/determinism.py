#!/usr/bin/env python
"""How reproducible is a run? Re-runs a VQ-Flow run (5-class synthetic set, 256 px, 16 epochs) several ways and
prints the spread of the class-mean metrics into results/benchmarks/determinism.md:

- the same seed twice in one environment (same machine, same thread count): the suite's determinism claim;
- the same seed with 1 and with 2 torch threads: another summation order, as on another CPU (AVX2 vs AVX-512 kernels
  reorder float sums the same way) — a proxy for machine-to-machine differences;
- three seeds: the seed-to-seed spread that any comparison between methods must exceed.

Usage: python benchmarks/determinism.py [--epochs 16] [--out results/benchmarks/determinism.md]
"""
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
METRICS = ['i_auroc', 'i_ap', 'i_f1max', 'p_auroc', 'p_ap', 'p_f1max', 'aupro']

CHILD = '''
import json, sys, torch
from vqflow_nb.run import run_experiment
p = json.loads(sys.argv[1]); torch.set_num_threads(p.pop('threads'))
run = run_experiment(**p, progress=False)
m = run['metrics']
print('RESULT ' + json.dumps(dict(mean=m['last']['mean'], per_class=m['last']['per_class'], loss0=run['fit'].history[0]['loss'],
                                  degenerate=m['degenerate'])))
'''

def one(params, threads, out_dir):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS='ignore')
    p = dict(params, threads=threads, out_dir=str(out_dir))
    r = subprocess.run([sys.executable, '-c', CHILD, json.dumps(p)], cwd=ROOT, env=env, capture_output=True, text=True)
    line = [l for l in r.stdout.splitlines() if l.startswith('RESULT ')]
    if r.returncode or not line: raise RuntimeError(r.stdout[-2000:] + r.stderr[-3000:])
    return json.loads(line[0][7:])

def main():
    ap = argparse.ArgumentParser(); ap.add_argument('--out', default=str(ROOT/'results'/'benchmarks'/'determinism.md'))
    ap.add_argument('--seeds', type=int, nargs='+', default=[9826, 1, 2])
    a = ap.parse_args()
    from vqflow_nb.run import synthetic_root   # the 5-class set: small enough to repeat five times
    base = dict(dataset='synthetic', data_root=str(synthetic_root()), method='vqflow', image_size=256, epochs=16,
                batch_size=8, lr=1e-3, eval_every=4)
    rows, t0 = [], time.time()
    with tempfile.TemporaryDirectory() as d:
        plan = [('same seed, 2 threads, run A', a.seeds[0], 2), ('same seed, 2 threads, run B', a.seeds[0], 2),
                ('same seed, 1 thread', a.seeds[0], 1)] + [(f'seed {s}, 2 threads', s, 2) for s in a.seeds[1:]]
        for i, (name, seed, th) in enumerate(plan):
            r = one(dict(base, seed=seed), th, Path(d)/f'run{i}')
            rows.append(dict(run=name, seed=seed, threads=th, loss_epoch1=r['loss0'], degenerate=r['degenerate'], **r['mean']))
            print(f'{name}: ' + ', '.join(f'{k}={r["mean"][k]:.4f}' for k in METRICS), flush=True)
    df = pd.DataFrame(rows)
    same = (df.iloc[0][METRICS] - df.iloc[1][METRICS]).abs().max()
    threads = (df.iloc[0][METRICS] - df.iloc[2][METRICS]).abs()
    seeds = df[df['threads'] == 2].drop(index=1)[METRICS]
    lines = ['# Determinism of a VQ-Flow run, measured (the 5-class synthetic set, offline Lite0 at 256 px, 16 epochs, batch 8, lr 1e-3)',
             '', f'Machine: {os.cpu_count()} CPUs; {time.time() - t0:.0f} s in all. Class means of the last epoch, ×100.', '',
             '| run | seed | threads | epoch-1 loss | ' + ' | '.join(METRICS) + ' |', '|---|---|---|---|' + '---|' * len(METRICS)]
    for _, r in df.iterrows():
        lines.append(f"| {r['run']} | {r['seed']} | {r['threads']} | {r['loss_epoch1']:.3g} | " + ' | '.join(f'{100*r[m]:.2f}' for m in METRICS) + ' |')
    lines += ['', f'- Same seed, same thread count: largest difference {100*same:.4f} points '
              f'({"bit-identical" if same == 0 else "NOT identical"}).',
              f'- Same seed, 1 vs 2 threads (another float summation order): largest difference {100*threads.max():.2f} points '
              f'({threads.idxmax()}).',
              f'- Across seeds {list(seeds.index.map(lambda i: int(df.loc[i, "seed"])))}: std ' +
              ', '.join(f'{m} {100*seeds[m].std(ddof=1):.2f}' for m in METRICS) + ' points.']
    Path(a.out).write_text('\n'.join(lines) + '\n'); print('\n'.join(lines))

if __name__ == '__main__': main()
