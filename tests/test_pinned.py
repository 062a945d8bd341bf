"""Behaviours users rely on, pinned where a user meets them (issue 23).

Each test here was checked against a broken copy of the code (`benchmarks/mutation.py --hand` replays those breaks):
the docstring of each test names the break it catches. The references are computed independently of the package
(brute force, torch's own schedulers, closed forms), so a change that moves the package and a shared helper together
still fails.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn

from vqflow_nb.flows import FusionCoupling
from vqflow_nb.hgad import HGAD, HGADConfig
from vqflow_nb.hvqtrans import LEVELS, HVQTrans, HVQTransConfig, pot_score
from vqflow_nb.method import Method, Schedule, Scores
from vqflow_nb.metrics import class_metrics, f1_max, image_metrics, pixel_metrics
from vqflow_nb.train import fit, metric_table
from vqflow_nb.vqflow import VQFlow, VQFlowConfig


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ VQ-Flow's map direction
CH = [8, 12, 16, 20]
TINY = dict(depths=(1, 1, 1), proto_dim=16, pe_dim=8, k_cpc=4, k_cspc=8, seed=0)


def _vqflow_feats(b=4, plant=6.0):
    "Backbone maps of `b` images; image 0 has a planted anomaly (+`plant`) in the top-left quarter of every stage."
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(b, c, s, s, generator=g) for c, s in zip(CH, (32, 16, 8, 4))]
    for f in fs: f[0, :, :f.shape[-2] // 2, :f.shape[-1] // 2] += plant
    return fs


def _neutral_prior(m):
    "The released configuration with its prior's heads set to mu = 0, s = 1: an untrained model's latents follow its input."
    with torch.no_grad():
        for lin in (*m.prior.mu, *m.prior.sigma): lin.weight.zero_(); lin.bias.zero_()
        for lin in m.prior.sigma: lin.bias.fill_(1.)
    return m


def test_vqflow_planted_anomaly_scores_higher():
    """`VQFlow.score`: pixels of a planted anomaly score higher than the rest, and its image above the clean images.
    Catches: the log-likelihood map's sign flipped (`-0.5 * z^2` -> `+0.5 * z^2`), `max - p` -> `p - max`."""
    torch.manual_seed(0)
    m = _neutral_prior(VQFlow(VQFlowConfig.small(CH, **TINY)).eval())
    s = m.score(_vqflow_feats(), out_size=(32, 32))
    inside = torch.zeros(32, 32, dtype=torch.bool); inside[:16, :16] = True
    for name, mp in (('pixel', s.pixel), ('pro', s.pro)):
        assert mp.shape == (4, 32, 32)
        assert mp[0][inside].mean() > mp[0][~inside].mean() + 0.1, name   # within the anomalous image
        assert mp[0][inside].mean() > mp[1:, inside].mean() + 0.5, name    # against the same pixels of clean images
        assert (mp >= 0).all(), name                                       # max - p: an anomaly map, never negative
    assert s.image.shape == (4,) and s.image[0] > s.image[1:].max()


def test_vqflow_maps_from_latents():
    """`VQFlow.score` from the flows' latents: image score = mean of the top 3 % of the 'mul' map; 'add' sums the per-scale
    likelihoods each normalised by its own maximum; a latent of larger norm is more anomalous.
    Catches: the top-k fraction or its mean, the per-scale max of 'add', the shared max of 'mul'."""
    torch.manual_seed(0)
    m = _neutral_prior(VQFlow(VQFlowConfig.small(CH, **TINY)).eval())
    fs = _vqflow_feats(3, plant=0.)
    with torch.no_grad(): zs = m(fs)['zs']
    s = m.score(fs, out_size=(16, 16))
    up = lambda t: F.interpolate(t[:, None], size=(16, 16), mode='bilinear', align_corners=True)[:, 0]
    logp = [-0.5 * (z.double() ** 2).mean(1) for z in zs]
    tot = sum(up(l) for l in logp)
    p_mul = torch.exp(tot - tot.amax((1, 2), keepdim=True))
    mul = p_mul.amax((1, 2), keepdim=True) - p_mul
    p_add = sum(up(torch.exp(l - l.amax((1, 2), keepdim=True))) for l in logp)
    add = p_add.amax((1, 2), keepdim=True) - p_add
    k = int(16 * 16 * 0.03)   # 7 pixels
    image = mul.flatten(1).sort(1, descending=True).values[:, :k].mean(1)
    torch.testing.assert_close(s.pro.double(), mul, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.pixel.double(), add, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.image.double(), image, rtol=1e-4, atol=1e-5)
    assert (image - mul.flatten(1).amax(1)).abs().min() > 0.01 and (image - mul.flatten(1).mean(1)).abs().min() > 0.01


