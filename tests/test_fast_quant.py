"The quantised-condition convolution (`flows.conv_quantised`, `QuantCond`) against the dense convolution, float64."
from dataclasses import replace

import pytest
import torch

from unittest.mock import patch

from vqflow_nb.flows import QUANT_CONV_LIMITS, BroadcastCond, QuantCond, conv_quantised


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _st_pattern(h, pe, vec, codes, index):
    "The CSPC's residual pattern anchor + (r + (q - r).detach()), plus (q - q.detach()) so that dense gives codes a gradient."
    B, _, H, W = h.shape
    anchor = torch.cat([pe[None].expand(B, -1, -1, -1), vec[:, :, None, None].expand(-1, -1, H, W)], 1)
    r, q = h - anchor, codes[index].permute(0, 3, 1, 2)
    return anchor + (r + (q - r).detach()), (q - q.detach())


@pytest.mark.parametrize("B,H,W,K,ce,cv,cx,co,k,pad", [(2, 5, 4, 7, 3, 4, 2, 6, 3, 1), (3, 6, 6, 5, 2, 3, 4, 5, 3, 1),
                                                      (2, 4, 5, 3, 2, 2, 3, 4, 1, 0), (1, 7, 3, 4, 1, 2, 2, 3, 5, 2)])
def test_conv_quantised_equals_dense(B, H, W, K, ce, cv, cx, co, k, pad):
    "Values and the gradients of x, the codebook input h, the prototype, the codebook, the weight and bias."
    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(cx + ce + 2 * cv, co, k, 1, pad).double()
    with torch.no_grad(): conv.weight.normal_(generator=g); conv.bias.normal_(generator=g)
    leaf = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()
    x, h, vec, codes = leaf(B, cx, H, W), leaf(B, ce + cv, H, W), leaf(B, cv), leaf(K, ce + cv)
    pe, index = torch.randn(ce, H, W, generator=g, dtype=torch.float64), torch.randint(K, (B, H, W), generator=g)
    pat, code_grad = _st_pattern(h, pe, vec, codes, index)
    ref = conv(torch.cat([x, BroadcastCond(pat + code_grad, vec).dense()], 1))
    fast = conv_quantised(conv, x, QuantCond(pat, index, codes, pe, vec), min_positions_per_code=0, min_pattern_channels=0)
    assert (fast - ref).abs().max() < 1e-10
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ins = [x, h, vec, codes, conv.weight, conv.bias]
    for name, a, b in zip(['x', 'h', 'vec', 'codes', 'weight', 'bias'], torch.autograd.grad(ref, ins, dy, retain_graph=True),
                          torch.autograd.grad(fast, ins, dy, retain_graph=True)):
        assert (a - b).abs().max() < 1e-9 * (1 + a.abs().max()), name
    # without a codebook gradient (the authors' EMA buffer) the rule returns none and the rest is unchanged
    codes.requires_grad_(False)
    fast = conv_quantised(conv, x, QuantCond(pat, index, codes, pe, vec), min_positions_per_code=0, min_pattern_channels=0)
    for a, b in zip(torch.autograd.grad(ref, ins[:3], dy), torch.autograd.grad(fast, ins[:3], dy)):
        assert (a - b).abs().max() < 1e-9 * (1 + a.abs().max())


def test_conv_quantised_fallback_and_errors():
    "Few positions per code: the broadcast path (same values); wrong widths and strided convolutions are refused."
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(2 + 3 + 2 * 4, 5, 3, 1, 1).double()
    x, h = torch.randn(2, 2, 3, 3, generator=g, dtype=torch.float64), torch.randn(2, 7, 3, 3, generator=g, dtype=torch.float64)
    vec, codes = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(50, 7, generator=g, dtype=torch.float64)
    pe, index = torch.randn(3, 3, 3, generator=g, dtype=torch.float64), torch.randint(50, (2, 3, 3), generator=g)
    pat = _st_pattern(h, pe, vec, codes, index)[0]
    q = QuantCond(pat, index, codes, pe, vec)
    ref = conv(torch.cat([x, q.dense()], 1))
    assert q.shape == (2, 11, 3, 3)
    for m, c in ((2., 0), (0., 0), (0., 128)):   # 18 positions < 2 x 50 codes: broadcast; gather; 7 < 128 channels: dense
        assert (conv_quantised(conv, x, q, min_positions_per_code=m, min_pattern_channels=c) - ref).abs().max() < 1e-10
    assert torch.equal(conv_quantised(conv, x, q), ref)   # the default limits: a 7-channel pattern takes the dense path itself
    with pytest.raises(ValueError, match="channels"): conv_quantised(conv, x[:, :1], q)
    strided = torch.nn.Conv2d(13, 5, 3, 2, 1).double()
    with pytest.raises(ValueError, match="stride 1"): conv_quantised(strided, x, q)


