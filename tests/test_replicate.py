"""The replication runner as installed: notebook parameter names, output schema, resume, and a failed run."""
import json
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import pytest

from vqflow_nb.core import project_root
from vqflow_nb.replicate import PARAMETERS, replicate, run_id, main

ROOT = project_root()
NBS = sorted((ROOT/'nbs'/'replicate').glob('*.ipynb'))

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_notebook_parameters(nb):
    params = pm.inspect_notebook(str(nb))
    assert list(params) == list(PARAMETERS)

def _fake_notebook(path):
    "A stand-in replication notebook: writes a schema-complete metrics.json, or fails when method == 'broken'."
    nb = nbformat.v4.new_notebook()
    nb.metadata['kernelspec'] = dict(name='python3', display_name='python3', language='python')
    p = nbformat.v4.new_code_cell('\n'.join(f'{k} = None' for k in PARAMETERS)); p.metadata['tags'] = ['parameters']
    body = nbformat.v4.new_code_cell('''
from vqflow_nb.core import record
if method == "broken": raise RuntimeError("boom: this run fails on purpose")
t = dict(i_auroc=0.9, i_ap=0.9, i_f1max=0.9, p_auroc=0.8, p_ap=0.5, p_f1max=0.5, aupro=0.7)
record(out_dir, "metrics", dict(dataset="fake", method=method, variant="code", backbone="lite0", weights="offline",
       image_size=64, needs_labels=False, epochs=epochs, seed=seed, classes=["a"], faithful=False,
       last=dict(epoch=0, per_class=dict(a=t), mean=t), best=dict(epoch=0, per_class=dict(a=t), mean=t)))
''')
    nb.cells = [p, body]; nbformat.write(nb, path); return path

def test_runner_resume_and_failure(tmp_path):
    nb = _fake_notebook(tmp_path/'fake.ipynb')
    cfg = dict(runs=[dict(notebook=str(nb), dataset='fake', methods=['vqflow', 'broken'], seeds=[1],
                          parameters=dict(epochs=3))])
    res = tmp_path/'results'
    df = replicate(cfg, results=res, progress=False)
    st = dict(zip(df['method'], df['status']))
    assert st['vqflow'] == 'ok' and st['broken'].startswith('failed')
    ok = res/'fake'/'vqflow'/run_id(dict(epochs=3, seed=1, method='vqflow'))
    assert (ok/'metrics.json').exists() and (ok/'run.ipynb').exists()
    m = json.loads((ok/'metrics.json').read_text())
    assert m['epochs'] == 3 and m['seed'] == 1
    bad = res/'fake'/'broken'/run_id(dict(epochs=3, seed=1, method='broken'))
    assert (bad/'run.ipynb').exists() and not (bad/'metrics.json').exists()   # partial notebook kept
    fails = pd.read_csv(res/'failures.csv')
    assert list(fails['method']) == ['broken'] and 'boom' in fails['message'][0]
    assert (res/'tables'/'fake.md').exists() and (res/'tables'/'fake.csv').exists()
    # second sweep: the finished run is skipped, the failed one is tried again (and fails again)
    df2 = replicate(cfg, results=res, progress=False)
    st2 = dict(zip(df2['method'], df2['status']))
    assert st2['vqflow'].startswith('skipped') and st2['broken'].startswith('failed')
    assert len(pd.read_csv(res/'failures.csv')) == 2

def test_cli_collect(tmp_path, capsys):
    assert main(['--collect', '--results', str(tmp_path)]) == 0
    assert 'collected 0 runs' in capsys.readouterr().out
