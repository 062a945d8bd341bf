"Every committed run: the common record schema, its executed notebook beside it, and no result at chance reported as one."
import json, subprocess
from pathlib import Path

import pytest

from vqflow_nb.record import check_metrics

ROOT = Path(__file__).resolve().parents[1]

def committed_runs() -> list:
    out = subprocess.run(['git', 'ls-files', 'results'], cwd=ROOT, capture_output=True, text=True)
    if out.returncode: pytest.skip('not a git checkout')
    return sorted(ROOT/Path(f).parent for f in out.stdout.split() if f.endswith('/metrics.json') and '/benchmarks/' not in f)

def test_committed_runs_have_schema_and_notebook():
    runs = committed_runs()
    for d in runs:
        m = check_metrics(json.loads((d/'metrics.json').read_text()), str(d.relative_to(ROOT)))
        assert (d/'run.ipynb').exists(), f'{d.relative_to(ROOT)}: no executed notebook beside metrics.json'
        assert (d/'complete.json').exists(), f'{d.relative_to(ROOT)}: not finished (no complete.json)'
        assert d.parts[-3:-1] == (m['dataset'], m['method']), d   # results/<dataset>/<method>/<run id>

def test_the_check_fails_on_a_bad_record(tmp_path):
    with pytest.raises(ValueError, match='missing'): check_metrics(dict(dataset='x', method='y', last={}), 'x')