def test_vqflow_quant_conv_matches_dense():
    "The whole small VQ-Flow (training mode, EMA steps included): same loss, gradients and buffers with quant_conv on."
    from vqflow_nb.vqflow import VQFlow, VQFlowConfig
    with patch.dict(QUANT_CONV_LIMITS, min_positions_per_code=0., min_pattern_channels=0): _vqflow_quant_vs_dense()


def _vqflow_quant_vs_dense():
    from vqflow_nb.vqflow import VQFlow, VQFlowConfig
    torch.manual_seed(0)
    cfg = VQFlowConfig.small([8, 12, 16, 20], seed=0, quant_conv='all')
    m_d, m_q = VQFlow(replace(cfg, quant_conv='none')).double(), VQFlow(cfg).double()
    m_q.load_state_dict(m_d.state_dict())
    g = torch.Generator().manual_seed(2)
    feats = [torch.randn(4, c, s, s, generator=g, dtype=torch.float64) for c, s in zip([8, 12, 16, 20], [32, 16, 8, 4])]
    nll = lambda o: sum(0.5 * z.pow(2).sum((1, 2, 3)) for z in o['zs']).sub(o['log_det']).mean() + o['commit']
    ld, lq = nll(m_d(feats)), nll(m_q(feats))
    assert abs(float(lq - ld)) < 1e-9 * abs(float(ld))
    gd, gq = torch.autograd.grad(ld, list(m_d.parameters())), torch.autograd.grad(lq, list(m_q.parameters()))
    gmax = max(float(a.abs().max()) for a in gd)
    assert max(float((a - b).abs().max()) for a, b in zip(gd, gq)) < 1e-10 * gmax
    _, cb = m_q.conditions(feats)
    assert all(isinstance(m_q._flow_cond(c, cb, l), QuantCond) for l, c in enumerate(cb['conds']))
    assert isinstance(m_q._flow_cond(cb['fusion_cond'], cb, -1), QuantCond)
    # 'cpu' (the default) takes it on this CPU; 'none' and other conditions keep the dense tensor
    assert VQFlowConfig().quant_conv == 'cpu'
    m_c = VQFlow(replace(cfg, quant_conv='cpu')).double()
    assert isinstance(m_c._flow_cond(cb['conds'][0], cb, 0), QuantCond)
    assert m_d._flow_cond(cb['conds'][0], cb, 0) is cb['conds'][0]


def test_vqflow_quant_conv_with_checkpointing():
    "Activation checkpointing of the flow blocks recomputes the quantised path: same loss and gradients."
    from vqflow_nb.vqflow import VQFlow, VQFlowConfig
    with patch.dict(QUANT_CONV_LIMITS, min_positions_per_code=0., min_pattern_channels=0):
        torch.manual_seed(0)
        cfg = VQFlowConfig.small([8, 12, 16, 20], seed=0, quant_conv='all', depths=(1, 1, 1))
        a, b = VQFlow(cfg).double().eval(), VQFlow(replace(cfg, checkpoint=True)).double().eval()
        b.load_state_dict(a.state_dict())
        g = torch.Generator().manual_seed(3)
        feats = [torch.randn(2, c, s, s, generator=g, dtype=torch.float64) for c, s in zip([8, 12, 16, 20], [32, 16, 8, 4])]
        la, lb = (sum(z.pow(2).sum() for z in m(feats)['zs']) for m in (a, b))
        ga, gb = torch.autograd.grad(la, list(a.parameters())), torch.autograd.grad(lb, list(b.parameters()))
        assert torch.allclose(la, lb) and all(torch.allclose(x, y) for x, y in zip(ga, gb))
