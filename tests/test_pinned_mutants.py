"""Behaviours pinned after the mutation benchmark (benchmarks/mutation.py, results/benchmarks/mutation.md) found a
one-token break of them that every other fast test let through. Each test names the surviving mutant it now kills."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from vqflow_nb.flows import AllInOneBlock
from vqflow_nb.method import Schedule
from vqflow_nb.train import fit, make_optimizer, set_lr

from test_pinned import _Scripted, _Store, _torch_lrs


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


@pytest.mark.parametrize('kind', ['SOFTPLUS', 'SIGMOID', 'EXP'])
@pytest.mark.parametrize('init', [0.3, 1.0, 2.5])
def test_global_affine_starts_at_its_init(kind, init):
    """freia 0.2: an AllInOneBlock's global scale Psi(beta_0) equals `global_affine_init` for every activation.
    Kills: `kind == "SIGMOID"` -> `kind < "SIGMOID"` in `_global_affine_init` (EXP then used the sigmoid's inverse)."""
    blk = AllInOneBlock(4, global_affine_type=kind, global_affine_init=init, seed=0)
    torch.testing.assert_close(blk.scale().detach(), torch.full((1, 4), init), rtol=1e-5, atol=1e-6)


class _Grouped(_Scripted):
    "A scripted method with its own parameter groups: the first carries lr_scale 3, the second none."
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw); self.v = nn.Parameter(torch.zeros(1))
    def loss(self, feats, batch): return dict(loss=(self.w - feats[0].mean()).pow(2).sum() + self.v.pow(2).sum())
    def param_groups(self, sch): return [dict(params=[self.w], lr_scale=3.0), dict(params=[self.v])]


def test_fit_scales_each_group_lr_by_its_lr_scale():
    """`fit` with a method's `param_groups`: each group trains at lr x `Schedule.lr_factor` x its `lr_scale` (HGAD's
    centre groups, 3x in the paper variant). Kills: `sch.lr * factor * scale` -> `sch.lr * factor ** scale` in `set_lr`."""
    res = fit(_Grouped([(True, True)] * 3, warmup_epochs=2, warmup_start=0.5, lr=1e-2), _Store(), None, progress=False, seed=0)
    np.testing.assert_allclose([h['lr'] for h in res.history], [3 * x for x in _torch_lrs(1e-2, 3, 2, 0.5, (), 0.1)], rtol=1e-12)
    opt = make_optimizer([dict(params=[nn.Parameter(torch.zeros(1))], lr_scale=3.0), dict(params=[nn.Parameter(torch.zeros(1))])],
                         Schedule(lr=2e-3))
    set_lr(opt, Schedule(lr=2e-3), 0.25)
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([2e-3 * 0.25 * 3, 2e-3 * 0.25], rel=1e-12)


def test_conv_broadcast_refuses_what_it_cannot_compute():
    """`conv_broadcast` (the `broadcast_cond` fast path) handles zero padding with numeric sizes and groups=1 only; any other
    convolution is an error, not a silently different result. Kills: `... or padding_mode != 'zeros' or isinstance(...)`
    -> `... and isinstance(...)` (a reflect-padded conv accepted)."""
    from vqflow_nb.flows import conv_broadcast
    x, vec = torch.randn(1, 3, 5, 5), torch.randn(1, 2)
    for conv in (nn.Conv2d(5, 4, 3, padding=1, padding_mode='reflect'), nn.Conv2d(5, 4, 3, padding='same'),
                 nn.Conv2d(6, 4, 3, padding=1, groups=2)):
        with pytest.raises(ValueError, match='groups=1 and numeric zero padding'): conv_broadcast(conv, x, vec if conv.groups == 1 else torch.randn(1, 3))
    conv = nn.Conv2d(5, 4, 3, padding=1)
    dense = conv(torch.cat([x, vec[:, :, None, None].expand(-1, -1, 5, 5)], 1))
    torch.testing.assert_close(conv_broadcast(conv, x, vec), dense, rtol=1e-5, atol=1e-5)


