"benchmarks/dress_rehearsal.py: the full-schedule arithmetic, the authors' interface, and the whole script in --smoke mode."
import json, math, os, subprocess, sys, types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'benchmarks'))
import dress_rehearsal as dr


def test_validations_follow_the_trainers_rule():
    assert dr.n_validations(60, 2) == 30 and dr.n_validations(200, 1) == 200 and dr.n_validations(1000, 10) == 100
    assert dr.n_validations(7, 3) == 3   # after epochs 3 and 6, and after the last
    assert dr.n_validations(1, 5) == 1
    # HVQ-Trans validates after (0-based) epochs 0, 10, ..., 990 and the trainer adds the last: 101
    assert dr.n_validations(1000, 10, eval_first=True) == 101 and dr.authors_schedule('hvqtrans')['eval_first']


def test_projected_hours():
    # 10 epochs of 36 s, validations after 5 and 10 of 90 s each, 180 s of set-up: 180 + 360 + 180 = 720 s
    assert dr.projected_hours(10, 5, 36.0, 90.0, 180.0) == pytest.approx(0.2)
    assert dr.projected_hours(1000, 10, 3.6, 36.0) == pytest.approx(1.0 + 1.0)


def test_steps_and_scaling_to_the_full_set():
    assert dr.steps_per_epoch(3629, 8, True) == 453 and dr.steps_per_epoch(3629, 32, False) == 114
    run = dict(n_train=100, n_test=50, s_epoch=12.0, s_val=5.0, setup_s=40.0, extract_s=30.0)
    f = dr.scale_to_full(run, dict(n_train=3629, n_test=1725), 8, True)
    assert f['steps_full'] == 453 and f['s_step'] == pytest.approx(1.0)          # 12 s / 12 steps
    assert f['s_epoch'] == pytest.approx(453.0) and f['s_val'] == pytest.approx(5.0 * 1725 / 50)
    assert f['setup_s'] == pytest.approx(10.0 + 30.0 * 5354 / 150)                # only the extraction grows with the data
    with pytest.raises(ValueError, match='no step'): dr.scale_to_full(dict(run, n_train=4), dict(n_train=3629, n_test=1725), 8, True)


def test_schedules_are_the_registered_authors():
    import vqflow_nb.config   # registers the methods
    from vqflow_nb.method import METHODS
    for m in ('vqflow', 'hgad', 'hvqtrans', 'patchcore'):
        assert dr.authors_schedule(m)['epochs'] == METHODS[m].authors['epochs']
    assert [dr.authors_schedule(m)['batch_size'] for m in ('vqflow', 'hgad', 'hvqtrans')] == [16, 8, 32]


def test_authors_interface(monkeypatch, tmp_path):
    assert dr.authors_side('hgad', None, 'cpu')['available'] is False
    monkeypatch.setitem(sys.modules, 'vs_authors', types.ModuleType('vs_authors'))   # a vs_authors without the function
    a = dr.authors_side('hgad', '/nowhere', 'cpu', isolate=False)
    assert a['available'] is False and 'not available' in a['why']
    fake = types.ModuleType('vs_authors')
    fake.authors_step_seconds = lambda method, authors_dir, device, steps=3: dict(seconds_per_step=0.5, batch_size=8)
    monkeypatch.setitem(sys.modules, 'vs_authors', fake)
    assert 'no checkout of xcyao00/HGAD' in dr.authors_side('hgad', str(tmp_path), 'cpu', isolate=False)['why']
    (tmp_path/'HGAD'/'models').mkdir(parents=True); (tmp_path/'HGAD'/'models'/'nf_model.py').write_text('')
    assert dr.authors_side('hgad', str(tmp_path), 'cpu', isolate=False) == dict(available=True, checkout=str(tmp_path/'HGAD'), seconds_per_step=0.5, batch_size=8)
    def stops(*a, **k): raise SystemExit('no models/nf_model.py there')   # how vs_authors refuses a wrong checkout
    fake.authors_step_seconds = stops
    assert 'SystemExit' in dr.authors_side('hgad', str(tmp_path), 'cpu', isolate=False)['why']


