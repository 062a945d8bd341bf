#!/usr/bin/env python
"""The README's test command: every notebook under `nbdev_test` plus `pytest tests/`.

Notebooks run two at a time (one torch thread each, as the machine has two cores), each in its own process so a
crash or a memory peak in one cannot take the others down. Ends with the line `N passed, N failed`, counting
notebooks and pytest tests together, and exits non-zero when anything failed.
"""
import argparse, os, subprocess, sys, tempfile, time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

def notebooks(pattern=None):
    from nbdev.doclinks import nbglob
    from nbdev.config import get_config
    nbs = sorted(Path(p) for p in nbglob(get_config().nbs_path))
    return [p for p in nbs if pattern is None or pattern in str(p)]

def run_nb(nb, flags, timeout):
    env = dict(os.environ, IN_TEST='1', OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', VQFLOW_THREADS='1',
               MPLBACKEND='Agg', PYTHONWARNINGS='ignore')
    cmd = [str(BIN/'nbdev_test'), '--path', str(nb), '--n_workers', '0'] + (['--flags', flags] if flags else [])
    t = time.time()
    try: p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout); ok, out = p.returncode == 0, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e: ok, out = False, f'TIMEOUT after {timeout}s\n{e.stdout or ""}{e.stderr or ""}'
    return nb, ok, time.time() - t, out

def run_pytest(extra):
    with tempfile.TemporaryDirectory() as d:
        xml = Path(d)/'junit.xml'
        env = dict(os.environ, OMP_NUM_THREADS='2', MPLBACKEND='Agg')
        code = subprocess.call([sys.executable, '-m', 'pytest', '-q', 'tests', f'--junitxml={xml}', *extra], cwd=ROOT, env=env)
        if code == 5 or not xml.exists(): return 0, 0, code   # no tests collected
        suites = ET.parse(xml).getroot()
        suites = [suites] if suites.tag == 'testsuite' else list(suites)
        n = sum(int(s.get('tests', 0)) for s in suites); skipped = sum(int(s.get('skipped', 0)) for s in suites)
        failed = sum(int(s.get('failures', 0)) + int(s.get('errors', 0)) for s in suites)
        return n - skipped - failed, failed, code

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--flags', default='', help="extra nbdev test flags to run, e.g. 'slow'")
    ap.add_argument('--only', default=None, help='run only notebooks whose path contains this')
    ap.add_argument('--workers', type=int, default=2)
    ap.add_argument('--timeout', type=int, default=1200, help='seconds per notebook')
    ap.add_argument('--no-pytest', action='store_true')
    a = ap.parse_args()
    t0, nbs = time.time(), notebooks(a.only)
    print(f'Running {len(nbs)} notebooks ({a.workers} at a time)...', flush=True)
    passed = failed = 0
    with ThreadPoolExecutor(a.workers) as ex:
        for nb, ok, secs, out in ex.map(lambda nb: run_nb(nb, a.flags, a.timeout), nbs):
            print(f"  {'PASS' if ok else 'FAIL'} {secs:6.1f}s  {nb.relative_to(ROOT)}", flush=True)
            if not ok: print(out[-6000:], flush=True)
            passed += ok; failed += not ok
    if not a.no_pytest:
        print('Running pytest tests/ ...', flush=True)
        p, f, code = run_pytest([])
        if code not in (0, 1, 5): f = max(f, 1); print(f'pytest exited with code {code}')
        passed += p; failed += f
    print(f'Total time {time.time()-t0:.0f}s')
    print(f'{passed} passed, {failed} failed')
    sys.exit(1 if failed else 0)

if __name__ == '__main__': main()