def test_fit_progress_names_the_evaluated_epoch(capsys):
    """With `progress=True` every evaluation prints its (1-based) epoch and the mean metrics.
    Kills: `epoch+1` -> `epoch%1` in `_record_eval`'s message."""
    fit(_Scripted([(True, True), (True, False)]), _Store(), _Store(), progress=True, seed=0)
    out = capsys.readouterr().out
    assert 'epoch 1: i_auroc=1.000' in out and 'epoch 2: i_auroc=1.000' in out and 'p_auroc=0.000' in out


def test_label_free_router_picks_the_class_whose_top_codebook_fits_best():
    """`HVQTrans.route` (variant label_free): each image goes to the class copy whose top codebook quantises its tokens with
    the lowest mean squared error ||e - c||^2. Kills: the cross term's factor 2 -> 1 in the expanded distance."""
    from vqflow_nb.hvqtrans import HVQTrans, HVQTransConfig
    torch.manual_seed(0)
    m = HVQTrans(HVQTransConfig.small('cached+label_free', channels=12, feature_size=(2, 2), n_classes=3, n_codes=4,
                                      embed_dim=8, heads=2, ffn=16)).eval()
    x = torch.randn(8); x = 10 * x / x.norm()
    with torch.no_grad():
        for c, a in enumerate((1.0, 0.5, -1.0)):          # class 0's codes are x itself: distance 0
            m.codebooks.book(c, 'top').embed.copy_((a * x)[:, None].expand(-1, 4))
    e4 = x.expand(2, 4, 8).clone()
    assert m.route(e4).tolist() == [0, 0]
    g = torch.Generator().manual_seed(1)                  # random codes and tokens against the brute-force definition
    with torch.no_grad():
        for c in range(3): m.codebooks.book(c, 'top').embed.copy_(3 * torch.randn(8, 4, generator=g) + c)
    e4 = 2 * torch.randn(5, 4, 8, generator=g) + 1
    err = torch.stack([((e4[:, :, None] - m.codebooks.book(c, 'top').codes[None, None]) ** 2).sum(-1).amin(-1).mean(-1)
                       for c in range(3)], 1)
    assert torch.equal(m.route(e4), err.argmin(1))


def test_mean_row_counts_the_classes_averaged():
    """`evaluate_classes`' mean row: `n_classes` = the largest number of classes any metric averages (an image-only class
    still counts). Kills: `if counts` -> `if not counts` in `_with_mean`."""
    from vqflow_nb.metrics import evaluate_classes
    masks = np.zeros((4, 6, 6), np.uint8); masks[1, 1:3, 1:3] = 1; masks[3, 2:5, 2:4] = 1
    maps = np.random.default_rng(0).normal(size=(4, 6, 6)).astype(np.float32) + masks
    lab = np.array([0, 1, 0, 1])
    t = evaluate_classes(dict(a=dict(labels=lab, scores=np.arange(4.), masks=masks, maps=maps),
                              b=dict(labels=lab, scores=np.arange(4.)[::-1].copy())))
    assert t.loc['mean', 'n_classes'] == 2 and t.attrs['n_averaged']['aupro'] == 1 and t.attrs['n_averaged']['i_auroc'] == 2
    assert t.loc['mean', 'i_auroc'] == pytest.approx((t.loc['a', 'i_auroc'] + t.loc['b', 'i_auroc']) / 2)
    assert t.loc['mean', 'n_images'] == 8


def test_prior_standardises_by_the_heads_outputs():
    """`MixedGaussianPrior` (VQ-Flow's prototype-conditioned prior): z_l -> (z_l - mu_l(p)) / sqrt(sigma_l(p)^2 + 1e-8) with
    mu_l, sigma_l its two linear heads ([code] `sigma_mu_generator`); `log_prob` is that Gaussian's exact log-density.
    Kills: `sigma^2 + eps` -> `sigma^2 ** eps` in `params` (every scale then ~1)."""
    from torch.distributions import Normal
    from vqflow_nb.prior import MixedGaussianPrior
    torch.manual_seed(0)
    prior = MixedGaussianPrior(5, [3, 2]).double()
    p = torch.randn(2, 5, dtype=torch.float64)
    zs = [torch.randn(2, 3, 2, 2, dtype=torch.float64), torch.randn(2, 2, 1, 3, dtype=torch.float64)]
    out, ld = prior(zs, p)
    lp = 0
    for z, o, mu_h, sg_h in zip(zs, out, prior.mu, prior.sigma):
        mu = (p @ mu_h.weight.T + mu_h.bias)[..., None, None]
        s = ((p @ sg_h.weight.T + sg_h.bias) ** 2 + 1e-8).sqrt()[..., None, None]
        torch.testing.assert_close(o, (z - mu) / s, rtol=1e-12, atol=1e-12)
        lp = lp + Normal(mu, s).log_prob(z).flatten(1).sum(1)
    assert torch.equal(ld, torch.zeros(2))                     # the released code's variant: no log-det
    torch.testing.assert_close(prior.log_prob(zs, p), lp, rtol=1e-12, atol=1e-10)


