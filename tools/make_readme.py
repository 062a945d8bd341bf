#!/usr/bin/env python
"""Build README.md from nbs/index.ipynb (nbdev's own README step needs Quarto, which this project does not need).

Markdown cells are copied; code cells not marked `#| hide` are shown as code (unless `#| echo: false`), with their stored
text/markdown outputs (so the results table rendered in the notebook lands in the README). `--check` fails if README.md is stale.
"""
import argparse, sys
from pathlib import Path
import nbformat

ROOT = Path(__file__).resolve().parents[1]

def render(nb_path):
    nb, parts = nbformat.read(nb_path, as_version=4), []
    for c in nb.cells:
        src = c.source.strip()
        if c.cell_type == 'markdown': parts.append(src); continue
        if c.cell_type != 'code': continue
        lines = src.splitlines()
        if any(l.strip().replace(' ', '') in ('#|hide', '#|exporti') for l in lines): continue
        echo = not any(l.strip().replace(' ', '') in ('#|echo:false', '#|echofalse') for l in lines)
        code = '\n'.join(l for l in lines if not l.lstrip().startswith('#|')).strip()
        if code and echo: parts.append(f'```python\n{code}\n```')
        for o in c.get('outputs', []):
            data = o.get('data', {})
            if 'text/markdown' in data: parts.append(''.join(data['text/markdown']).strip())
            elif o.get('output_type') == 'stream' or 'text/plain' in data:
                txt = ''.join(o.get('text', data.get('text/plain', ''))).rstrip()
                if txt: parts.append(f'```\n{txt}\n```')
    return '<!-- generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file -->\n\n' + '\n\n'.join(parts) + '\n'

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--check', action='store_true', help='exit 1 if README.md differs from the notebook')
    a = ap.parse_args()
    new, readme = render(ROOT/'nbs'/'index.ipynb'), ROOT/'README.md'
    if a.check:
        if not readme.exists() or readme.read_text() != new:
            print('README.md is out of date: run `.venv/bin/python tools/make_readme.py`'); sys.exit(1)
        print('README.md is up to date'); return
    readme.write_text(new); print(f'wrote {readme}')

if __name__ == '__main__': main()
