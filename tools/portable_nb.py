#!/usr/bin/env python
"""Rewrite the absolute paths of the machine that ran a notebook (or wrote a log) into portable ones.

A path inside a checkout becomes relative to the checkout (`/tmp/cloneA/results/x` -> `results/x`); an installed
package's file becomes `<site-packages>/...`; a temporary folder `<tmp>`; a home folder `~`. Executed notebooks are
rewritten in their outputs and metadata (and, for `results/**/run.ipynb`, in the cell sources too: papermill writes
the run's parameters, `out_dir` among them, into a cell). Used by tests/test_portable.py (`find`) and meant to be
called by the runner after papermill writes `run.ipynb` (`portable_notebook(path)`).

    python tools/portable_nb.py FILE...        rewrite in place
    python tools/portable_nb.py --check FILE...  list what would change, exit 1 if anything
"""
import argparse, json, re, sys
from pathlib import Path

# the top-level folders of this repository: an absolute path through one of them is a path inside a checkout
TOP = r'(?:vqflow_nb|nbs|results|benchmarks|tools|tests|replicate|docs)'
SEG = r'[^/\s"\'<>:|()\[\]{},;=*?]+'
ABSOLUTE = re.compile(rf'(?<![\w.~<>$-])/(?:work|home|tmp|root|Users|var/tmp)(?:/{SEG})*/?')   # what the test looks for
RULES = [
    (re.compile(rf'(?<![\w.~<>$-])(?:/{SEG})+?/(?:lib/python[\d.]+/)?(?:site|dist)-packages/'), '<site-packages>/'),
    (re.compile(rf'(?<![\w.~<>$-])(?:/{SEG})+?/(?={TOP}/)'), ''),                    # inside a checkout: relative to it
    (re.compile(rf'(?<![\w.~<>$-])/(?:var/)?tmp/{SEG}'), '<tmp>'),                     # a temporary folder
    (re.compile(rf'(?<![\w.~<>$-])/(?:home|Users)/{SEG}'), '~'),
    (re.compile(r'(?<![\w.~<>$-])/root(?=/|\b)'), '~'),
    (re.compile(rf'(?<![\w.~<>$-])/work/{SEG}'), '<work>'),                            # any other folder of the machine
]

def portable(s:str) -> str:
    "`s` with every absolute machine path rewritten (idempotent)."
    for rx, rep in RULES: s = rx.sub(rep, s)
    return s

def find(s:str) -> list:
    "The absolute machine paths in `s`."
    return [m.group(0) for m in ABSOLUTE.finditer(s)]

def _walk(o, f):
    if isinstance(o, str): return f(o)
    if isinstance(o, list): return [_walk(v, f) for v in o]
    if isinstance(o, dict): return {k: _walk(v, f) for k, v in o.items()}
    return o

def notebook_strings(nb:dict, sources:bool) -> list:
    "The text of a notebook that may hold machine paths: outputs and metadata, and the cell sources if `sources`."
    out = []
    _walk(nb.get('metadata', {}), out.append)
    for c in nb.get('cells', []):
        _walk(c.get('outputs', []), out.append); _walk(c.get('metadata', {}), out.append)
        if sources: _walk(c.get('source', ''), out.append)
    return out

def portable_notebook(path, sources:bool|None=None) -> bool:
    "Rewrite notebook `path` in place; `sources` default: only for executed runs under results/. True if it changed."
    path = Path(path)
    sources = ('results' in path.parts) if sources is None else sources
    nb = json.loads(path.read_text())
    new = dict(nb, metadata=_walk(nb.get('metadata', {}), portable), cells=[
        dict(c, **({'outputs': _walk(c['outputs'], portable)} if 'outputs' in c else {}), metadata=_walk(c.get('metadata', {}), portable),
             **({'source': _walk(c['source'], portable)} if sources else {})) for c in nb.get('cells', [])])
    if new == nb: return False
    path.write_text(json.dumps(new, indent=1, ensure_ascii=False) + '\n')
    return True

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