def test_cspc_residual_pattern_is_anchor_plus_quantised_residual():
    """`CSPC` in 'residual' mode (the README's `--quantize-type residual`): the pattern is the anchor [PE, p] plus the code
    nearest to h - anchor, and the condition is [pattern, p]. Kills: `anchor + q` -> `anchor * q`; the semantic map
    upsampled with align_corners=True (the authors' `nn.Upsample` uses False)."""
    from vqflow_nb.codebooks import CSPC
    from vqflow_nb.flows import positional_encoding_2d
    torch.manual_seed(0)
    m = CSPC(6, 10, proto_dim=4, pe_dim=4, num_codes=5).eval()
    feat, sem, proto = torch.randn(2, 6, 4, 4), torch.randn(2, 10, 2, 2), torch.randn(2, 4)
    with torch.no_grad():
        out = m(feat, sem, proto)   # h = MLP(feat) + conv1x1(Upsample x2 of sem), the authors' nn.Upsample (align_corners=False)
        h = m.feature_mlp(feat) + m.upsampler(nn.Upsample(scale_factor=2, mode='bilinear')(sem))
    anchor = torch.cat([positional_encoding_2d(4, 4, 4).expand(2, -1, -1, -1), proto[:, :, None, None].expand(-1, -1, 4, 4)], 1)
    r = (h - anchor).permute(0, 2, 3, 1)                                           # (B, H, W, code_dim)
    idx = ((r[..., None, :] - m.codebook.codes) ** 2).sum(-1).argmin(-1)
    assert torch.equal(out['index'], idx)
    want = anchor + m.codebook.codes[idx].permute(0, 3, 1, 2)
    torch.testing.assert_close(out['pattern'], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out['cond'], torch.cat([want, proto[:, :, None, None].expand(-1, -1, 4, 4)], 1), rtol=1e-6, atol=1e-6)


def test_hvq_maps_pool_window_on_a_non_square_grid():
    """`hvq_maps`: the image score is the max of the map mean-pooled over a window of `pool` / `upsample` tokens, measured
    along the token grid's height, at any grid shape. Kills: `err.shape[-2]` -> `err.shape[+2]` (the width)."""
    import torch.nn.functional as F
    from vqflow_nb.hvqtrans import hvq_maps
    err = torch.rand(2, 2, 4, generator=torch.Generator().manual_seed(0))
    s = hvq_maps(err, (32, 64), pool=16, upsample=16)                          # one token = 16 x 16 px: window 16 px
    pix = F.interpolate(err[:, None], size=(32, 64), mode='bilinear', align_corners=True)
    torch.testing.assert_close(s.pixel, pix[:, 0])
    torch.testing.assert_close(s.image, F.avg_pool2d(pix, 16, stride=1).flatten(1).amax(1))


def _approx_aupro_reference(masks, maps, steps, limit=0.3):
    "The papers' thresholded AU-PRO written out: binarise map > t on an equal grid, PRO = mean region overlap, FPR < limit."
    from scipy import ndimage
    lo, hi = float(maps.min()), float(maps.max())   # python floats: a float64 grid, as the authors' np.arange
    regions = [(i, lab == r) for i, mk in enumerate(masks)
               for lab, k in [ndimage.label(mk, structure=np.ones((3, 3)))] for r in range(1, k + 1)]
    normal = ~masks.astype(bool)
    fprs, pros = [], []
    for t in np.arange(lo, hi, (hi - lo) / steps):
        b = maps > t
        fprs.append((b & normal).sum() / normal.sum()); pros.append(np.mean([b[i][r].mean() for i, r in regions]))
    f, p = np.array(fprs), np.array(pros)
    keep = f < limit
    f, p = f[keep], p[keep]
    f = (f - f.min()) / (f.max() - f.min())
    return float(-np.trapezoid(p, f))   # in threshold order (FPR non-increasing): tied FPRs keep their neighbours


