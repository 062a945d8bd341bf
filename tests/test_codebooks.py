"""Fast checks of the installed `vqflow_nb.codebooks` and `vqflow_nb.prior` modules."""
import math

import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from vqflow_nb.codebooks import CPC, CSPC, EMACodebook, HierarchicalCodebooks, SemanticEncoder, contingency, purity
from vqflow_nb.prior import MixedGaussianPrior, mixture_log_prob


def test_ema_codebook_nearest_straight_through_and_commitment():
    torch.manual_seed(0)
    vq = EMACodebook(16, 8)
    x = torch.randn(3, 4, 8, requires_grad=True)
    brute = torch.cdist(x.detach().reshape(-1, 8), vq.codes).argmin(1).view(3, 4)
    q, ind, commit = vq(x)
    assert torch.equal(ind, brute)
    assert list(vq.parameters()) == []
    w = torch.randn_like(x)
    (q * w).sum().backward()
    assert torch.equal(x.grad, w)
    vq.eval()
    on_codes = vq.codes[torch.tensor([[1, 2], [3, 15]])].clone()
    _, ind, commit = vq(on_codes)
    assert commit.item() == 0 and torch.equal(ind, torch.tensor([[1, 2], [3, 15]]))
    with pytest.raises(ValueError, match='expected dim=8'):
        vq(torch.randn(2, 7))


def test_ema_converges_to_cluster_means():
    torch.manual_seed(1)
    means = torch.randn(4, 6) * 4
    def sample(n): return means[torch.randint(4, (n,))] + 0.2 * torch.randn(n, 6)
    vq = EMACodebook(4, 6).init_codes(sample(400), generator=torch.Generator().manual_seed(0)).train()
    for _ in range(500): vq(sample(256))
    d = torch.cdist(vq.codes, means)
    assert d.min(1).values.max() < 0.05 and len(set(d.argmin(1).tolist())) == 4


def test_usage_perplexity_and_reassign():
    vq = EMACodebook(8, 3).train()
    _, ind, _ = vq(torch.randn(50, 3))
    assert torch.equal(vq.usage(), torch.bincount(ind, minlength=8).float())
    assert math.isclose(vq.perplexity(torch.ones(8)), 8, rel_tol=1e-6)
    vq.reset_usage(); assert vq.usage().sum() == 0
    n = vq.reassign_dead_codes(counts=torch.tensor([50., 30, 0, 0, 20, 0, 0, 0]), generator=torch.Generator().manual_seed(0))
    assert n == 4  # capped at K/2


def test_cpc_cspc_shapes_follow_arguments():
    torch.manual_seed(0)
    cpc = CPC(in_channels=320, dim=32, num_codes=8, hidden=32)
    top = torch.randn(2, 320, 3, 3)
    out = cpc(top)
    assert out['proto'].shape == (2, 32) and out['index'].shape == (2,) and (out['s'] >= 0).all()
    sem = SemanticEncoder(320, 48)(top)
    cspc = CSPC(40, sem_channels=48, proto_dim=32, pe_dim=16, num_codes=24)
    o = cspc(torch.randn(2, 40, 12, 12), sem, out['proto'])
    assert o['cond'].shape == (2, 80, 12, 12) and o['index'].shape == (2, 12, 12)
    assert CSPC(128).cond_channels == 1088
    hc = HierarchicalCodebooks([24, 40, 112, 320], proto_dim=32, num_cpc=8, pe_dim=16, num_cspc=32)
    feats = [torch.randn(2, 24, 12, 12), torch.randn(2, 40, 6, 6), torch.randn(2, 112, 3, 3), top]
    h = hc(feats)
    assert [c.shape[1] for c in h['conds']] == [80, 80, 80] and h['fusion_cond'].shape == (2, 80, 3, 3)
    assert h['commit'].ndim == 0


def test_contingency_purity():
    tab = contingency(torch.tensor([0, 0, 1, 1, 1]), torch.tensor([0, 0, 1, 1, 2]))
    assert tab.tolist() == [[2, 0, 0], [0, 2, 1]] and purity(tab) == 1.0


