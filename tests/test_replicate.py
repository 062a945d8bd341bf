"""The replication runner as installed: notebook parameter names, output schema, resume, and a failed run."""
import json
from pathlib import Path

import nbformat
import pandas as pd
import papermill as pm
import pytest

from vqflow_nb.core import project_root
from vqflow_nb.config import PARAMETERS, parameters_cell
from vqflow_nb.replicate import replicate, cores
from vqflow_nb.cli import main
from vqflow_nb.identity import run_id, data_fingerprint
from vqflow_nb.run import synthetic_root
from vqflow_nb.record import load_runs
from vqflow_nb.plan import load_grid, plan_grid
from vqflow_nb.method import METHODS, register_method

# stand-in methods of the stand-in notebook below: registered so that the plan accepts their names
for _m in ('slow', 'broken', 'flat', 'nometrics', 'late', 'hang'):
    if _m not in METHODS: register_method(_m, build=None, authors={}, offline='offline')

ROOT = project_root()
NBS = sorted((ROOT/'nbs'/'replicate').glob('*.ipynb'))

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_notebook_declares_every_parameter(nb):
    "Every replication notebook takes exactly the runner's parameters, in its order (`dataset` first)."
    assert list(pm.inspect_notebook(str(nb))) == list(PARAMETERS)
    cell = next(c for c in nbformat.read(str(nb), as_version=4).cells if 'parameters' in c.metadata.get('tags', []))
    assert cell.source == parameters_cell(), f'{nb.name}: run vqflow_nb.config.sync_parameters on it'

def test_committed_synthetic_run_ids():
    "The committed results of the main grid sit where the runner looks for them: replicating them finds them finished."
    plan = plan_grid(load_grid(ROOT/'replicate'/'synthetic.yaml'), ROOT/'results', ROOT)
    assert all(p['error'] is None for p in plan), [p['error'] for p in plan]
    assert {p['config'].dataset for p in plan} == {'synthetic'}          # the notebook is told its data set ...
    for p in plan: assert p['done'], p['out']                            # ... and the run id does not change with it

def _fake_notebook(path):
    "A stand-in replication notebook: writes a schema-complete metrics.json, or fails when method == 'broken'."
    nb = nbformat.v4.new_notebook()
    nb.metadata['kernelspec'] = dict(name='python3', display_name='python3', language='python')
    p = nbformat.v4.new_code_cell('\n'.join(f'{k} = None' for k in PARAMETERS)); p.metadata['tags'] = ['parameters']
    body = nbformat.v4.new_code_cell('''
import os, time
from pathlib import Path
from vqflow_nb.core import record
from vqflow_nb.record import stand_in_metrics
from vqflow_nb.run import die_with_parent
die_with_parent()
t_start = time.time()
if method == "slow": time.sleep(3)
if method == "hang":   # report its pid and its parent-death signal (PR_GET_PDEATHSIG), then wait to be killed
    import ctypes; sig = ctypes.c_int(); ctypes.CDLL(None).prctl(2, ctypes.byref(sig))
    Path(out_dir, "kernel.pid").write_text(f"{os.getpid()} {sig.value}"); time.sleep(120)
if method == "broken": raise RuntimeError("boom: this run fails on purpose")
if method != "nometrics":
    record(out_dir, "metrics", stand_in_metrics(dataset, method, dict(a=0.9), epochs=epochs, seed=seed,
           degenerate=method == "flat", degenerate_detail=dict(last={"a": ["all 9 image scores are equal (1)"]}),
           kernel=dict(threads=os.environ.get("VQFLOW_THREADS"), start=t_start, end=time.time())))
if method == "late": raise RuntimeError("fails after writing metrics.json")
''')
    nb.cells = [p, body]; nbformat.write(nb, path); return path

def _rid(method, **p):
    p = dict(dict(epochs=3, seed=1, method=method, data_root=str(synthetic_root())), **p)
    return run_id(p, data_fingerprint(p['data_root']))