@pytest.mark.parametrize('steps', [40, 200])
def test_approx_aupro_on_the_trainer_path(steps):
    """`metric_table(..., aupro_variant='approx')` (VQ-Flow's and ADer's evaluation) against the thresholded definition.
    Kills: the PRO of a threshold as overlap x region size (`above / size` -> `above * size`)."""
    from vqflow_nb.metrics import aupro
    from vqflow_nb.train import metric_table
    g = np.random.default_rng(5)
    masks = np.zeros((3, 16, 16), np.uint8); masks[0, 2:7, 3:9] = 1; masks[1, 9:13, 1:4] = 1; masks[1, 1:3, 10:15] = 1
    maps = (g.normal(0, 1, (3, 16, 16)) + 1.5 * masks).astype(np.float32)
    want = _approx_aupro_reference(masks, maps, steps)
    assert aupro(masks, maps, variant='approx', steps=steps) == pytest.approx(want, abs=1e-9)
    if steps != 40: return   # the trainer's path, at its default 800 thresholds (VQ-Flow's max_step)
    per = {0: dict(labels=np.array([1, 1, 0]), scores=np.arange(3.), masks=masks, maps=maps, pro_maps=None, has_mask=True)}
    assert metric_table(per, ['c'], aupro_variant='approx').loc['c', 'aupro'] == pytest.approx(
        _approx_aupro_reference(masks, maps, 800), abs=1e-9)


def test_approx_aupro_rescales_from_the_smallest_kept_fpr():
    """The papers' min-max rescaling of the kept FPRs matters when no threshold reaches FPR 0 (a normal pixel holds the
    top score), and a curve whose kept FPRs are all equal gives 0, not NaN. Kills: `f - f.min()` -> `f * f.min()`,
    `f.max() > f.min()` -> `>=` in `_approx_from_curve` (`f + f.min()` only shifts the x axis: the area is the same)."""
    from vqflow_nb.metrics import aupro
    g = np.random.default_rng(6)
    masks = np.zeros((2, 12, 12), np.uint8); masks[0, 2:6, 2:7] = 1; masks[1, 6:10, 5:9] = 1
    maps = (g.normal(0, 1, (2, 12, 12)) + 1.5 * masks).astype(np.float32)
    maps[0, 11, 11] = maps.max() + 3                                   # a normal pixel on top: min kept FPR > 0
    want = _approx_aupro_reference(masks, maps, 50)
    assert aupro(masks, maps, variant='approx', steps=50) == pytest.approx(want, abs=1e-9)
    flat = np.zeros((1, 10, 10), np.float32); mk = np.zeros((1, 10, 10), np.uint8); mk[0, :3, :3] = 1
    flat[0][mk[0] == 0] = np.where(np.arange(91) < 40, 1.0, 0.0)      # 40 of 91 normal pixels tie at 1: FPR 0.44 or 0
    flat[0][mk[0] == 1] = np.linspace(2, 3, 9)
    assert aupro(mk, flat, variant='approx', steps=20) == 0.0


@pytest.mark.parametrize('variant', ['exact', 'approx'])
def test_aupro_without_a_normal_pixel_is_an_error(variant):
    "AU-PRO's FPR is undefined when every pixel is anomalous: a ValueError, never a NaN. Kills: `n_ok == 0` -> `n_ok < 0`."
    from vqflow_nb.metrics import aupro
    with pytest.raises(ValueError, match='no normal pixel'):
        aupro(np.ones((1, 4, 4), np.uint8), np.random.default_rng(0).random((1, 4, 4)), variant=variant, steps=10)


