#!/usr/bin/env python
"""Build the documentation site (`make docs`): every notebook a page with its committed outputs, the docs/ write-ups,
the API of each exported module, and a landing page; Sphinx + MyST-NB into `_site/html`.

The sources are staged into `_site/src` in the repository's own layout (the README notebook as `readme`, notebooks
under `nbs/`, write-ups under `docs/`), so the relative links between them stay valid; images the pages link to are
copied alongside. Nothing is executed.
"""
import argparse, json, os, re, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMG = re.compile(r'!\[[^\]]*\]\(([^)\s]+)\)|<img[^>]*src="([^"]+)"')

def _module_of(nb:Path) -> str|None:
    "The module a notebook exports to (`#| default_exp`), or None."
    for c in json.loads(nb.read_text())['cells']:
        m = re.search(r'#\|\s*default_exp\s+(\S+)', ''.join(c['source']))
        if m: return m.group(1)
    return None

def _title(nb:Path) -> str:
    "The notebook's first Markdown heading, else its file name."
    for c in json.loads(nb.read_text())['cells']:
        if c['cell_type'] == 'markdown':
            m = re.search(r'^#\s+(.+)$', ''.join(c['source']), re.M)
            if m: return m.group(1).strip()
    return nb.stem

def _copy_images(text:str, src_dir:Path, dst_dir:Path):
    "Copy the local images a page links to, keeping their path relative to the page."
    for a, b in IMG.findall(text):
        ref = (a or b).split('#')[0]
        if not ref or re.match(r'[a-z]+:', ref) or ref.startswith('/'): continue
        f = (src_dir/ref).resolve()
        if f.is_file() and ROOT in f.parents:
            out = (dst_dir/ref).resolve(); out.parent.mkdir(parents=True, exist_ok=True); shutil.copy2(f, out)

def _markdown_of(nb:Path) -> str:
    return '\n'.join(''.join(c['source']) for c in json.loads(nb.read_text())['cells'] if c['cell_type'] == 'markdown')

def stage(out:Path) -> Path:
    "Write the site's sources into `out` (emptied first); return it."
    if out.exists(): shutil.rmtree(out)
    (out/'nbs').mkdir(parents=True); (out/'docs').mkdir(); (out/'api').mkdir()
    shutil.copy2(ROOT/'site'/'conf.py', out/'conf.py')
    import jupyter_server_mathjax                  # MathJax served by the site itself (no CDN): the [dev] extra has it
    shutil.copytree(Path(jupyter_server_mathjax.__file__).parent/'static', out/'_mathjax'/'mathjax',
                    ignore=lambda d, names: [n for n in names if Path(d).name == 'localization' and n != 'en'])
    shutil.copy2(ROOT/'nbs'/'index.ipynb', out/'readme.ipynb')
    _copy_images(_markdown_of(ROOT/'nbs'/'index.ipynb'), ROOT, out)
    nbs = sorted(p for p in (ROOT/'nbs').rglob('*.ipynb') if p.name != 'index.ipynb' and '.ipynb_checkpoints' not in p.parts)
    for nb in nbs:
        dst = out/nb.relative_to(ROOT); dst.parent.mkdir(parents=True, exist_ok=True); shutil.copy2(nb, dst)
        _copy_images(_markdown_of(nb), nb.parent, dst.parent)
    docs = sorted((ROOT/'docs').glob('*.md'))
    for md in docs:
        shutil.copy2(md, out/'docs'/md.name)
        _copy_images(md.read_text(), md.parent, out/'docs')
    mods = sorted({m for nb in nbs if (m := _module_of(nb))})
    for m in mods:
        (out/'api'/f'{m}.md').write_text(f'# `vqflow_nb.{m}`\n\n```{{automodule}} vqflow_nb.{m}\n```\n')
    toc = lambda caption, items: (f'```{{toctree}}\n:caption: {caption}\n:maxdepth: 1\n\n' + '\n'.join(items) + '\n```\n')
    main = [nb for nb in nbs if nb.parent.name == 'nbs']
    tmpl = [nb for nb in nbs if nb.parent.name != 'nbs']
    (out/'index.md').write_text(
        '# vqflow_nb\n\n'
        'A Jupyter-first replication suite for multi-class unsupervised industrial anomaly detection: VQ-Flow, HGAD and '
        'HVQ-Trans, with PatchCore as the reference baseline, on one runner, one metric set and one comparison.\n\n'
        'Start with the [overview](readme.ipynb) (the README: what it is, the two commands, the comparison). '
        'Each method is a notebook that reads like a paper section: prose and maths, small exported cells, each with '
        'its test. The write-ups collect what the notebooks found; the API pages list every exported symbol.\n\n'
        + toc('Start', ['readme'])
        + toc('Notebooks', [f'{nb.relative_to(ROOT).with_suffix("").as_posix()}' for nb in main])
        + toc('Replication notebooks (templates, run by the runner)', [nb.relative_to(ROOT).with_suffix('').as_posix() for nb in tmpl])
        + toc('Write-ups', [f'docs/{md.stem}' for md in docs])
        + toc('API reference', [f'api/{m}' for m in mods]))
    return out

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--out', default=str(ROOT/'_site'), help='staging (src/) and output (html/) folder')
    ap.add_argument('--strict', action='store_true', help='turn Sphinx warnings into errors')
    a = ap.parse_args()
    out = Path(a.out); src = stage(out/'src')
    env = dict(os.environ, VQFLOW_SITE_ROOT=str(ROOT), MPLBACKEND='Agg')
    cmd = [sys.executable, '-m', 'sphinx', '-b', 'html', '-q', '-j', 'auto', str(src), str(out/'html')] + (['-W', '--keep-going'] if a.strict else [])
    code = subprocess.call(cmd, env=env)
    if code == 0: print(f'site: {out/"html"/"index.html"}')
    sys.exit(code)

if __name__ == '__main__': main()