# ------------------------------------------------------------------------------------------------ HGAD's class-wide normalisation
def _hgad(**kw):
    torch.manual_seed(0)
    return HGAD(HGADConfig.small([8, 8], 3, **{**dict(depth=1, pos_dim=8, n_centers=2, seed=0), **kw}))


def _hgad_parts(n=4, seed=0):
    "Raw per-level parts as `HGAD.score` returns them for `n` images of one class (level 0 4x4, level 1 2x2)."
    g = np.random.default_rng(seed)
    return {**{f'logp{l}': g.normal(-2, 1, (n, s, s)).astype(np.float32) for l, s in enumerate((4, 2))},
            **{f'negent{l}': -np.abs(g.normal(1, .3, (n, s, s))).astype(np.float32) for l, s in enumerate((4, 2))}}


def _finalize(m, parts, size=16):
    d = dict(parts={k: v.copy() for k, v in parts.items()}, masks=np.zeros((len(parts['logp0']), size, size), np.uint8))
    m.finalize_scores(d)
    return d


def _set_anomaly(maps, size, sigma):
    "Independent reference: exp(m - max over the SET) per level, bilinear (align_corners) up, sum, set max - sum, Gaussian."
    s = 0.
    for m in maps:
        t = torch.as_tensor(m, dtype=torch.float64)
        s = s + F.interpolate(torch.exp(t - t.max())[:, None], size=(size, size), mode='bilinear', align_corners=True)[:, 0]
    a = (s.max() - s).numpy()
    return np.stack([gaussian_filter(x, sigma) for x in a])


def test_hgad_uniformly_less_likely_image_scores_higher():
    """`HGAD.finalize_scores` (what the trainer calls per class): an image whose log-likelihood is lower by the same amount at
    every position scores higher. Catches: normalising each level's map per image (by the image's own max) instead of by
    the max over all test images of the class; the likelihood map's direction."""
    m, parts = _hgad(), _hgad_parts()
    for l in (0, 1): parts[f'logp{l}'][1] = parts[f'logp{l}'][0] - 3.0   # image 1 = image 0, uniformly less likely
    for l in (0, 1): parts[f'negent{l}'][1] = parts[f'negent{l}'][0]
    d = _finalize(m, parts)
    assert d['scores'][1] > 1.2 * d['scores'][0]
    assert (d['maps'][1] >= d['maps'][0] - 1e-6).all()


def test_hgad_more_uncertain_class_posterior_scores_higher():
    """The entropy term: an image whose inter-class posterior is less certain (lower sum p log p) at every position scores
    higher. Catches: the entropy map's direction or its set normalisation."""
    m, parts = _hgad(), _hgad_parts(seed=1)
    for l in (0, 1):
        parts[f'logp{l}'][1] = parts[f'logp{l}'][0]
        parts[f'negent{l}'][1] = parts[f'negent{l}'][0] - 2.0
    d = _finalize(m, parts)
    assert d['scores'][1] > 1.5 * d['scores'][0]


@pytest.mark.parametrize('size', [16, 32])
def test_hgad_class_maps_equal_independent_reference(size):
    """The whole class-map recipe against a float64 re-derivation: likelihood map x entropy map, each set-normalised,
    Gaussian sigma = 4 at 256 px scaled to the mask size, image score = max. Catches: per-image maxima, the sigma scaling,
    the product, the image reduction."""
    m, parts = _hgad(), _hgad_parts(5, seed=2)
    d = _finalize(m, parts, size)
    sigma = 4.0 * size / 256
    want = (_set_anomaly([parts['logp0'], parts['logp1']], size, sigma)
            * _set_anomaly([parts['negent0'], parts['negent1']], size, sigma))
    np.testing.assert_allclose(d['maps'], want, rtol=2e-4, atol=1e-6)
    np.testing.assert_allclose(d['scores'], want.reshape(5, -1).max(1), rtol=2e-4, atol=1e-6)
    assert d['pro_maps'] is None