def test_exact_pro_curve_runs_from_origin_to_one_one():
    "`pro_curve_exact` returns the whole curve, (0, 0) first and (1, 1) last. Kills: the end point moved to FPR 2."
    from vqflow_nb.metrics import pro_curve_exact
    masks = np.zeros((2, 6, 6), np.uint8); masks[0, 1:3, 1:4] = 1
    fpr, pro = pro_curve_exact(masks, np.random.default_rng(0).random((2, 6, 6)))
    assert (fpr[0], pro[0], fpr[-1], pro[-1]) == (0., 0., 1., 1.)
    assert (np.diff(fpr) >= 0).all() and (np.diff(pro) >= 0).all() and fpr.max() <= 1 and pro.max() <= 1


def test_smooth_onehot_default_is_the_authors_0_02():
    "`smooth_onehot(y, Y)`: (1 - 0.02) one-hot + 0.02 / Y ([code] utils.py:onehot). Kills: another default eps."
    from vqflow_nb.hgad import smooth_onehot
    got = smooth_onehot(torch.tensor([2, 0]), 4)
    want = torch.full((2, 4), 0.02 / 4); want[0, 2] += 0.98; want[1, 0] += 0.98
    torch.testing.assert_close(got, want)


def test_hgad_loss_sums_levels_and_logs_their_mean():
    """`HGAD.loss` (the one-graph path): the loss is the sum of the levels' losses, each logged term their mean over
    levels. Kills: `/ len(per)` -> `- len(per)` for the logged terms."""
    from vqflow_nb.hgad import HGAD, HGADConfig, hgad_losses
    torch.manual_seed(0)
    m = HGAD(HGADConfig.small([8, 8], 3, depth=1, pos_dim=8, n_centers=2, seed=0))
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 8, 3, 3, generator=g), torch.randn(2, 8, 2, 2, generator=g)]
    cls = torch.tensor([0, 2])
    got = m.loss(feats, dict(cls_index=cls))
    per = []
    for l, x in enumerate(feats):
        z, ld = m.level(l, x)
        per.append(hgad_losses(m.priors[l], z, ld, cls.repeat_interleave(x.shape[2] * x.shape[3]), m.stage2()))
    torch.testing.assert_close(got['loss'], per[0]['loss'] + per[1]['loss'])
    for k in ('L_g', 'L_e', 'L_mi'): torch.testing.assert_close(got[k], (per[0][k] + per[1][k]) / 2)


def test_hvqtrans_loss_is_mse_plus_weighted_commitment():
    """`HVQTrans.loss` = MSE(rec, target) + 0.25 x the summed commitments ([code] `latent_loss_weight = 0.25`), per-level
    commitments logged. Kills: `mse + w * commit` -> `mse * w * commit`."""
    from vqflow_nb.hvqtrans import HVQTrans, HVQTransConfig, LEVELS
    torch.manual_seed(0)
    m = HVQTrans(HVQTransConfig.small('cached', channels=12, feature_size=(2, 2), n_classes=2, n_codes=8, embed_dim=8,
                                      heads=2, ffn=16)).train()
    parts = m.loss([torch.randn(2, 12, 2, 2)], dict(cls_index=torch.tensor([0, 1])))
    assert parts['mse'] > 0 and parts['commit'] > 0
    torch.testing.assert_close(parts['loss'].detach(), parts['mse'] + 0.25 * parts['commit'])
    torch.testing.assert_close(parts['commit'], sum(parts[f'commit_{l}'] for l in LEVELS))


def test_cspc_without_codebook_naive_pattern_keeps_the_pe():
    """`CSPC(quantize='naive', quantise=False)` (an ablation): the pattern is the codebook's would-be input [h, PE].
    Kills: `quantize == 'residual'` -> `<=` (the naive pattern then lost its PE)."""
    from vqflow_nb.codebooks import CSPC
    from vqflow_nb.flows import positional_encoding_2d
    torch.manual_seed(0)
    m = CSPC(6, None, proto_dim=4, pe_dim=4, quantize='naive', quantise=False).eval()
    feat, proto = torch.randn(2, 6, 3, 3), torch.randn(2, 4)
    with torch.no_grad(): out = m(feat, None, proto); h = m.feature_mlp(feat)
    torch.testing.assert_close(out['pattern'], torch.cat([h, positional_encoding_2d(4, 3, 3).expand(2, -1, -1, -1)], 1))


