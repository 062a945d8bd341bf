"""The data sets' own numbers reach the run record: a PatchCore run (one pass, small images) through `run_experiment`
on a Real-IAD fixture and on an MVTec AD 2 fixture (in their own layouts) writes `dataset_protocol` into metrics.json,
the MVTec AD 2 SegF1 threshold taken from the validation split the trained model scored."""
import json
import numpy as np
import pytest

from vqflow_nb.run import run_experiment
from vqflow_nb.synthetic import write_fixture


@pytest.mark.parametrize('dataset, keys', [('realiad', {'s_auroc', 's_ap', 's_f1max', 'n_samples'}),
                                           ('mvtec_ad2', {'aupro05', 'seg_f1', 'seg_threshold'})])
def test_run_records_the_dataset_protocol(tmp_path, dataset, keys):
    root = write_fixture(tmp_path/'data', dataset)
    run = run_experiment(dataset, data_root=str(root), method='patchcore', image_size=64, out_dir=str(tmp_path/'run'),
                         cache_dir=str(tmp_path/'cache'), progress=False)
    m = json.loads((tmp_path/'run'/'metrics.json').read_text())
    got = m['dataset_protocol']
    assert set(got) == keys, got
    classes = set(m['classes'])
    for k in keys - {'n_samples', 'seg_threshold'}:
        assert set(got[k]) == classes | {'mean'} and all(0 <= v <= 1 for v in got[k].values()), (k, got[k])
    if dataset == 'mvtec_ad2':   # the threshold (mean + 3 std of the validation maps) exists for every class
        assert all(np.isfinite(v) for v in got['seg_threshold'].values())
