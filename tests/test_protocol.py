"""The runner's protocol at each method's authors' preset equals the authors' table (issue: replication-ready protocol).

Each method states its authors' protocol item by item (`PROTOCOL`, passed to `register_method`); `resolve_protocol`
builds what a run would build and reads the same items off it. A change to the data settings, the schedule, the
selection rule or the scoring configuration of a method shows up here as the item that differs."""
import json
import pytest

from vqflow_nb.method import method_spec
from vqflow_nb.protocol import compare_protocol
from vqflow_nb.run import resolve_protocol, protocol_doc
from vqflow_nb.core import project_root


@pytest.mark.parametrize('method', ['vqflow', 'hgad', 'hvqtrans'])
def test_authors_preset_resolves_to_the_authors_protocol(method):
    spec = method_spec(method)
    ours = resolve_protocol(method=method, backbone=spec.authors['backbone'], dataset='mvtec_ad', small=(method == 'vqflow'))
    t = compare_protocol(method, ours)
    assert t.same.all(), t[~t.same][['authors', 'ours']].to_string()
    assert set(t.index) == set(ours), set(ours) ^ set(t.index)   # every item the runner resolves is in the authors' table


def test_run_parameters_change_the_protocol():
    spec = method_spec('hgad')
    p = resolve_protocol(method='hgad', backbone=spec.authors['backbone'], mask_size=512, epochs=20)
    t = compare_protocol('hgad', p)
    assert sorted(t.index[~t.same]) == ['epochs', 'mask_size', 'smoothing', 'validation'], t[~t.same]
    assert p['smoothing'] == 8.0   # sigma 4 px at 256 is 8 px at 512


def test_protocol_doc_is_current():
    doc = (project_root()/'docs'/'protocol.md').read_text()
    assert doc.startswith(protocol_doc()), 'docs/protocol.md is stale: python -c "from vqflow_nb.run import protocol_doc; print(protocol_doc())" > docs/protocol.md'