def test_hierarchical_codebooks_refuse_a_missing_map():
    "`HierarchicalCodebooks` needs one map per flow scale plus the top map. Kills: `!=` -> `>` (too few maps accepted)."
    from vqflow_nb.codebooks import HierarchicalCodebooks
    hc = HierarchicalCodebooks([4, 6, 8], proto_dim=4, num_cpc=2, pe_dim=4, num_cspc=3).eval()
    with pytest.raises(ValueError, match='expected 3'): hc([torch.randn(2, 4, 4, 4), torch.randn(2, 8, 1, 1)])


def test_positional_encoding_of_a_single_row_or_column():
    "A 1 x W (or H x 1) map has a positional encoding; only an empty side is an error. Kills: `height < 1` -> `height < 2`."
    from vqflow_nb.flows import positional_encoding_2d
    pe = positional_encoding_2d(8, 1, 3)
    assert pe.shape == (8, 1, 3) and torch.equal(pe[4::2], torch.zeros(2, 1, 3)) and torch.equal(pe[5::2], torch.ones(2, 1, 3))
    assert positional_encoding_2d(8, 3, 1).shape == (8, 3, 1)
    for h, w in ((0, 3), (3, 0)):
        with pytest.raises(ValueError, match='>= 1'): positional_encoding_2d(8, h, w)


def test_conv_broadcast_names_the_channel_mismatch():
    "The error names the conv's input channels. Kills: `w.shape[1]` -> `w.shape[2]` (the kernel height) in the message."
    from vqflow_nb.flows import conv_broadcast
    with pytest.raises(ValueError, match=r"3 map \+ 3 vector channels != the conv's 5 inputs"):
        conv_broadcast(nn.Conv2d(5, 4, 3, padding=1), torch.randn(1, 3, 4, 4), torch.randn(1, 3))


@pytest.mark.parametrize('alpha', [0.5, 1.0])
def test_fusion_soft_clamp_below_one(alpha):
    "The atan clamp applies for any alpha > 0, also alpha <= 1. Kills: `if self.clamp > 0` -> `> 1`."
    from test_pinned import _fusion_with_constant_log_scale
    fc = _fusion_with_constant_log_scale(5.0, clamp=alpha)
    xs = [torch.randn(1, 4, 4, 4, dtype=torch.float64), torch.randn(1, 6, 2, 2, dtype=torch.float64)]
    _, ld = fc(xs)
    assert ld.item() == pytest.approx(0.636 * alpha * math.atan(5.0 / alpha) * sum(x.numel() for x in xs), rel=1e-12)


def test_fusion_outputs_clipped_at_one_million():
    "The fusion coupling clips its outputs to +-1e6 ([code] `FusionCouplingLayer.forward`). Kills: either bound moved."
    from test_pinned import _fusion_with_constant_log_scale
    fc = _fusion_with_constant_log_scale(0.0)                       # log-scale 0, shift 0: the outputs are the inputs
    xs = [torch.full((1, 4, 2, 2), 3e6, dtype=torch.float64), torch.full((1, 6, 1, 1), -3e6, dtype=torch.float64)]
    xs[0][0, 0, 0, 0] = 5.0
    zs, _ = fc(xs)
    assert zs[0].max() == 1e6 and zs[1].min() == -1e6 and (zs[0] == 5.0).sum() == 1


def test_hgad_label_free_class_is_the_argmax_of_the_summed_level_posteriors():
    """HGAD 'label_free' (ours): the test class is the argmax over classes of the inter-class posterior averaged over
    positions and summed over levels. Kills: the sum over levels -> a product."""
    from vqflow_nb.hgad import HGAD, HGADConfig
    torch.manual_seed(0)
    m = HGAD(HGADConfig.small([8, 8], 3, depth=1, pos_dim=8, n_centers=2, seed=0, variant='label_free')).eval()
    with torch.no_grad():   # equal centres: the posterior is the mixture weights, whatever z
        for pr, pi in zip(m.priors, ([0.05, 0.15, 0.8], [0.05, 0.6, 0.35])):
            pr.mu.zero_(); pr.phi_inter.copy_(torch.tensor(pi).log())
    feats = [torch.randn(2, 8, 3, 3), torch.randn(2, 8, 2, 2)]
    s = m.score(feats, None, out_size=(8, 8))
    assert s.parts['cls_used'].tolist() == [2, 2]                   # sum [0.1, 0.75, 1.15]; a product [.0025, .09, .28]