def test_runner_resume_and_failure(tmp_path):
    nb = _fake_notebook(tmp_path/'fake.ipynb')
    cfg = dict(runs=[dict(notebook=str(nb), dataset='fake', methods=['vqflow', 'broken'], seeds=[1],
                          parameters=dict(epochs=3, data_root=str(synthetic_root())))])
    res = tmp_path/'results'
    df = replicate(cfg, results=res, progress=False)
    st = dict(zip(df['method'], df['status']))
    assert st['vqflow'] == 'ok' and st['broken'].startswith('failed')
    ok = res/'fake'/'vqflow'/_rid('vqflow')
    assert (ok/'metrics.json').exists() and (ok/'run.ipynb').exists() and (ok/'complete.json').exists()
    m = json.loads((ok/'metrics.json').read_text())
    assert m['epochs'] == 3 and m['seed'] == 1 and m['dataset'] == 'fake'   # the grid entry's data set reached the notebook
    bad = res/'fake'/'broken'/_rid('broken')
    assert (bad/'run.ipynb').exists() and not (bad/'metrics.json').exists()   # partial notebook kept
    fails = pd.read_csv(res/'failures.csv')
    assert list(fails['method']) == ['broken'] and 'boom' in fails['message'][0]
    assert (res/'tables'/'fake.md').exists() and (res/'tables'/'fake.csv').exists()
    # second sweep: the finished run is skipped, the failed one is tried again (and fails again)
    df2 = replicate(cfg, results=res, progress=False)
    st2 = dict(zip(df2['method'], df2['status']))
    assert st2['vqflow'].startswith('skipped') and st2['broken'].startswith('failed')
    assert len(pd.read_csv(res/'failures.csv')) == 2