def test_hgad_score_parts_are_the_intra_class_likelihood_per_dim():
    """`HGAD.score`'s parts: logp = log p(z | y) / D under the image class's intra-class mixture (+ log-det / D), negent =
    sum p log p of the inter-class posterior, from the level flows, at any map shape. Catches: the class read from another
    image or repeated over w*w positions, the entropy's sign."""
    m = _hgad().eval()
    g = torch.Generator().manual_seed(3)
    feats = [torch.randn(3, 8, 4, 3, generator=g), torch.randn(3, 8, 2, 1, generator=g)]   # non-square maps
    cls = torch.tensor([0, 2, 1])
    s = m.score(feats, dict(cls_index=cls), out_size=(16, 16))
    for l, x in enumerate(feats):
        with torch.no_grad(): z, ld = m.level(l, x)
        pr = m.priors[l]
        z, ld = z.double(), ld.double()
        y = cls.repeat_interleave(x.shape[2] * x.shape[3])
        mus = pr.centres().double()[y]                                           # (N, M, D)
        logits = -0.5 * ((z[:, None] - mus) ** 2).sum(-1) + pr.phi_intra.double().log_softmax(1)[y]
        lp = (logits.logsumexp(1) + ld + pr.dim * -0.5 * math.log(2 * math.pi)) / pr.dim
        torch.testing.assert_close(s.parts[f'logp{l}'].double().flatten(), lp, rtol=1e-4, atol=1e-4)
        post = (-0.5 * ((z[:, None] - pr.mu.double()[None]) ** 2).sum(-1)).softmax(1)
        ne = (post * post.clamp_min(1e-300).log()).sum(1)
        torch.testing.assert_close(s.parts[f'negent{l}'].double().flatten(), ne, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------ HVQ-Trans: POT level at scoring
def _hvq(ot_weight=80.):
    torch.manual_seed(0)
    cfg = HVQTransConfig.small('cached', channels=12, feature_size=(4, 4), n_classes=3, n_codes=16, embed_dim=16, heads=2,
                               ffn=32, ot_weight=ot_weight)
    return HVQTrans(cfg).eval()


def _hvq_batch():
    g = torch.Generator().manual_seed(1)
    return [torch.randn(2, 12, 4, 4, generator=g)], dict(cls_index=torch.tensor([1, 1]))


def test_hvqtrans_pot_reads_the_lowest_codebook_of_the_image_class():
    """`HVQTrans.score`: the POT term reads the codes of the lowest level ('e0') of the image's class copy. A code placed
    far away is never a nearest code (the reconstruction cannot see it) but dominates the POT weights: moving it changes
    the scores at level e0 of class 1, and at no other level and no other class. Catches: `book(c, 'e0')` -> another
    level or another class; the POT term dropped (`ot_weight` ignored)."""
    m = _hvq()
    feats, batch = _hvq_batch()
    v = torch.nn.functional.normalize(torch.randn(2 * 16, generator=torch.Generator().manual_seed(2)), dim=0)
    with torch.no_grad():
        for c in range(3):
            for l in LEVELS:
                b = m.codebooks.book(c, l)
                b.embed[:, 0] = 1e3 * (v if b.dim == 32 else v[:16])   # code 0 of every book: far away, unused
    base = m.score(feats, batch, out_size=(4, 4))
    changed = {}
    for c in range(3):
        for l in LEVELS:
            b = m.codebooks.book(c, l)
            old = b.embed[:, 0].clone()
            with torch.no_grad(): b.embed[:, 0] = -old
            s = m.score(feats, batch, out_size=(4, 4))
            changed[c, l] = not torch.equal(s.pixel, base.pixel)
            with torch.no_grad(): b.embed[:, 0] = old
    assert changed == {(c, l): (c, l) == (1, 'e0') for c in range(3) for l in LEVELS}


def test_hvqtrans_score_is_reconstruction_error_plus_weighted_pot():
    """`HVQTrans.score` = ||rec - target||_2 over channels + ot_weight x POT(lowest-level quantiser input, its codes).
    Catches: the error's norm (squared, mean), the weight, the POT's input or codebook."""
    w = 80.
    m, m0 = _hvq(w), _hvq(0.)
    feats, batch = _hvq_batch()
    cls = batch['cls_index']
    with torch.no_grad(): out = m(feats, cls)
    err = (out['rec'] - out['target']).double().pow(2).sum(1).sqrt()
    pot = torch.stack([pot_score(out['f0'][i].double(), m.codebooks.book(int(c), 'e0').codes.double())
                       for i, c in enumerate(cls.tolist())]).view_as(err)
    s0, s = m0.score(feats, batch, out_size=(4, 4)), m.score(feats, batch, out_size=(4, 4))
    torch.testing.assert_close(s0.pixel.double(), err, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s.pixel.double(), err + w * pot, rtol=1e-4, atol=1e-4)
    # image score: max over the map mean-pooled with a window of pool/upsample tokens (16/16 = 1 token here)
    torch.testing.assert_close(s.image.double(), (err + w * pot).flatten(1).amax(1), rtol=1e-4, atol=1e-4)


def test_pot_is_softmax_weighted_cosine_distance():
    """`pot_score` from its definition: weights softmax(f.c / K) over the K codes, distance 1 - cos(f, c). Catches: the
    temperature, the cosine (vs dot product), the weighting."""
    g = torch.Generator().manual_seed(4)
    f, codes = torch.randn(5, 6, generator=g, dtype=torch.float64), 3 * torch.randn(7, 6, generator=g, dtype=torch.float64)
    w = np.exp((f @ codes.T).numpy() / 7); w /= w.sum(1, keepdims=True)
    cos = (f @ codes.T).numpy() / np.outer(f.norm(dim=1).numpy(), codes.norm(dim=1).numpy())
    np.testing.assert_allclose(pot_score(f, codes).numpy(), (w * (1 - cos)).sum(1), rtol=1e-10)


# ------------------------------------------------------------------------------------------------ metrics on the trainer's path
def _brute_pro_auc(masks, maps, limit):
    "Exact AU-PRO by brute force: every distinct threshold, 8-connected regions, trapezoid to `limit` (interpolated) / limit."
    from scipy import ndimage
    regions = []
    for i, mk in enumerate(masks):
        lab, k = ndimage.label(mk, structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, k + 1)]
    normal = ~masks.astype(bool)
    pts = [(0., 0.)]
    for t in np.unique(maps)[::-1]:
        b = maps >= t
        pts.append(((b & normal).sum() / normal.sum(), np.mean([b[i][r].mean() for i, r in regions])))
    pts.append((1., 1.))
    x, y = np.array(pts).T
    area = 0.
    for j in range(1, len(x)):
        if x[j - 1] >= limit: break
        x1, y1 = x[j], y[j]
        if x1 > limit: y1, x1 = y[j - 1] + (y[j] - y[j - 1]) * (limit - x[j - 1]) / (x[j] - x[j - 1]), limit
        area += 0.5 * (y[j - 1] + y1) * (x1 - x[j - 1])
    return area / limit


