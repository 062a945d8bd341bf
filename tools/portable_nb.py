#!/usr/bin/env python
"""Rewrite the absolute paths of the machine that ran a notebook (or wrote a log) into portable ones.

A path inside a checkout becomes relative to the checkout (`/tmp/cloneA/results/x` -> `results/x`); an installed
package's file becomes `<site-packages>/...`; a temporary folder `<tmp>`; a home folder `~`. Executed notebooks are
rewritten in their outputs and metadata (and, for `results/**/run.ipynb`, in the cell sources too: papermill writes
the run's parameters, `out_dir` among them, into a cell). The rules are `vqflow_nb.execute`'s, which the runner applies to every `run.ipynb` it writes.

    python tools/portable_nb.py FILE...        rewrite in place
    python tools/portable_nb.py --check FILE...  list what would change, exit 1 if anything
"""
import argparse, json, sys
from pathlib import Path

from vqflow_nb.execute import portable, find, notebook_strings, portable_notebook   # the rules live in the package (31_execute)

def portable_file(path) -> bool:
    "Rewrite a notebook or a text file in place; True if it changed."
    path = Path(path)
    if path.suffix == '.ipynb': return portable_notebook(path)
    s = path.read_text(); new = portable(s)
    if new != s: path.write_text(new)
    return new != s

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('files', nargs='+'); ap.add_argument('--check', action='store_true')
    a = ap.parse_args()
    bad = 0
    for f in a.files:
        p = Path(f)
        try: p.read_text()
        except UnicodeDecodeError: continue                  # a binary file (figure, array)
        text = (notebook_strings(json.loads(p.read_text()), 'results' in p.parts) if p.suffix == '.ipynb' else [p.read_text()])
        hits = sorted({h for s in text for h in find(s)})
        if not hits: continue
        bad += 1
        if a.check: print(f'{f}: {hits[:5]}')
        else: portable_file(p); print(f'rewrote {f}')
    sys.exit(1 if a.check and bad else 0)

if __name__ == '__main__': main()
