"Mixed precision (Schedule.precision): bf16 autocast on CPU keeps the flows' couplings and log-dets in float32 and trains."
import copy

import pytest
import torch

from vqflow_nb.flows import vqflow_flows
from vqflow_nb.train import Amp, Schedule, _step, fit, make_optimizer, run_spec
from vqflow_nb.vqflow import VQFlow, VQFlowConfig

CH, HW = (8, 16, 32, 64), (16, 8, 4, 2)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _feats(n, g, batch=4):
    return [[torch.randn(batch, c, s, s, generator=g) for c, s in zip(CH, HW)] for _ in range(n)]


def test_amp_options():
    assert Amp('fp32', 'cpu').scaler is None and Amp('bf16', 'cpu').dtype == torch.bfloat16
    with pytest.raises(ValueError, match='CUDA'): Amp('fp16', 'cpu')
    with pytest.raises(ValueError, match='expected'): Amp('half', 'cpu')
    assert Schedule().precision == 'fp32'


def test_flows_bf16_close_to_fp32():
    "Under bf16 autocast the subnets run in bf16 but latents and log-dets come out float32 and close to fp32."
    torch.manual_seed(0)
    par, fus = vqflow_flows(CH[:3], cond_channels=12, depths=(1, 2, 2), seed=0)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, c, s, s, generator=g) for c, s in zip(CH[:3], HW[:3])]
    cs = [torch.randn(2, 12, s, s, generator=g) for s in HW[:3]]
    def run():
        zs, lds = [], []
        for f, x, c in zip(par, xs, cs):
            z, ld = f(x, c); zs.append(z); lds.append(ld)
        zs, ld = fus(zs, cs[-1])
        return zs, sum(lds) + ld
    z32, ld32 = run()
    with torch.autocast('cpu', dtype=torch.bfloat16): z16, ld16 = run()
    assert all(z.dtype == torch.float32 for z in z16) and ld16.dtype == torch.float32
    for a, b in zip(z16, z32):
        assert (a - b).abs().max() <= 3e-2 * b.abs().max()   # bf16 has 8 mantissa bits (~0.4 % per rounding)
    assert (ld16 - ld32).abs().max() <= 3e-2 * ld32.abs().max() + 1e-3
    # and the bf16 pass really is a different computation (the test would otherwise prove nothing)
    assert any(not torch.equal(a, b) for a, b in zip(z16, z32))


def test_vqflow_bf16_loss_close_same_state():
    "Full small VQ-Flow on CPU, from the same trained state: the bf16 loss is float32 and within 5 % of fp32's."
    torch.manual_seed(0)
    m = VQFlow(VQFlowConfig.small(list(CH), seed=0, depths=(1, 2, 2)))
    sch, g = Schedule(lr=1e-4, clip_grad=2.0), torch.Generator().manual_seed(0)
    opt = make_optimizer(m.parameters(), sch)
    for f in _feats(3, g): _step(m, dict(feats=f), opt, sch, list(m.parameters()))
    f = _feats(1, g)[0]
    m16, m32 = copy.deepcopy(m), copy.deepcopy(m)
    with torch.no_grad():
        l32 = float(m32.loss(f)['loss'])
        with Amp('bf16', 'cpu').autocast(): l16 = m16.loss(f)['loss']
    assert l16.dtype == torch.float32 and abs(float(l16) - l32) <= 0.05 * abs(l32), (float(l16), l32)
    assert float(l16) != l32   # bf16 really ran


def test_vqflow_bf16_training_tracks_fp32():
    """Ten steps in bf16 follow the fp32 losses step by step (within 3 %). Without the mixed-Gaussian prior: with it,
    random features and the prior's near-zero initial scales make both runs spike by orders of magnitude."""
    torch.manual_seed(0)
    m32 = VQFlow(VQFlowConfig.small(list(CH), seed=0, depths=(1, 2, 2), mixed_gaussian=False)); m16 = copy.deepcopy(m32)
    sch = Schedule(lr=1e-4, clip_grad=2.0)
    runs = {}
    for name, m, amp in (('fp32', m32, None), ('bf16', m16, Amp('bf16', 'cpu'))):
        opt, g = make_optimizer(m.parameters(), sch), torch.Generator().manual_seed(0)
        runs[name] = [float(_step(m, dict(feats=f), opt, sch, list(m.parameters()), amp=amp)['loss'].detach()) for f in _feats(10, g)]
    assert all(torch.isfinite(torch.tensor(runs['bf16'])))
    for a, b in zip(runs['bf16'], runs['fp32']): assert abs(a - b) <= 0.03 * abs(b), runs
    assert runs['bf16'][-1] < runs['bf16'][0]
    assert not torch.equal(next(m16.flows.parameters()), next(m32.flows.parameters()))   # bf16 really ran


def test_fit_bf16_records_precision(tmp_path):
    "`fit(precision='bf16')` trains, its run identity names the precision, and fp32 runs keep their old identity."
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    store = [dict(feats=[f[0] for f in fs], label=0) for fs in _feats(8, g, batch=1)]
    m = VQFlow(VQFlowConfig.small(list(CH), seed=0, depths=(1, 1, 1)))
    res = fit(m, store, None, out_dir=tmp_path, epochs=2, batch_size=4, progress=False, precision='bf16', warmup_epochs=0)
    assert len(res.history) == 2 and all(torch.isfinite(torch.tensor(h['loss'])) for h in res.history)
    ck = torch.load(tmp_path / 'checkpoints' / 'last.pt', weights_only=False)
    assert ck['run_spec']['schedule']['precision'] == 'bf16'
    assert 'precision' not in run_spec(m, Schedule(), 0, store)['schedule']