def _pixel_case(seed=0, n=4, size=12):
    g = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), np.uint8)
    masks[0, 2:6, 3:8] = 1; masks[1, 7:10, 1:3] = 1; masks[1, 1:3, 8:11] = 1; masks[2, 5:11, 5:11] = 1
    maps = (g.normal(0, 1, (n, size, size)) + 1.2 * masks).astype(np.float32)
    return masks, maps


def _brute_f1_max(y, s):
    "max over every threshold t (predict s >= t) of 2 TP / (2 TP + FP + FN)."
    y, s = np.ravel(y).astype(bool), np.ravel(s)
    return max(2 * (y & (s >= t)).sum() / (2 * (y & (s >= t)).sum() + (~y & (s >= t)).sum() + (y & (s < t)).sum())
               for t in np.unique(s))


def test_trainer_aupro_integrates_to_fpr_0_3():
    """`metric_table` (what `fit` records) and the defaults of `class_metrics`/`pixel_metrics` integrate the PRO curve to
    FPR 0.3, normalised by 0.3 (MVTec AD's definition; all three papers). Catches: another default limit in
    `pixel_metrics` or `class_metrics`, a limit not passed through, the normalisation."""
    masks, maps = _pixel_case()
    want = _brute_pro_auc(masks, maps, 0.3)
    assert abs(want - _brute_pro_auc(masks, maps, 1.0)) > 0.02 and abs(want - _brute_pro_auc(masks, maps, 0.2)) > 0.01
    labels = masks.reshape(len(masks), -1).any(1).astype(int)
    scores = maps.reshape(len(maps), -1).max(1)
    assert pixel_metrics(masks, maps)['aupro'] == pytest.approx(want, abs=1e-9)
    assert class_metrics(labels, scores, masks, maps)['aupro'] == pytest.approx(want, abs=1e-9)
    per = {0: dict(labels=labels, scores=scores.astype(np.float64), masks=masks, maps=maps, pro_maps=None, has_mask=True)}
    t = metric_table(per, ['c'])
    assert t.loc['c', 'aupro'] == pytest.approx(want, abs=1e-9) and t.loc['mean', 'aupro'] == pytest.approx(want, abs=1e-9)