def test_workers_run_at_once(tmp_path):
    "workers=2: two kernels at a time, each told cores//2 torch threads; the rows come back in the grid's order."
    nb = _fake_notebook(tmp_path/'fake.ipynb')
    cfg = dict(workers=2, runs=[dict(notebook=str(nb), dataset='fake', methods=['slow', 'broken', 'flat'], seeds=[1, 2],
                                     parameters=dict(epochs=3, data_root=str(synthetic_root())))])
    res = tmp_path/'results'
    df = replicate(cfg, results=res, progress=False, collect_tables=False)
    assert list(df['method']) == ['slow', 'slow', 'broken', 'broken', 'flat', 'flat']
    assert list(df['status']) == ['ok', 'ok', 'failed', 'failed', 'degenerate', 'degenerate']
    k = [json.loads((res/'fake'/'slow'/_rid('slow', seed=s)/'metrics.json').read_text())['kernel'] for s in (1, 2)]
    assert {x['threads'] for x in k} == {str(max(1, cores() // 2))}
    assert k[0]['start'] < k[1]['end'] and k[1]['start'] < k[0]['end']   # the two slow runs overlapped in time
    assert len(pd.read_csv(res/'failures.csv')) == 4                     # both failed and both degenerate runs recorded

def test_cli_collect(tmp_path, capsys):
    assert main(['--collect', '--results', str(tmp_path)]) == 0
    assert 'collected 0 runs' in capsys.readouterr().out

def test_every_non_ok_outcome_is_recorded(tmp_path):
    "No metrics.json, a failure after writing it, a degenerate run: each gets a failures.csv row; only finished runs skip."
    nb = _fake_notebook(tmp_path/'fake.ipynb')
    cfg = dict(runs=[dict(notebook=str(nb), dataset='fake', methods=['nometrics', 'late', 'flat'], seeds=[1],
                          parameters=dict(epochs=3, data_root=str(synthetic_root())))])
    res = tmp_path/'results'
    st = dict(zip(*replicate(cfg, results=res, progress=False)[['method', 'status']].values.T))
    assert st == dict(nometrics='failed', late='failed', flat='degenerate'), st
    fails = pd.read_csv(res/'failures.csv').set_index('method')
    assert fails.loc['nometrics', 'error'] == 'NoMetrics' and 'after writing' in fails.loc['late', 'message']
    assert fails.loc['flat', 'error'] == 'Degenerate'
    late = res/'fake'/'late'/_rid('late')
    assert not (late/'complete.json').exists() and not (late/'metrics.json').exists()   # not readable as a result
    assert (late/'metrics.failed-run.json').exists()                                    # but kept for inspection
    runs = load_runs(res)
    assert set(runs['method']) == {'flat'} and runs['degenerate'].all()             # only finished runs are tabled
    assert 'DEGENERATE' in (res/'tables'/'fake.md').read_text()
    st2 = dict(zip(*replicate(cfg, results=res, progress=False)[['method', 'status']].values.T))
    assert st2 == dict(nometrics='failed', late='failed', flat='skipped (finished)'), st2   # failures are retried

def test_other_data_is_another_run(tmp_path):
    "The same parameters on another folder never report the old folder's results as finished."
    import shutil
    a, b = tmp_path/'a', tmp_path/'b'
    shutil.copytree(synthetic_root()/'bar', a/'bar', copy_function=shutil.copy2)
    shutil.copytree(a, b, copy_function=shutil.copy2)
    f = sorted((b/'bar'/'test'/'good').iterdir())[0]; f.write_bytes(f.read_bytes() + b'\0')   # one changed file
    nb = _fake_notebook(tmp_path/'fake.ipynb')
    grid = lambda root: dict(runs=[dict(notebook=str(nb), dataset='fake', methods=['vqflow'], seeds=[1],
                                        parameters=dict(epochs=3, data_root=str(root)))])
    df_a = replicate(grid(a), results=tmp_path/'res', progress=False, collect_tables=False)
    df_b = replicate(grid(b), results=tmp_path/'res', progress=False, collect_tables=False)
    assert df_a['status'][0] == 'ok' and df_b['status'][0] == 'ok' and df_a['run_id'][0] != df_b['run_id'][0]

def test_verify_reruns_and_compares(tmp_path):
    "verify=True re-runs a finished run into _scratch/verify and says whether the numbers were reproduced."
    nb = _fake_notebook(tmp_path/'fake.ipynb')
    cfg = dict(runs=[dict(notebook=str(nb), dataset='fake', methods=['vqflow'], seeds=[1],
                          parameters=dict(epochs=3, data_root=str(synthetic_root())))])
    res = tmp_path/'results'
    replicate(cfg, results=res, progress=False)
    df = replicate(cfg, results=res, progress=False, verify=True)
    assert df['status'][0] == 'ok' and df['reproduced'][0] == 'exactly', df.to_dict()
    assert (res/'_scratch'/'verify'/'fake'/'vqflow'/_rid('vqflow')/'metrics.json').exists()

def test_real_dataset_notebook_needs_data_root(tmp_path):
    "A real-dataset notebook run without data_root stops with an error that says how to point it at the data."
    with pytest.raises(pm.PapermillExecutionError, match='needs data_root'):
        pm.execute_notebook(str(ROOT/'nbs'/'replicate'/'mvtec_ad.ipynb'), str(tmp_path/'out.ipynb'), kernel_name='python3',
                            parameters=dict(out_dir=str(tmp_path/'run')), progress_bar=False, cwd=str(ROOT))

@pytest.mark.parametrize('nb', NBS, ids=[p.stem for p in NBS])
def test_schedule_defaults_are_the_methods(nb):
    "A user who passes only data_root gets the method's own schedule and backbone, never a shrunken smoke-test size."
    params = pm.inspect_notebook(str(nb))
    for k in ('epochs', 'batch_size', 'lr', 'eval_every', 'backbone', 'image_size'):
        assert params[k]['default'] == 'None', (nb.name, k, params[k]['default'])


def test_bad_entries_never_stop_the_grid(tmp_path):
    "A grid with a missing data_root, a bad value and an unknown method runs its good entry and records each bad one."
    nb = _fake_notebook(tmp_path/'fake.ipynb')
    ok = dict(notebook=str(nb), dataset='fake', methods=['slow'], seeds=[1], parameters=dict(epochs=3, data_root=str(synthetic_root())))
    cfg = dict(runs=[dict(ok, parameters=dict(data_root=str(tmp_path/'nowhere'))), dict(ok, parameters=dict(lr='abc')),
                     dict(ok, methods=['nonesuch']), ok])
    res = tmp_path/'results'
    df = replicate(cfg, results=res, progress=False)
    assert list(df['status']) == ['failed', 'failed', 'failed', 'ok'], df[['method', 'status', 'message']]
    fails = pd.read_csv(res/'failures.csv')
    assert len(fails) == 3 and set(fails['error']) == {'PlanError'}
    msgs = ' | '.join(fails['message'])
    assert 'does not exist' in msgs and "lr='abc'" in msgs and "unknown method 'nonesuch'" in msgs, msgs

def test_missing_mask_is_a_recorded_failure(tmp_path):
    "A defect image without its mask fails that entry at planning (the readers' check), not the grid."
    import shutil
    root = tmp_path/'data'; shutil.copytree(synthetic_root()/'bar', root/'bar')
    next((root/'bar'/'ground_truth').rglob('*.png')).unlink()
    nb = _fake_notebook(tmp_path/'fake.ipynb')
    good = dict(notebook=str(nb), dataset='fake', methods=['slow'], seeds=[1], parameters=dict(data_root=str(synthetic_root())))
    df = replicate(dict(runs=[dict(good, parameters=dict(data_root=str(root))), good]), results=tmp_path/'res', progress=False)
    assert list(df['status']) == ['failed', 'ok'] and 'mask' in df['message'][0].lower(), df['message'][0]

def test_killed_runner_takes_its_kernel_with_it(tmp_path):
    "SIGKILL of the runner: its kernel dies too (no orphan writing checkpoints into a folder a retry resumes)."
    import os, signal, subprocess, sys, time
    nb = _fake_notebook(tmp_path/'fake.ipynb')
    grid = dict(runs=[dict(notebook=str(nb), dataset='fake', methods=['hang'], seeds=[1], parameters=dict(data_root=str(synthetic_root())))])
    code = ("import sys; from vqflow_nb.method import register_method; register_method('hang', None, {}, 'offline')\n"
            f"from vqflow_nb.replicate import replicate; replicate({grid!r}, results={str(tmp_path/'res')!r}, progress=False)")
    runner = subprocess.Popen([sys.executable, '-c', code])
    pid_file = next(iter([]), None)
    for _ in range(240):
        found = list((tmp_path/'res').rglob('kernel.pid'))
        if found and found[0].read_text(): pid_file = found[0]; break
        time.sleep(0.5)
    assert pid_file is not None, 'the kernel never started'
    kpid, sig = map(int, pid_file.read_text().split())
    assert sig == signal.SIGKILL, f'the kernel is not armed to die with its runner (parent-death signal {sig})'
    os.kill(runner.pid, signal.SIGKILL); runner.wait()
    for _ in range(20):
        try: os.kill(kpid, 0)
        except ProcessLookupError: break
        time.sleep(0.25)
    else:
        os.kill(kpid, signal.SIGKILL); raise AssertionError('the kernel outlived its runner')

def test_torchrun_failure_is_one_line_and_recorded(tmp_path):
    "A run started by torchrun that fails: exit status 1, one line per rank (no traceback), a failures.csv row from rank 0."
    import os, socket, subprocess, sys
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]
    env = dict(os.environ, RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    p = subprocess.run([sys.executable, '-m', 'vqflow_nb.cluster', '--dataset', 'mvtec_ad', '-p', f'data_root={tmp_path/"nowhere"}',
                        '-p', 'device=cpu', '--results', str(tmp_path/'res')], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1, p.stderr
    assert 'Traceback' not in p.stderr and 'rank 0: the run failed: FileNotFoundError' in p.stderr, p.stderr
    fails = pd.read_csv(tmp_path/'res'/'failures.csv')
    assert list(fails['error']) == ['FileNotFoundError'] and 'does not exist' in fails['message'][0]
