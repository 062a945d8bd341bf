"""Smoke test of `benchmarks/vs_authors.py --method hgad|hvqtrans --size smoke` against the authors' own code.

The authors' repositories are not part of this one (their code is imported from a checkout, never copied), so the
test runs only where a checkout is found: the directory in $VQFLOW_AUTHORS_HGAD / $VQFLOW_AUTHORS_HVQTRANS, else
`_authoring/authors_hgad` / `_authoring/authors_hvqtrans` in the repository (git-ignored). Elsewhere (CI) it skips
and says why. It checks that the equality table (loss, gradients, the state after a whole step, maps and scores of
their model against ours from the same weights) is within tolerance, and that one alternating timing round and
`authors_step_seconds` run.
"""
import json, os, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
MARK = dict(hgad='models/nf_model.py', hvqtrans='models/HVQ_TR_switch.py')

def authors_dir(method):
    d = os.environ.get(f'VQFLOW_AUTHORS_{method.upper()}') or str(ROOT / '_authoring' / f'authors_{method}')
    return d if (Path(d) / MARK[method]).exists() else None

def _deps(method):
    "The authors' imports that must be installed (FrEIA for HGAD; einops, sklearn, yaml for HVQ-Trans)."
    import importlib.util as u
    need = dict(hgad=['FrEIA', 'timm', 'sklearn', 'scipy', 'tqdm'], hvqtrans=['timm', 'einops', 'sklearn'])[method]
    return [m for m in need if u.find_spec(m) is None]

@pytest.mark.parametrize('method', ['hgad', 'hvqtrans'])
def test_smoke_equal_to_the_authors(method, tmp_path):
    d = authors_dir(method)
    if d is None:
        pytest.skip(f'no checkout of the authors\' {method} code: set VQFLOW_AUTHORS_{method.upper()} or put one in '
                    f'_authoring/authors_{method} (the code is imported from there, never copied into this repository)')
    if missing := _deps(method): pytest.skip(f'the authors\' {method} code imports {missing}, not installed')
    out = tmp_path / f'vs_{method}'
    env = {**os.environ, 'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', '')}
    r = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'vs_authors.py'), '--method', method, '--authors', d,
                        '--size', 'smoke', '--steps', '1', '--warmup', '0', '--no-memory', '--no-combined', '--out', str(out)],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(Path(str(out) + '.json').read_text())
    bad = {k: res['equivalence'][k] for k, ok in res['equal'].items() if ok is not True}
    assert not bad, f'rows beyond tolerance: {bad}'
    assert len(res['equal']) >= 9
    t = res['timing']['train_step']['ratios']['theirs']
    assert {'ours'} <= set(t) and all(r['pairs'] == 1 and r['median'] > 0 for r in t.values())

@pytest.mark.parametrize('method', ['hgad', 'hvqtrans'])
def test_authors_step_seconds(method):
    d = authors_dir(method)
    if d is None: pytest.skip(f'no checkout of the authors\' {method} code (see test_smoke_equal_to_the_authors)')
    if missing := _deps(method): pytest.skip(f'the authors\' {method} code imports {missing}, not installed')
    code = (f"import sys; sys.path.insert(0, {str(ROOT / 'benchmarks')!r}); import json, vs_authors as V; "
            f"print('RES', json.dumps(V.authors_step_seconds({method!r}, {d!r}, 'cpu', steps=1, size='smoke')))")
    env = {**os.environ, 'PYTHONPATH': str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', '')}
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads([l for l in r.stdout.splitlines() if l.startswith('RES ')][0][4:])
    assert res['seconds_per_step'] > 0 and res['batch_size'] == 2 and len(res['times']) == 1