def test_trainer_aupro_reads_pro_maps_when_given():
    """VQ-Flow scores AU-PRO on its 'mul' map and the other pixel metrics on 'add': `metric_table` uses `pro_maps` for AU-PRO
    only. Catches: pro_maps dropped or used for the pixel AUROC."""
    masks, maps = _pixel_case(1)
    other = _pixel_case(2)[1]
    labels = np.array([1, 1, 1, 0])
    per = {0: dict(labels=labels, scores=np.arange(4.), masks=masks, maps=maps, pro_maps=other, has_mask=True)}
    t = metric_table(per, ['c'])
    assert t.loc['c', 'aupro'] == pytest.approx(_brute_pro_auc(masks, other, 0.3), abs=1e-9)
    assert t.loc['c', 'p_auroc'] == pytest.approx(pixel_metrics(masks, maps)['p_auroc'], abs=1e-12)


@pytest.mark.parametrize('case', ['lowest', 'inside', 'highest'])
def test_f1_max_over_every_threshold(case):
    """Image F1-max (`f1_max`, `image_metrics`) and pixel F1-max (`pixel_metrics`) are the maximum over every threshold,
    the lowest (everything predicted anomalous) and the highest included. Catches: the first or the last curve point
    left out of the maximum."""
    y, s = dict(lowest=([1, 1, 1, 0, 1, 1], [.1, .2, .3, .9, .15, .05]),
                inside=([0, 1, 1, 0, 0, 1, 0], [.1, .8, .7, .2, .75, .3, .05]),
                highest=([0, 0, 1, 0, 0, 0, 0], [.1, .2, .9, .3, .4, .5, .6]))[case]
    want = _brute_f1_max(y, s)
    if case == 'lowest': assert want == pytest.approx(2 * 5 / (2 * 5 + 1))   # all predicted anomalous: P = 5/6, R = 1
    if case == 'highest': assert want == 1.0
    assert f1_max(y, s) == pytest.approx(want, abs=1e-12)
    assert image_metrics(y, s)['i_f1max'] == pytest.approx(want, abs=1e-12)
    masks = np.array(y, np.uint8).reshape(1, 1, -1); maps = np.array(s, np.float32).reshape(1, 1, -1)
    assert pixel_metrics(masks, maps)['p_f1max'] == pytest.approx(want, abs=1e-6)


def test_pixel_metrics_against_brute_force():
    """Pixel AUROC / AP / F1-max on the trainer's path (`pixel_metrics`' fast backend) against brute-force definitions.
    Catches: a changed tie handling, the trapezoid, the precision at each recall step."""
    masks, maps = _pixel_case(3)
    maps = np.round(maps, 1)   # ties
    y, s = masks.ravel().astype(bool), maps.ravel().astype(np.float64)
    pos, neg = s[y], s[~y]
    auroc = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    ts = np.unique(s)[::-1]
    tp = np.array([(y & (s >= t)).sum() for t in ts]); fp = np.array([(~y & (s >= t)).sum() for t in ts])
    ap = np.sum(np.diff(np.concatenate(([0], tp))) / y.sum() * tp / np.maximum(tp + fp, 1))
    got = pixel_metrics(masks, maps)
    assert got['p_auroc'] == pytest.approx(auroc, abs=1e-12)
    assert got['p_ap'] == pytest.approx(ap, abs=1e-12)
    assert got['p_f1max'] == pytest.approx(_brute_f1_max(y, s), abs=1e-12)


