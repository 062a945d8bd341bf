"The published numbers we compare against stay well-formed: known sources, methods, datasets and classes, values in [0, 1]."
import subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

def test_reported_csv_passes_its_checks():
    p = subprocess.run([sys.executable, str(ROOT/'tools'/'check_reported.py')], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

def test_checker_rejects_a_bad_row(tmp_path):
    lines = (ROOT/'results'/'reported.csv').read_text().splitlines()
    bad = lines[1].split(',')
    bad[3] = 'no_such_method'
    (tmp_path/'r.csv').write_text('\n'.join([lines[0], ','.join(bad)]) + '\n')
    p = subprocess.run([sys.executable, str(ROOT/'tools'/'check_reported.py'), str(tmp_path/'r.csv')], capture_output=True, text=True)
    assert p.returncode == 1 and 'no_such_method' in p.stdout, p.stdout
