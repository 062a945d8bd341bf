"""The ablation switches of VQ-Flow (nbs/10_vqflow.ipynb "Ablation switches", nbs/05_codebooks.ipynb `CPC`)."""
import math
import pytest
import torch

from vqflow_nb.core import seed_everything, codebook_perplexity
from vqflow_nb.codebooks import CPC, EMACodebook, kmeans
from vqflow_nb.flows import positional_encoding_2d
from vqflow_nb.vqflow import VQFlow, VQFlowConfig, ABLATIONS, flow_nll

CH = [8, 12, 16, 20]
TINY = dict(depths=(1, 1, 2), proto_dim=16, pe_dim=8, k_cpc=4, k_cspc=8, seed=0)


def feats(b=4, g=None):
    return [torch.randn(b, 8, 32, 32, generator=g), torch.randn(b, 12, 16, 16, generator=g),
            torch.randn(b, 16, 8, 8, generator=g), torch.randn(b, 20, 4, 4, generator=g)]


@pytest.mark.parametrize('name', list(ABLATIONS))
def test_every_configuration_trains(name):
    "One optimisation step per configuration: finite loss, gradients on every flow parameter, usage logged if quantised."
    seed_everything(0)
    m = VQFlow(VQFlowConfig.ablation(name, CH, **TINY)).train()
    opt = torch.optim.Adam(m.parameters(), 1e-3)
    for _ in range(3):
        parts = m.loss(feats())
        opt.zero_grad(); parts['loss'].backward(); opt.step()
    assert torch.isfinite(parts['loss'])
    assert all(p.grad is not None for n, p in m.named_parameters() if n.startswith('flows'))
    m.on_epoch_end(0)
    quantised = m.codebooks is not None and m.codebooks.cpc.codebook is not None
    assert len(m.usage_log) == int(quantised)
    assert ('cpc_batch_ppl' in parts) == quantised


def test_plain_is_msflow():
    "No codebook, no concept, no prior; PE conditions of pe_dim channels; the loss is the flows' NLL computed by hand."
    seed_everything(1)
    m = VQFlow(VQFlowConfig.ablation('plain', CH, **TINY))
    assert m.codebooks is None and m.prior is None
    assert not any(isinstance(x, EMACodebook) for x in m.modules())
    f = feats(3)
    xs = [m.pool(x) for x in f[:3]]
    zs, ld = [], torch.zeros(3)
    for flow, x in zip(m.flows, xs):
        pe = positional_encoding_2d(8, *x.shape[-2:]).expand(3, -1, -1, -1)
        z, l = flow(x, pe); zs.append(z); ld = ld + l
    zs, l = m.fusion(zs)
    want = flow_nll(zs, ld + l).mean()
    got = m.loss(f)
    assert torch.allclose(got['loss'], want, rtol=1e-5) and got['commit'] == 0


def test_concept_conditions_on_s():
    "condition='concept': no codebooks, p = s in the condition, pattern = h (residual mode), the prior reads s."
    seed_everything(2)
    m = VQFlow(VQFlowConfig.ablation('concept', CH, **{**TINY, 'mixed_gaussian': True})).eval()
    f = feats(2)
    with torch.no_grad():
        xs, cb = m.conditions(f)
        h = m.codebooks.cspcs[0]._local(xs[0], m.codebooks.semantic_encoder(f[3]))
        out = m(f)
        zs = [flow(x, c)[0] for flow, x, c in zip(m.flows, xs, cb['conds'])]
        zs = m.fusion(m.prior(zs, cb['s'])[0], cb['fusion_cond'])[0]
    assert torch.equal(cb['proto'], cb['s'])
    assert cb['conds'][0].shape[1] == m.cfg.cond_channels == 2 * 16 + 8
    assert torch.allclose(cb['conds'][0][:, :24], h)
    assert torch.equal(cb['conds'][0][:, 24:], cb['s'][:, :, None, None].expand(-1, -1, 16, 16))
    for a, b in zip(out['zs'], zs): assert torch.allclose(a, b, atol=1e-5)


def test_default_is_released():
    "The defaults are the README command's: codebooks quantise, randn CPC codes, prior in the 'code' variant."
    c = VQFlowConfig()
    assert (c.condition, c.mixed_gaussian, c.variant, c.cpc_init, c.reassign, c.reassign_noise, c.reassign_sync) == \
        ('vq', True, 'code', 'randn', False, 0., False)
    m = VQFlow(VQFlowConfig.small(CH, **TINY))
    assert 'codebooks.cpc.initialised' not in m.state_dict()
    assert len(m.codebooks.codebooks()) == 5