# ------------------------------------------------------------------------------------------------ fit: best epoch, lr curve
class _Scripted(Method):
    "A method whose test-set quality is scripted per epoch: plan[e] = (image scores right?, pixel maps right?)."
    needs_labels = False

    def __init__(self, plan, **sched):
        super().__init__()
        self.w, self.plan, self.epoch, self.sched = nn.Parameter(torch.zeros(2)), plan, 0, sched

    def schedule(self): return Schedule(**{**dict(epochs=len(self.plan), batch_size=2, lr=1e-2, eval_every=1), **self.sched})
    def loss(self, feats, batch): return dict(loss=(self.w - feats[0].mean()).pow(2).sum())
    def on_epoch_end(self, epoch): self.epoch = epoch + 1

    def score(self, feats, batch, out_size=None):
        img_ok, pix_ok = self.plan[min(self.epoch, len(self.plan)) - 1]
        y, mk = batch['label'].float(), batch['mask'][:, 0].float()
        ramp = torch.linspace(0, .01, mk.shape[-1]).expand_as(mk)   # never a flat map
        return Scores(image=(y if img_ok else 1 - y) + 0.01 * batch['index'].float(),
                      pixel=(mk if pix_ok else 1 - mk) + ramp)


class _Store(torch.utils.data.Dataset):
    classes = ['a', 'b']
    def __init__(self, n=8, size=8):
        self.n, self.size = n, size
    def __len__(self): return self.n
    def __getitem__(self, i):
        label = i % 2
        mask = torch.zeros(1, self.size, self.size)
        if label: mask[0, 2:5, 1 + i % 3:4 + i % 3] = 1
        return dict(feats=[torch.full((2,), float(i))], label=label, cls_index=(i // 2) % 2, mask=mask, has_mask=True, index=i)


def _fit(plan, **kw):
    return fit(_Scripted(plan, **kw), _Store(), _Store(), progress=False, seed=0)


def test_fit_best_epoch_is_the_max_of_image_plus_pixel_auroc():
    """`FitResult.best_epoch`: the evaluation with the largest mean image AUROC + mean pixel AUROC; `best` is its table.
    Catches: min instead of max, one of the two terms dropped, the last epoch taken as best."""
    res = _fit([(True, False), (True, True), (False, False), (True, False)])   # sums 1, 2, 0, 1
    means = {e: (t.loc['mean', 'i_auroc'], t.loc['mean', 'p_auroc']) for e, t in res.evals.items()}
    assert means == {0: (1., 0.), 1: (1., 1.), 2: (0., 0.), 3: (1., 0.)}
    assert res.best_epoch == 1 and res.last_epoch == 3
    assert res.best is res.evals[1] and res.last is res.evals[3]
    res = _fit([(False, True), (True, False), (False, False)])                 # 1, 1, 0: a tie keeps the earlier epoch
    assert res.best_epoch == 0
    res = _fit([(False, False), (False, True), (True, True)])                  # the best can be the last
    assert res.best_epoch == 2


def test_fit_best_per_metric():
    "`FitResult.best_per_metric`: per metric, the largest mean over the evaluations and its epoch. Catches: min for max."
    res = _fit([(False, True), (True, False), (False, False)])
    b = res.best_per_metric()
    assert b['i_auroc'] == dict(value=1.0, epoch=1) and b['p_auroc'] == dict(value=1.0, epoch=0)


def _torch_lrs(lr, epochs, warmup, start, milestones, gamma):
    "Per-epoch lr of torch's LinearLR warm-up chained with MultiStepLR (VQ-Flow's `train.py` schedulers)."
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    scheds = [torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), gamma)]
    if warmup: scheds.insert(0, torch.optim.lr_scheduler.LinearLR(opt, start, 1.0, total_iters=warmup))
    sch = torch.optim.lr_scheduler.ChainedScheduler(scheds)
    out = []
    for _ in range(epochs): out.append(opt.param_groups[0]['lr']); opt.step(); sch.step()
    return out


@pytest.mark.parametrize('warmup,start,milestones,gamma', [(10, 0.1, (70, 90), 0.33), (3, 0.25, (4, 6), 0.5), (0, 0.1, (2,), 0.1)])
def test_schedule_lr_factor_is_torch_linear_warmup_and_steps(warmup, start, milestones, gamma):
    """`Schedule.lr_factor`: torch's LinearLR from `warmup_start` over `warmup_epochs`, times MultiStepLR. Catches: the
    warm-up's start, slope or end, an off-by-one at a milestone."""
    sch = Schedule(epochs=12, lr=1., warmup_epochs=warmup, warmup_start=start, milestones=milestones, gamma=gamma)
    want = _torch_lrs(1., 12, warmup, start, milestones, gamma)
    np.testing.assert_allclose([sch.lr_factor(e) for e in range(12)], want, rtol=1e-12)