def test_prior_paper_loglik_is_gaussian_and_code_has_no_logdet():
    torch.manual_seed(0)
    prior = MixedGaussianPrior(5, [3, 2], variant='paper').double()
    zs, p = [torch.randn(2, 3, 2, 2).double(), torch.randn(2, 2, 1, 3).double()], torch.randn(2, 5).double()
    zt, ld = prior(zs, p)
    n = 12 + 6
    ll = -0.5 * sum(z.pow(2).flatten(1).sum(1) for z in zt) - 0.5 * n * math.log(2 * math.pi) + ld
    ref = sum(Normal(mu[..., None, None], s[..., None, None]).log_prob(z).flatten(1).sum(1)
              for z, (mu, s) in zip(zs, prior.params(p)))
    assert torch.allclose(ll, ref, atol=1e-9)
    code = MixedGaussianPrior(5, [3, 2]).double(); code.load_state_dict(prior.state_dict())
    assert torch.equal(code(zs, p)[1], torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize('pi', [[0.5, 0.3, 0.2], None], ids=['weighted', 'uniform'])
def test_mixture_matches_mixture_same_family(pi):
    "In float64 the mixture density equals torch.distributions' to rounding (measured 3.6e-15)."
    torch.manual_seed(1)
    prior = MixedGaussianPrior(4, [2], variant='paper').double()
    protos, z = torch.randn(3, 4, dtype=torch.float64), torch.randn(6, 2, 1, 1, dtype=torch.float64)
    w = torch.full((3,), 1 / 3, dtype=torch.float64) if pi is None else torch.tensor(pi, dtype=torch.float64)
    (mu, s), = prior.params(protos)
    mix = MixtureSameFamily(Categorical(w), Independent(Normal(mu, s), 1))
    ours = mixture_log_prob(prior, [z], protos, None if pi is None else w)
    assert (ours - mix.log_prob(z[:, :, 0, 0])).abs().max() < 1e-14


def test_kmeans_matches_sklearn_and_init_codes_default_is_seeding():
    "`kmeans` reaches scikit-learn's inertia on separated blobs; `init_codes` without iterations keeps the k-means++ seeds."
    from sklearn.cluster import KMeans
    from vqflow_nb.codebooks import kmeans, _kmeanspp
    torch.manual_seed(0)
    x = (torch.randn(4, 3) * 8)[torch.randint(4, (400,))].double() + torch.randn(400, 3, dtype=torch.float64)
    c, a = kmeans(x, 4, 30, torch.Generator().manual_seed(1))
    sk = KMeans(4, n_init=10, random_state=0).fit(x.numpy())
    assert abs(((x - c[a]) ** 2).sum().item() - sk.inertia_) < 1e-6 * sk.inertia_
    vq = EMACodebook(4, 3).double().init_codes(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(vq.codes, _kmeanspp(x, 4, torch.Generator().manual_seed(2)))
    assert torch.equal(vq.cluster_size, torch.ones(4, dtype=torch.float64))


def test_unquantised_hierarchy_has_no_codebooks():
    "quantise=False (`--quantize-enable` omitted): no EMA codebook anywhere, p = s, commitment 0, same condition widths."
    torch.manual_seed(0)
    kw = dict(proto_dim=8, num_cpc=4, pe_dim=4, num_cspc=8)
    feats = [torch.randn(2, 6, 8, 8), torch.randn(2, 10, 4, 4), torch.randn(2, 12, 2, 2)]
    q, n = HierarchicalCodebooks([6, 10, 12], **kw), HierarchicalCodebooks([6, 10, 12], quantise=False, **kw)
    oq, on = q(feats), n(feats)
    assert not any(isinstance(m, EMACodebook) for m in n.modules()) and n.codebooks() == []
    assert [c.shape for c in oq['conds']] == [c.shape for c in on['conds']]
    assert torch.equal(on['proto'], on['s']) and on['commit'] == 0