def test_kmeans_init_puts_codes_on_data():
    "The codes become the k-means centres of the collected concept vectors: each is the mean of its cluster."
    seed_everything(3)
    cpc = CPC(in_channels=20, dim=6, num_codes=3, hidden=12, init='kmeans', init_vectors=12).train()
    centres = torch.randn(3, 20) * 5
    batch = lambda: (centres[torch.randint(3, (6,))] + 0.1 * torch.randn(6, 20))[:, :, None, None].expand(-1, -1, 2, 2)
    with torch.no_grad():
        s1 = cpc.semantic_mlp(batch().mean((2, 3))); assert not cpc._kmeans_ready(s1)   # 6 < 12 collected
        s2 = cpc.semantic_mlp(batch().mean((2, 3)))
        x = torch.cat([s1, s2])
        torch.manual_seed(7); want, a = kmeans(x, 3, 20)
        torch.manual_seed(7); assert cpc._kmeans_ready(s2)
    assert bool(cpc.initialised)
    assert torch.allclose(cpc.codebook.codes, want)
    for k in range(3):                                    # Lloyd's fixed point: every used code is its cluster's mean
        if (a == k).any(): assert torch.allclose(cpc.codebook.codes[k], x[a == k].mean(0), atol=1e-5)
    assert torch.equal(cpc.codebook.cluster_size, torch.ones(3))


def test_kmeans_init_in_training_avoids_the_blow_up():
    "Through VQFlow: after the first batches every CPC code is as close to the concept vectors as the data is spread."
    seed_everything(4)
    for init in ('randn', 'kmeans'):
        m = VQFlow(VQFlowConfig.small(CH, **{**TINY, 'cpc_init': init, 'cpc_init_vectors': 8})).train()
        for _ in range(3): m.loss(feats())
        with torch.no_grad(): s = m.conditions(feats())[1]['s']
        far = torch.cdist(m.codebooks.cpc.codebook.codes, s).min(1).values.max()
        if init == 'randn': assert far > 1e3           # the released codes the first batch missed are thrown far out
        else: assert far < 10 * s.norm(dim=1).max()


def test_reassign_revives_dead_codes():
    """Dead CPC codes (thrown out by the first-batch blow-up) are copied back among the data; only with synced EMA statistics
    do the copies survive the following EMA steps (the released `reAssign` overwrites `embed` alone, which the next step undoes)."""
    far = {}
    for sync in (False, True):
        seed_everything(5)
        m = VQFlow(VQFlowConfig.small(CH, **{**TINY, 'reassign': True, 'reassign_sync': sync,
                                            'reassign_noise': 0.1 if sync else 0.})).train()
        g = torch.Generator().manual_seed(0)
        data = [feats(8, g) for _ in range(4)]
        for f in data: m.loss(f)                       # randn codes: the codes the first batch missed blow up
        book = m.codebooks.cpc.codebook
        dead = (book.usage() == 0).nonzero().flatten()
        with torch.no_grad(): s = m.conditions(data[0])[1]['s']
        scale = s.norm(dim=1).max()
        assert len(dead) >= 2 and (torch.cdist(book.codes[dead], s).min(1).values > 1e3 * scale).all()
        m.on_epoch_end(0)
        assert m.usage_log[0]['cpc_reassigned'] == min(len(dead), 2)        # at most K/2 per epoch
        assert (torch.cdist(book.codes[dead[:2]], s).min(1).values < 100 * scale).all()   # copied back among the data
        for f in data: m.loss(f)                       # four more EMA steps
        far[sync] = torch.cdist(book.codes[dead[:2]], s).min(1).values / scale
    assert (far[False] > 1e3).all()                    # released: thrown out again
    assert (far[True] < 100).all()                     # synced statistics: still among the data


def test_batch_perplexity_logged():
    "The logged part is exp(entropy) of the batch's prototype counts (eval mode: no EMA step between the two passes)."
    seed_everything(6)
    m = VQFlow(VQFlowConfig.small(CH, **{**TINY, 'k_cpc': 8}))
    for _ in range(2): m.train().loss(feats(8))
    m.eval(); f = feats(8)
    parts = m.loss(f)
    idx = m(f)['proto_index']
    assert parts['cpc_batch_ppl'] == codebook_perplexity(torch.bincount(idx, minlength=8))
    assert 1.0 <= parts['cpc_batch_ppl'] <= 8
