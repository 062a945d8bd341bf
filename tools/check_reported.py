#!/usr/bin/env python
"""Validate `results/reported.csv`, the table of PUBLISHED numbers (papers, authors' READMEs, ADer, CostFilter-AD,
benchmark listings) that our replications are compared against.

Hard checks (any failure -> exit 1): exact header; allowed values of source / method / dataset / metric; class names
valid for their dataset; values numeric and in [0, 1]; no duplicate
(source, source_detail, method, dataset, cls, metric, setting) keys.

Soft checks (printed as WARN, exit code unaffected): where per-class rows and a `mean` row exist for the same
(source, method, dataset, metric, setting), the mean of the per-class values should match the published mean within
`--tol` (default 0.002); ADer's mAD should equal the mean of its seven headline metrics within the same tolerance.
Published means are sometimes rounded or computed differently: such mismatches are reported, never "fixed".

Usage: python tools/check_reported.py [path/to/reported.csv] [--tol 0.002]
"""
import argparse, sys
from pathlib import Path
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
HEADER = ['source', 'source_detail', 'paper', 'method', 'dataset', 'cls', 'metric', 'value', 'setting', 'notes']
SOURCES = {'paper', 'authors_readme', 'ADer', 'CostFilter-AD', 'benchmark_listing'}
METHODS = {'vqflow', 'hgad', 'hvqtrans', 'uniad', 'cflow', 'patchcore', 'rd4ad', 'diad', 'mambaad', 'invad', 'pyramidflow', 'inpformer', 'dinomaly'}
METRICS = {'i_auroc', 'i_ap', 'i_f1max', 'p_auroc', 'p_ap', 'p_f1max', 'aupro', 'iou_max', 'mad'}
CLASSES = {
    'mvtec_ad': {'bottle', 'cable', 'capsule', 'carpet', 'grid', 'hazelnut', 'leather', 'metal_nut', 'pill', 'screw',
                 'tile', 'toothbrush', 'transistor', 'wood', 'zipper'},
    'visa': {'candle', 'capsules', 'cashew', 'chewinggum', 'fryum', 'macaroni1', 'macaroni2', 'pcb1', 'pcb2', 'pcb3',
             'pcb4', 'pipe_fryum'},
    'btad': {'01', '02', '03'},
    'mvtec_3d': {'bagel', 'cable_gland', 'carrot', 'cookie', 'dowel', 'foam', 'peach', 'potato', 'rope', 'tire'},
    'mpdd': {'bracket_black', 'bracket_brown', 'bracket_white', 'connector', 'metal_plate', 'tubes'},
    'realiad': set(),  # only `mean` rows so far
}
# HGAD's union of four datasets; classes are named `<dataset>/<class>` so that names stay unique (our Union reader)
CLASSES['union'] = {f'{d}/{c}' for d in ('mvtec_ad', 'btad', 'mvtec_3d', 'visa') for c in CLASSES[d]}
KEY = ['source', 'source_detail', 'method', 'dataset', 'cls', 'metric', 'setting']
HEADLINE7 = ['i_auroc', 'i_ap', 'i_f1max', 'p_auroc', 'p_ap', 'p_f1max', 'aupro']


def load(path):
    # keep_default_na=False: class '01' etc. must stay strings, and empty notes stay ''
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def hard_checks(df):
    errs = []
    if list(df.columns) != HEADER:
        return [f'header is {list(df.columns)}, expected {HEADER}']
    for col, allowed in [('source', SOURCES), ('method', METHODS), ('dataset', set(CLASSES)), ('metric', METRICS)]:
        bad = df.loc[~df[col].isin(allowed), col]
        errs += [f'row {i + 2}: {col}={v!r} not allowed' for i, v in bad.items()]
    for i, r in df.iterrows():
        if r.dataset in CLASSES and r.cls != 'mean' and r.cls not in CLASSES[r.dataset]:
            errs.append(f'row {i + 2}: cls={r.cls!r} is not a {r.dataset} class')
        for col in ['source_detail', 'paper', 'setting']:
            if not r[col].strip(): errs.append(f'row {i + 2}: empty {col}')
    vals = pd.to_numeric(df['value'], errors='coerce')
    errs += [f'row {i + 2}: value {df.at[i, "value"]!r} is not a number' for i in df.index[vals.isna()]]
    errs += [f'row {i + 2}: value {v} outside [0, 1]' for i, v in vals[(vals < 0) | (vals > 1)].items()]
    dup = df[df.duplicated(KEY, keep=False)]
    errs += [f'duplicate key {tuple(k)} at rows {[i + 2 for i in g.index]}' for k, g in dup.groupby(KEY)]
    return errs


def mean_checks(df, tol):
    """Published `mean` vs the mean of the per-class rows of the same (source, method, dataset, metric, setting)."""
    warns, n_checked = [], 0
    for k, g in df.groupby(['source', 'method', 'dataset', 'metric', 'setting']):
        per, pub = g[g.cls != 'mean'], g[g.cls == 'mean']
        if per.empty or pub.empty: continue
        expected = CLASSES[k[2]]
        missing = expected - set(per.cls)
        calc = per.v.mean()
        for _, r in pub.iterrows():
            n_checked += 1
            msg = f'{"/".join(k)}: published mean {r.v:.3f} vs mean of {len(per)} classes {calc:.4f} (diff {calc - r.v:+.4f})'
            if missing: warns.append(msg + f'; per-class rows missing for {sorted(missing)}')
            elif abs(calc - r.v) > tol: warns.append(msg)
    return warns, n_checked


def mad_checks(df, tol):
    """ADer's mAD is documented as the mean of the seven headline metrics."""
    warns, n_checked = [], 0
    ader = df[(df.source == 'ADer') & (df.cls == 'mean')]
    for k, g in ader.groupby(['source_detail', 'method', 'dataset', 'setting']):
        m = dict(zip(g.metric, g.v))
        if 'mad' not in m or not all(h in m for h in HEADLINE7): continue
        n_checked += 1
        calc = sum(m[h] for h in HEADLINE7) / 7
        if abs(calc - m['mad']) > tol:
            warns.append(f'{k[1]}/{k[2]}/{k[3]}: printed mAD {m["mad"]:.3f} vs mean of 7 headline metrics {calc:.4f} '
                         f'(diff {calc - m["mad"]:+.4f})')
    return warns, n_checked


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('path', nargs='?', default=str(ROOT / 'results' / 'reported.csv'))
    ap.add_argument('--tol', type=float, default=0.002)
    a = ap.parse_args(argv)
    df = load(a.path)
    errs = hard_checks(df)
    if errs:
        print(f'FAIL: {len(errs)} problem(s) in {a.path}')
        for e in errs: print('  ' + e)
        return 1
    df['v'] = df['value'].astype(float)

    print(f'{a.path}: {len(df)} rows')
    print('\nrows per source:')
    print(df.groupby('source').size().to_string())
    print('\nrows per method x dataset:')
    print(pd.crosstab(df.method, df.dataset, margins=True, margins_name='total').to_string())

    mw, mn = mean_checks(df, a.tol)
    dw, dn = mad_checks(df, a.tol)
    print(f'\nmean checks: {mn} published means compared with their per-class rows (tol {a.tol})')
    print(f'mAD checks: {dn} ADer rows compared with the mean of their 7 headline metrics (tol {a.tol})')
    for w in mw + dw: print('WARN ' + w)
    print(f'\nOK: hard checks passed; {len(mw) + len(dw)} warning(s) (published inconsistencies, reported not fixed)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