def test_smoke_writes_a_row_per_method(tmp_path):
    "The whole script, tiny: three methods through the replication notebook (papermill) on a scaled MVTec-sized copy."
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''), VQFLOW_THREADS='1')
    env.pop('IN_TEST', None)
    p = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'dress_rehearsal.py'), '--smoke', '--work', str(tmp_path/'work'),
                        '--out', str(tmp_path/'dr')], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads((tmp_path/'dr.json').read_text())
    assert [r['method'] for r in res['rows']] == ['vqflow', 'hgad', 'hvqtrans'] and res['engine'] == 'papermill'
    for r in res['rows']:
        assert r['status'] in ('ok', 'degenerate'), r   # tiny random runs may score every image alike: timings still count
        for k in ('s_epoch', 's_val', 'setup_s', 'host_peak_gb', 'projected_hours'):
            assert isinstance(r[k], (int, float)) and math.isfinite(r[k]) and r[k] > 0, (r['method'], k, r[k])
        assert r['n_validations'] == dr.n_validations(r['schedule']['epochs'], r['schedule']['eval_every'], r['schedule'].get('eval_first', False))
        assert r['authors']['available'] is False
    from vqflow_nb.execute import find
    md = (tmp_path/'dr.md').read_text()
    assert find(md) == [] and find((tmp_path/'dr.json').read_text()) == []   # committed later: no machine paths
    for m in ('vqflow', 'hgad', 'hvqtrans'): assert sum(l.startswith(f'| {m} |') for l in md.splitlines()) == 1


def test_authors_side_runs_in_its_own_process(tmp_path):
    "Isolated: the answer comes back from a child process (here this checkout's vs_authors, with or without the function)."
    a = dr.authors_side('hgad', str(tmp_path), 'cpu')
    assert a['available'] is False and ('not available' in a['why'] or 'no checkout' in a['why']), a


def test_authors_checkouts_are_found_by_their_marker(tmp_path):
    for name, files in dict(vq=['post_process.py', 'train.py'], HGAD=['models/nf_model.py'], hvq=['models/HVQ_TR_switch.py']).items():
        for f in files: (tmp_path/name/f).parent.mkdir(parents=True, exist_ok=True); (tmp_path/name/f).write_text('')
    assert dr.authors_checkout('vqflow', str(tmp_path)) == tmp_path/'vq'
    assert dr.authors_checkout('hgad', str(tmp_path)) == tmp_path/'HGAD'
    assert dr.authors_checkout('hvqtrans', str(tmp_path/'hvq')) == tmp_path/'hvq'   # the checkout itself
    assert dr.authors_checkout('hgad', str(tmp_path/'vq')) is None and dr.authors_checkout('patchcore', str(tmp_path)) is None


def test_gpu_script_passes_only_known_flags():
    "benchmarks/gpu_rehearsal.sh runs on a lent GPU only: a flag renamed here must fail a test on the CPU, not the device call."
    import re
    sh = (ROOT/'benchmarks'/'gpu_rehearsal.sh').read_text()
    assert subprocess.run(['bash', '-n', str(ROOT/'benchmarks'/'gpu_rehearsal.sh')]).returncode == 0
    call = sh[sh.index('$PY benchmarks/dress_rehearsal.py'):]; call = call[:call.index('| tee')]
    tiny = sh[sh.index('EXTRA=(--classes'):]; tiny = tiny[:tiny.index(')')]
    flags = set(re.findall(r'(?<![\w-])--[a-z][a-z-]+', call + tiny))
    known = {o for a in dr.parser()._actions for o in a.option_strings}
    assert flags and flags <= known, flags - known


def test_measure_reads_the_records(tmp_path):
    "Seconds per epoch: history past the first epoch; per validation: epoch wall time (polled) less training; set-up: to epoch 0."
    (tmp_path/'history.csv').write_text('epoch,seconds\n0,9.0\n1,4.0\n2,6.0\n')
    (tmp_path/'estimate.json').write_text(json.dumps(dict(train_seconds_per_epoch=9.0, eval_seconds=3.0)))
    seen = {0: 110.0, 2: 130.0, 3: 140.0}   # the end of epoch 0 (start of 1) was not seen: only epoch 2's wall is known
    m = dr.measure(tmp_path, seen, 100.0, extract_start=104.0)
    assert m['s_epoch'] == 5.0 and m['validation_seconds'] == [4.0] and m['s_val'] == 4.0
    assert m['setup_s'] == 10.0 and m['extract_s'] == 6.0
    (tmp_path/'history.csv').unlink()   # a run stopped at its cap: the first epoch's estimate
    m = dr.measure(tmp_path, {0: 110.0}, 100.0)
    assert (m['s_epoch'], m['s_val'], m['extract_s']) == (9.0, 3.0, None)