def test_schedule_cosine_is_torch_cosine_annealing_after_warmup():
    "`Schedule(cosine=True)`: cosine from lr to lr x cosine_min over the epochs after the warm-up (torch's CosineAnnealingLR)."
    sch = Schedule(epochs=10, lr=1., warmup_epochs=2, warmup_start=0.5, cosine=True, cosine_min=0.01)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8, eta_min=0.01)
    want = []
    for e in range(10):
        if e >= 2: want.append(opt.param_groups[0]['lr']); opt.step(); cos.step()
    np.testing.assert_allclose([sch.lr_factor(e) for e in range(2, 10)], want, rtol=1e-12)
    assert sch.lr_factor(0) == pytest.approx(0.5) and sch.lr_factor(1) == pytest.approx(0.75)


def test_fit_trains_each_epoch_at_the_scheduled_lr():
    """`fit`'s history: every epoch ran at lr x `Schedule.lr_factor(epoch)` (VQ-Flow's LinearLR warm-up from 0.1x).
    Catches: the factor applied one epoch late, not applied, applied twice."""
    res = _fit([(True, True)] * 5, warmup_epochs=3, warmup_start=0.1, milestones=(4,), gamma=0.5, lr=2e-2)
    np.testing.assert_allclose([h['lr'] for h in res.history], _torch_lrs(2e-2, 5, 3, 0.1, (4,), 0.5), rtol=1e-12)


# ------------------------------------------------------------------------------------------------ the fusion coupling's soft clamp
def _fusion_with_constant_log_scale(b, clamp=1.9):
    "A FusionCoupling whose subnets output s = b, t = 0 everywhere (zero weights, bias b)."
    fc = FusionCoupling([4, 6], 0, clamp=clamp, seed=0).double()
    with torch.no_grad():
        for sub in (fc.subnet_1, fc.subnet_2):
            for conv in (*sub.conv_s, *sub.conv_t): conv.weight.zero_(); conv.bias.zero_()
            for conv in sub.conv_s: conv.bias.fill_(b)
    return fc


@pytest.mark.parametrize('b', [-40., -2., 0.3, 1.9, 7., 1e4])
def test_fusion_soft_clamp(b):
    """VQ-Flow's fusion coupling scales each half by exp(0.636 alpha atan(s / alpha)), alpha = 1.9 ([code]
    `FusionCouplingLayer`): the log-det per element and the outputs carry exactly that factor; it never exceeds
    0.999 alpha in size. Catches: 0.636, atan -> tanh, s / alpha -> s * alpha, the clamp applied to one coupling only."""
    alpha = 1.9
    want = 0.636 * alpha * math.atan(b / alpha)
    fc = _fusion_with_constant_log_scale(b, alpha)
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64), torch.randn(2, 6, 2, 2, generator=g, dtype=torch.float64)]
    zs, ld = fc(xs)
    n = sum(x[0].numel() for x in xs)
    torch.testing.assert_close(ld, torch.full((2,), want * n, dtype=torch.float64), rtol=1e-10, atol=1e-9)
    for x, z, l in zip(xs, zs, range(2)):   # every channel scaled by exp(want), after the scale's permutation
        torch.testing.assert_close(z, x[:, getattr(fc, f'perm_{l}')] * math.exp(want), rtol=1e-10, atol=1e-12)
    assert abs(want) < 0.999 * alpha
    back, ld_inv = fc(zs, rev=True)
    for x, y in zip(xs, back): torch.testing.assert_close(y, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ld_inv, -ld)


def test_fusion_without_clamp_is_plain_affine():
    "clamp <= 0: the log-scale is s itself ([code] `if self.clamp > 0`)."
    fc = _fusion_with_constant_log_scale(0.7, clamp=0.)
    xs = [torch.randn(1, 4, 4, 4, dtype=torch.float64), torch.randn(1, 6, 2, 2, dtype=torch.float64)]
    _, ld = fc(xs)
    assert ld.item() == pytest.approx(0.7 * sum(x.numel() for x in xs), rel=1e-12)
