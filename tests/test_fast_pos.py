"HGAD's positional condition once per position (`flows.PosCond`, `FCSubnet`) against the repeated condition, float64."
from dataclasses import replace

import pytest
import torch

from vqflow_nb.flows import PosCond, subnet_fc


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.mark.parametrize("B,n,cx,P,co", [(3, 5, 4, 6, 8), (1, 7, 3, 2, 4), (4, 1, 2, 3, 2)])
def test_fc_subnet_pos_cond_equals_dense(B, n, cx, P, co):
    "Values and the gradients of the input, the encoding and every weight and bias."
    g = torch.Generator().manual_seed(0)
    net = subnet_fc(cx + P, co).double()
    x = torch.randn(B * n, cx, generator=g, dtype=torch.float64, requires_grad=True)
    pe = torch.randn(n, P, generator=g, dtype=torch.float64, requires_grad=True)
    ref, fast = net(torch.cat([x, PosCond(pe, B).dense()], 1)), net(x, PosCond(pe, B))
    assert (fast - ref).abs().max() < 1e-12
    dy = torch.randn(ref.shape, generator=g, dtype=torch.float64)
    ins = [x, pe, *net.parameters()]
    for a, b in zip(torch.autograd.grad(ref, ins, dy), torch.autograd.grad(fast, ins, dy)):
        assert (a - b).abs().max() < 1e-11 * (1 + a.abs().max())
    # rows are (image, position): image b's rows use pe in order
    assert torch.equal(PosCond(pe, B).dense()[(B - 1) * n:].detach(), pe.detach())


def test_hgad_pos_broadcast_matches_dense():
    "The small HGAD in float64: same stage-2 loss, parameter gradients and scores with pos_broadcast on and off."
    from vqflow_nb.hgad import HGAD, HGADConfig
    torch.manual_seed(0)
    cfg = HGADConfig.small((6, 8), n_classes=3, seed=0, pos_broadcast=True)
    a, b = HGAD(replace(cfg, pos_broadcast=False)).double(), HGAD(cfg).double()
    b.load_state_dict(a.state_dict())
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(4, c, s, s, generator=g, dtype=torch.float64) for c, s in zip((6, 8), (6, 3))]
    batch = dict(cls_index=torch.tensor([0, 2, 1, 2]))
    a.passes_done.fill_(10 ** 6); b.passes_done.fill_(10 ** 6)   # stage 2: every loss term
    la, lb = a.loss(feats, batch)['loss'], b.loss(feats, batch)['loss']
    assert abs(float(la - lb)) < 1e-10 * abs(float(la))
    ga, gb = torch.autograd.grad(la, list(a.parameters())), torch.autograd.grad(lb, list(b.parameters()))
    gmax = max(float(t.abs().max()) for t in ga)
    assert max(float((x - y).abs().max()) for x, y in zip(ga, gb)) < 1e-10 * gmax
    sa, sb = a.eval().score(feats, batch), b.eval().score(feats, batch)
    for k, v in sa.parts.items():
        if torch.is_floating_point(v): assert (v - sb.parts[k]).abs().max() < 1e-9, k
    assert HGADConfig().pos_broadcast