def test_hvq_maps_window_never_below_one_pixel():
    "`hvq_maps` pools over at least one pixel when the map is smaller than a token. Kills: `max(1, ...)` -> `max(0, ...)`."
    from vqflow_nb.hvqtrans import hvq_maps
    err = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))
    s = hvq_maps(err, (4, 4), pool=1, upsample=16)                  # round(1 * 4 / 64) = 0 -> window 1
    torch.testing.assert_close(s.image, s.pixel.flatten(1).amax(1))


def test_hvqtrans_label_free_routes_on_the_top_encoder_output():
    """`HVQTrans.score` with the label-free router scores each image as the labelled model would with the class that
    `route` picks from the top encoder output e4. Kills: routing on e3."""
    from vqflow_nb.hvqtrans import HVQTrans, HVQTransConfig
    from dataclasses import replace
    torch.manual_seed(0)
    cfg = HVQTransConfig.small('cached+label_free', channels=12, feature_size=(2, 2), n_classes=3, n_codes=4, embed_dim=8,
                               heads=2, ffn=16)
    m = HVQTrans(cfg).eval()
    feats = [torch.randn(6, 12, 2, 2, generator=torch.Generator().manual_seed(3))]
    with torch.no_grad():
        es = m(feats, torch.zeros(6, dtype=torch.long))['es']
        m.codebooks.book(0, 'top').embed.copy_(es[4][0].T)          # class 0's top codes: image 0's e4 tokens
        m.codebooks.book(1, 'top').embed.copy_(es[3][0].T)          # class 1's: image 0's e3 tokens
    c4 = m.route(es[4])
    assert not torch.equal(c4, m.route(es[3]))                      # the data tells the two levels apart
    s = m.score(feats, None, out_size=(2, 2))
    lab = HVQTrans(replace(cfg, router='label')).eval(); lab.load_state_dict(m.state_dict())
    torch.testing.assert_close(s.pixel, lab.score(feats, dict(cls_index=c4), out_size=(2, 2)).pixel)


def test_pixel_metrics_refuse_pro_maps_of_another_shape():
    "`pixel_metrics(pro_maps=...)` of another shape is an error naming pro_maps. Kills: `!=` -> `<` in the shape check."
    masks = np.zeros((2, 6, 6), np.uint8); masks[0, 1:3, 1:3] = 1
    maps = np.random.default_rng(0).random((2, 6, 6))
    for shape in ((2, 8, 8), (2, 4, 4)):
        with pytest.raises(ValueError, match='pro_maps: shape'): pixel_metrics_(masks, maps, np.zeros(shape))


def pixel_metrics_(masks, maps, pro):
    from vqflow_nb.metrics import pixel_metrics
    return pixel_metrics(masks, maps, pro_maps=pro)


def test_cosine_schedule_when_the_warmup_fills_the_run():
    """`Schedule(cosine=True)` with the warm-up as long as the run (which `fit` warns about) still gives the warm-up factors,
    never a division by zero. Kills: `max(epochs - warmup, 1)` -> `max(..., 0)`."""
    sch = Schedule(epochs=3, warmup_epochs=3, warmup_start=0.1, cosine=True, cosine_min=0.01)
    assert [sch.lr_factor(e) for e in range(3)] == pytest.approx([0.1, 0.4, 0.7])


def test_degenerate_warning_points_at_the_callers_fit_line():
    """A degenerate evaluation warns with `DegenerateWarning` attributed to the line that called `fit` (stacklevel 3).
    Kills: another stacklevel."""
    import warnings
    from vqflow_nb.method import Scores
    from vqflow_nb.train import DegenerateWarning

    class Flat(_Scripted):
        def score(self, feats, batch, out_size=None):
            return Scores(image=torch.zeros(len(batch['label'])), pixel=torch.zeros(len(batch['label']), 8, 8))
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        fit(Flat([(True, True)]), _Store(), _Store(), progress=False, seed=0)
    deg = [w for w in ws if issubclass(w.category, DegenerateWarning)]
    assert deg and all(w.filename == __file__ for w in deg)
