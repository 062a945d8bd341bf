"Fast tests of the installed vqflow_nb.flows: inverse, autograd log-det, freia 0.2 equivalence, sizes."
import math

import numpy as np
import pytest
import torch

from vqflow_nb.flows import (AllInOneBlock, FusionCoupling, SequenceFlow, conditional_flow, count_params,
                             hgad_flow, positional_encoding_2d, subnet_conv_ln, subnet_fc, vqflow_flows)


def _randomize(m, std=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad: p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


def _logdet(f, x):
    J = torch.autograd.functional.jacobian(lambda xi: f(xi[None])[0], x, vectorize=True)
    return torch.linalg.slogdet(J.reshape(x.numel(), x.numel()))[1]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def test_positional_encoding():
    pe = positional_encoding_2d(8, 3, 4)
    assert pe.shape == (8, 3, 4) and pe.abs().max() <= 1
    # channel 0: sin(x), channel 1: cos(x) (omega_0 = 1); channel 4: sin(y)
    assert torch.allclose(pe[0, 1], torch.sin(torch.arange(4.0)))
    assert torch.allclose(pe[1, 2], torch.cos(torch.arange(4.0)))
    assert torch.allclose(pe[4, :, 0], torch.sin(torch.arange(3.0)))
    with pytest.raises(ValueError, match="multiple of 4"):
        positional_encoding_2d(6, 2, 2)


@pytest.mark.parametrize("kind", ["map", "vec"])
@pytest.mark.parametrize("soft", [False, True])
def test_block_inverse_and_logdet(kind, soft):
    torch.manual_seed(0)
    if kind == "map":
        blk = AllInOneBlock(5, 2, subnet_conv_ln, affine_clamping=1.9, permute_soft=soft, seed=0)
        x, c = torch.randn(2, 5, 3, 2), torch.randn(2, 2, 3, 2)
    else:
        blk = AllInOneBlock(5, 3, subnet_fc, affine_clamping=1.9, permute_soft=soft, seed=0)
        x, c = torch.randn(4, 5), torch.randn(4, 3)
    blk = _randomize(blk).double(); x, c = x.double(), c.double()
    z, ld = blk(x, c)
    xr, ldr = blk(z, c, rev=True)
    assert ld.shape == (x.shape[0],)
    eps = 1e-6 if soft else 1e-10  # soft W is float32-rounded, like freia's
    assert (xr - x).abs().max() < eps and (ld + ldr).abs().max() < eps
    for i in range(x.shape[0]):
        ref = _logdet(lambda xi: blk(xi, c[i:i + 1])[0], x[i])
        assert abs(ref - ld[i]) < eps


def test_sequence_and_float32_inverse():
    flow = conditional_flow(8, 4, 3, "conv_ln", seed=1)
    x, c = torch.randn(2, 8, 12, 10), torch.randn(2, 4, 12, 10)
    z, ld = flow(x, c)
    xr, ldr = flow(z, c, rev=True)
    assert torch.allclose(xr, x, atol=1e-4) and torch.allclose(ld, -ldr, atol=1e-4)
    assert isinstance(flow, SequenceFlow) and len(flow.blocks) == 3


def test_fusion_inverse_and_logdet():
    fc = _randomize(FusionCoupling([4, 6, 2], cond_channels=3, clamp=1.9, seed=0)).double()
    xs = [torch.randn(1, 4, 4, 4), torch.randn(1, 6, 2, 2), torch.randn(1, 2, 1, 1)]
    xs = [x.double() for x in xs]; c = torch.randn(1, 3, 1, 1, dtype=torch.float64)
    zs, ld = fc(xs, c)
    xr, ldr = fc(zs, c, rev=True)
    assert max((a - b).abs().max() for a, b in zip(xr, xs)) < 1e-10 and (ld + ldr).abs().max() < 1e-10
    shapes = [x.shape[1:] for x in xs]; sizes = [math.prod(s) for s in shapes]

    def f(flat):
        parts = [p.reshape(1, *s) for p, s in zip(torch.split(flat[0], sizes), shapes)]
        return torch.cat([z.reshape(1, -1) for z in fc(parts, c)[0]], 1)
    flat = torch.cat([x.reshape(1, -1) for x in xs], 1)[0]
    assert abs(_logdet(f, flat) - ld[0]) < 1e-8


def test_matches_freia_0_2():
    Fm = pytest.importorskip("FrEIA.modules")
    torch.manual_seed(0)
    np.random.seed(5)
    theirs = Fm.AllInOneBlock([(6, 4, 3)], dims_c=[(2, 4, 3)], subnet_constructor=subnet_conv_ln, affine_clamping=1.9)
    np.random.seed(5)
    ours = AllInOneBlock(6, 2, subnet_conv_ln, affine_clamping=1.9)
    assert torch.equal(ours.perm_matrix(), theirs.w_perm.reshape(6, 6))
    _randomize(theirs)
    ours.load_freia_state_dict(theirs.state_dict())
    x, c = torch.randn(3, 6, 4, 3), torch.randn(3, 2, 4, 3)
    (y_f,), ld_f = theirs((x,), c=[c])
    y, ld = ours(x, c)
    assert (y - y_f).abs().max() < 1e-6 and (ld - ld_f).abs().max() < 1e-5
    theirs = Fm.AllInOneBlock([(7,)], dims_c=[(3,)], subnet_constructor=subnet_fc, affine_clamping=1.9, permute_soft=True)
    ours = AllInOneBlock(7, 3, subnet_fc, affine_clamping=1.9, permute_soft=True, seed=0)
    _randomize(theirs)
    ours.load_freia_state_dict(theirs.state_dict())
    x, c = torch.randn(10, 7), torch.randn(10, 3)
    (y_f,), ld_f = theirs((x,), c=[c])
    y, ld = ours(x, c)
    assert (y - y_f).abs().max() < 1e-6 and (ld - ld_f).abs().max() < 1e-5


def test_vqflow_parameter_count():
    with torch.device("meta"):
        parallel, fusion = vqflow_flows(seed=0)
        hg = hgad_flow(seed=0)
    n = sum(count_params(f) for f in parallel) + count_params(fusion)

    def conv(ci, co): return ci * co * 9 + co

    def block(C, cc=1088):
        cin = C - C // 2 + cc
        return conv(cin, cin) + 2 * cin + conv(cin, 2 * (C // 2)) + 2 * C

    cf = 64 + 128 + 256 + 1088
    fusion_subnet = conv(cf, cf // 4) + 2 * (cf // 4) + conv(cf // 4, 448) + 2 * sum(conv(h, h) for h in (64, 128, 256))
    assert n == sum(d * block(C) for C, d in zip((128, 256, 512), (2, 5, 8))) + 2 * fusion_subnet
    assert 295e6 < n < 310e6  # the reference is "about 308 M" for VQ-Flow's flows
    assert count_params(hg) > 0


def test_errors():
    blk = AllInOneBlock(4, 2, subnet_conv_ln)
    with pytest.raises(ValueError, match="spatial size"):
        blk(torch.randn(1, 4, 3, 3), torch.randn(1, 2, 1, 1))
    with pytest.raises(ValueError, match="no condition"):
        blk(torch.randn(1, 4, 3, 3))
    fc = FusionCoupling([4, 4], 2)
    with pytest.raises(ValueError, match="coarsest"):
        fc([torch.randn(1, 4, 4, 4), torch.randn(1, 4, 2, 2)], torch.randn(1, 2, 4, 4))


def test_head_clamp_variant():
    blk = _randomize(AllInOneBlock(6, 2, subnet_fc, affine_clamping=1.9, seed=0, clamp_variant="freia_head")).double()
    x, c = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    z, ld = blk(x, c)
    xr, ldr = blk(z, c, rev=True)
    assert (xr - x).abs().max() < 1e-10 and (ld + ldr).abs().max() < 1e-10
    assert abs(_logdet(lambda xi: blk(xi, c[:1])[0], x[0]) - ld[0]) < 1e-10
    with pytest.raises(ValueError, match="clamp_variant"):
        AllInOneBlock(6, clamp_variant="tanh")
