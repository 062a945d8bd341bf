"Fast tests of vqflow_nb.hgad: FrEIA equivalence in HGAD's configuration, prior, losses, schedule, scoring, checkpoints."
import copy, math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from vqflow_nb.flows import hgad_flow
from vqflow_nb.hgad import (AUTHORS, GCONST, HGAD, HGADConfig, HierarchicalPrior, anomaly_from_levels, build,
                            hgad_losses, hgad_lr_factor, init_main_centres, meta_layout)
from vqflow_nb.train import Schedule, collect_scores, fit, make_optimizer


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _tiny(variant='code', seed=0, **kw):
    torch.manual_seed(seed)
    return HGAD(HGADConfig.small([8, 8], 3, **{**dict(depth=2, pos_dim=8, n_centers=3, seed=seed, variant=variant), **kw}))


class _Store(torch.utils.data.Dataset):
    "In-memory feature store with the FeatureStore item layout."
    def __init__(self, n=12, seed=0, size=16, shapes=((8, 4, 4), (8, 2, 2))):
        g = torch.Generator().manual_seed(seed)
        self.feats = [torch.randn(n, *s, generator=g) for s in shapes]
        self.cls_index = np.arange(n) % 3
        self.labels = (np.arange(n) // 3) % 2
        self.masks = (torch.rand(n, 1, size, size, generator=g) > 0.8).float() * torch.as_tensor(self.labels).view(-1, 1, 1, 1)
        self.classes = ['a', 'b', 'c']
    def __len__(self): return len(self.labels)
    def __getitem__(self, i):
        return dict(feats=[f[i] for f in self.feats], label=int(self.labels[i]), cls_index=int(self.cls_index[i]),
                    mask=self.masks[i], has_mask=True, index=i)


# ---------------------------------------------------------------- flows vs the FrEIA the authors pinned
def _freia_flow(C, P, depth):
    "The authors' conditional_flow_model with installed freia 0.2 (== FrEIA @4e0c6ab for all_in_one_block.py)."
    Ff, Fm = pytest.importorskip("FrEIA.framework"), pytest.importorskip("FrEIA.modules")
    sub = lambda ci, co: torch.nn.Sequential(torch.nn.Linear(ci, 2 * ci), torch.nn.ReLU(), torch.nn.Linear(2 * ci, co))
    inn = Ff.SequenceINN(C)
    for _ in range(depth):
        inn.append(Fm.AllInOneBlock, cond=0, cond_shape=(P,), subnet_constructor=sub, affine_clamping=1.9,
                   global_affine_type='SOFTPLUS', permute_soft=True)
    return inn


def _randomize(m, std=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if p.requires_grad and 'perm' not in n: p.add_(std * torch.randn(p.shape, generator=g))
    return m


def _load_all(ours, inn):
    sd = inn.state_dict()
    for k, blk in enumerate(ours.blocks):
        blk.load_freia_state_dict({n[len(f'module_list.{k}.'):]: v for n, v in sd.items() if n.startswith(f'module_list.{k}.')})


@pytest.mark.parametrize("C,P,depth", [(200, 256, 2), (7, 16, 3)])   # 200/256: the authors' widths (blocks are identical in kind)
def test_flow_matches_freia_0_2_in_hgad_configuration(C, P, depth):
    "Vector mode, soft permutation, clamp 1.9, SOFTPLUS, a P-d condition: same permutations from the same numpy seed, same maps."
    np.random.seed(0); inn = _freia_flow(C, P, depth)
    np.random.seed(0); ours = hgad_flow(C, pos_dim=P, depth=depth)              # seed=None: numpy's global RNG, like FrEIA
    for k, blk in enumerate(ours.blocks):
        torch.testing.assert_close(blk.w_perm, inn.module_list[k].w_perm.data.view(C, C), rtol=0, atol=0)
    _randomize(inn, std=0.3); _load_all(ours, inn)
    inn, ours = inn.double(), ours.double()
    x, c = 3 * torch.randn(64, C, dtype=torch.float64), torch.randn(64, P, dtype=torch.float64)
    z_ref, ld_ref = inn(x, [c])
    z, ld = ours(x, c)
    torch.testing.assert_close(z, z_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-10, atol=1e-10)


def test_freia_clamp_formula_is_the_0_2_one():
    "With large subnet outputs the 2023 FrEIA clamp alpha*tanh(0.1a/alpha) differs; the authors' pin uses alpha*tanh(0.1a)."
    C, P = 6, 4
    np.random.seed(1); inn = _freia_flow(C, P, 2)
    np.random.seed(1); ours = hgad_flow(C, pos_dim=P, depth=2)
    np.random.seed(1); head = hgad_flow(C, pos_dim=P, depth=2, clamp_variant='freia_head')
    _randomize(inn, std=1.0); _load_all(ours, inn); _load_all(head, inn)
    x, c = 3 * torch.randn(32, C), torch.randn(32, P)
    z_ref, ld_ref = inn(x, [c])
    torch.testing.assert_close(ours(x, c)[1], ld_ref, rtol=1e-5, atol=1e-4)
    assert (head(x, c)[1] - ld_ref).abs().max() > 1e-2                          # the formulas are distinguishable here


def test_logdet_against_autograd():
    torch.manual_seed(0)
    f = _randomize(hgad_flow(10, pos_dim=8, depth=3, seed=0), std=0.2).double()
    x, c = torch.randn(4, 10, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64)
    _, ld = f(x, c)
    for i in range(4):
        J = torch.autograd.functional.jacobian(lambda v: f(v[None], c[i:i + 1])[0][0], x[i])
        torch.testing.assert_close(torch.linalg.slogdet(J)[1], ld[i], rtol=0, atol=1e-6)   # W is float32-rounded, like freia's


def test_load_authors_checkpoint_layout():
    "The authors' save_model dict (freia SequenceINN state dicts + ParameterLists) loads into our modules."
    C, P, Y, M = 9, 8, 3, 4
    m = HGAD(HGADConfig.small([C, C], Y, depth=2, pos_dim=P, n_centers=M))
    flows = []
    for _ in range(2):
        np.random.seed(len(flows)); flows.append(_randomize(_freia_flow(C, P, 2), std=0.2, seed=len(flows)))
    plist = lambda shape: torch.nn.ParameterList([torch.nn.Parameter(torch.randn(*shape)) for _ in range(2)])
    mus, deltas, pin, pia = plist((Y, C)), plist((Y, M - 1, C)), plist((Y,)), plist((Y, M))
    sd = dict(epoch=3, nfs=[f.state_dict() for f in flows], mus=mus.state_dict(), mu_deltas=deltas.state_dict(),
              phi_inters=pin.state_dict(), phi_intras=pia.state_dict())
    m.load_authors_state(sd)
    x = torch.randn(2, C, 3, 3)
    z, ld = m.level(1, x)
    cond = m.pos(3, 3, 'cpu', torch.float32).repeat(2, 1)
    z_ref, ld_ref = flows[1](x.permute(0, 2, 3, 1).reshape(-1, C), [cond])   # the authors' reshape and condition
    torch.testing.assert_close(z, z_ref, rtol=1e-5, atol=1e-5); torch.testing.assert_close(ld, ld_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(m.priors[1].delta.data, deltas[1].data)
    torch.testing.assert_close(m.priors[0].phi_intra.data, pia[0].data)


# ---------------------------------------------------------------- prior
def test_main_centre_init():
    mu = init_main_centres(15, 200)
    assert float(mu.max()) == pytest.approx(5 / math.sqrt(26))                  # integer 2D // Y as in the code
    assert int((mu.abs().sum(0) == 0).sum()) == 5                                # leftover columns stay 0
    d = torch.cdist(mu, mu)[~torch.eye(15, dtype=bool)]
    torch.testing.assert_close(d, torch.full_like(d, 5.0))
    mu = init_main_centres(5, 112)                                               # the offline preset: 22 blocks, 2 zero columns
    assert int((mu.abs().sum(0) == 0).sum()) == 2 and float(mu.max()) == pytest.approx(5 / math.sqrt(44))
    with pytest.raises(ValueError, match='indistinguishable'): init_main_centres(15, 10)


def test_log_densities_against_torch_distributions():
    torch.manual_seed(0)
    pr = HierarchicalPrior(7, 4, 5).double()
    with torch.no_grad(): pr.phi_inter.normal_(); pr.phi_intra.normal_(); pr.delta.mul_(2)
    z, y = 3 * torch.randn(20, 7, dtype=torch.float64), torch.randint(0, 4, (20,))
    mix = MixtureSameFamily(Categorical(logits=pr.phi_inter), Independent(Normal(pr.mu, 1.0), 1))
    torch.testing.assert_close(pr.log_prob_inter(z), mix.log_prob(z), rtol=1e-10, atol=1e-10)
    C = pr.centres()
    ref = torch.stack([MixtureSameFamily(Categorical(logits=pr.phi_intra[y[i]]), Independent(Normal(C[y[i]], 1.0), 1)).log_prob(z[i])
                       for i in range(20)])
    torch.testing.assert_close(pr.log_prob_intra(z, y), ref, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- losses against direct computations
def _direct_losses(pr, z, ld, y, stage2, lam1=1.0, lam2=100.0, eps=0.02):
    "Every term written out per position with explicit sums over centres (float64)."
    Y, M, D = pr.n_classes, pr.n_centers, pr.dim
    pi, C = torch.softmax(pr.phi_inter, 0), pr.centres()
    out = {k: [] for k in ('L_g', 'L_mi', 'L_e', 'L_g_intra', 'L_z')}
    for i in range(len(z)):
        g = torch.stack([torch.exp(-0.5 * ((z[i] - pr.mu[k]) ** 2).sum()) for k in range(Y)])
        out['L_g'].append((-torch.log((pi * g).sum()) - ld[i]) / D)
        post = pi.detach() * g / (pi.detach() * g).sum()
        yt = torch.full((Y,), eps / Y, dtype=z.dtype); yt[y[i]] += 1 - eps
        out['L_mi'].append((yt * (torch.log(post) - torch.log(pi.detach()))).sum())
        q = g / g.sum()
        out['L_e'].append(-(q * torch.log(q)).sum())
        w = torch.softmax(pr.phi_intra[y[i]], 0)
        h = torch.stack([torch.exp(-0.5 * ((z[i] - C[y[i], k]) ** 2).sum()) for k in range(M)])
        dens = (w * h).sum()
        out['L_g_intra'].append((-torch.log(dens) - ld[i]) / D)
        logp = (D * math.log(1 / math.sqrt(2 * math.pi)) + torch.log(dens) + ld[i]) / D
        out['L_z'].append(-torch.log(torch.sigmoid(logp)))
    t = {k: torch.stack(v).mean() for k, v in out.items()}
    loss = lam1 * t['L_g'] - lam2 * t['L_mi'] + t['L_e'] + ((t['L_g_intra'] + t['L_z']) if stage2 else 0)
    return loss, t


@pytest.mark.parametrize("stage2", [False, True])
def test_losses_against_direct_computation(stage2):
    torch.manual_seed(1)
    pr = HierarchicalPrior(6, 3, 4).double()
    with torch.no_grad(): pr.phi_inter.normal_(); pr.phi_intra.normal_(); pr.mu.mul_(0.5)
    z, ld, y = 1.5 * torch.randn(15, 6, dtype=torch.float64), torch.randn(15, dtype=torch.float64), torch.randint(0, 3, (15,))
    got = hgad_losses(pr, z, ld, y, stage2)
    loss, want = _direct_losses(pr, z, ld, y, stage2)
    for k, v in got.items():
        if k != 'loss': torch.testing.assert_close(v, want[k], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got['loss'], loss, rtol=1e-10, atol=1e-10)
    # gradients: same as the direct form, except the main centres, which the intra terms see detached
    params = [pr.mu, pr.delta, pr.phi_inter, pr.phi_intra]
    g_got = torch.autograd.grad(got['loss'], params, allow_unused=True)
    pr2 = copy.deepcopy(pr)
    loss2, _ = _direct_losses(pr2, z, ld, y, stage2)
    g_dir = torch.autograd.grad(loss2, [pr2.mu, pr2.delta, pr2.phi_inter, pr2.phi_intra], allow_unused=True)
    torch.testing.assert_close(g_got[2], g_dir[2])                                # phi_inter: L_g only (detached in L_mi)
    if stage2:
        torch.testing.assert_close(g_got[1], g_dir[1]); torch.testing.assert_close(g_got[3], g_dir[3])
        inter_only = torch.autograd.grad(hgad_losses(pr, z, ld, y, False)['loss'], pr.mu)[0]
        torch.testing.assert_close(g_got[0], inter_only)                          # mu: the inter-class terms only
    else:
        assert g_got[1] is None and g_got[3] is None


# ---------------------------------------------------------------- optimisation
def _authors_lrs(lr, meta_epochs, sub_epochs, iters, warm=2, rate=0.1):
    "The lr of every group per iteration, by replaying the authors' per-meta-epoch and per-iteration setters literally."
    groups = [dict(lr=lr), dict(lr=3 * lr), dict(lr=lr)]               # as the param groups ask for
    eta = lr * rate ** 3
    warm_to = eta + (lr - eta) * (1 + math.cos(math.pi * warm / meta_epochs)) / 2
    out = []
    for ep in range(meta_epochs):
        v = eta + (lr - eta) * (1 + math.cos(math.pi * ep / meta_epochs)) / 2
        for g in groups: g['lr'] = v                                   # adjust_learning_rate: every group
        for sub in range(sub_epochs):
            for i in range(iters):
                if ep < warm:                                          # warmup_learning_rate: every group again
                    p = (i + sub * iters + ep * iters * sub_epochs) / (warm * iters * sub_epochs)
                    for g in groups: g['lr'] = lr / 10 + p * (warm_to - lr / 10)
                out.append([g['lr'] for g in groups])
    return np.array(out)


def test_lr_schedule_matches_the_authors_loop():
    m = _tiny()
    sch = m.schedule()
    assert sch.epochs == 200
    groups = m.param_groups(sch)
    theirs = _authors_lrs(2e-4, 25, 8, 5)
    ours = np.array([[sch.lr * m.lr_factor(sch, e, s, 5) * g.get('lr_scale', 1.0) for g in groups] for e in range(200) for s in range(5)])
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=0)           # the 3x of the centres never takes effect
    p = _tiny('paper'); gp = p.param_groups(sch)
    assert [g.get('lr_scale', 1.0) for g in gp] == [1.0, 3.0, 1.0]
    assert [g['weight_decay'] for g in gp] == [1e-4, 0.0, 0.0]


def test_meta_layout_and_stage_switch():
    assert meta_layout(200) == (25, 8) and meta_layout(16) == (16, 1) and meta_layout(100) == (25, 4)
    m = _tiny()
    sch = replace(m.schedule(), epochs=16)
    stages = []
    for e in range(16): m.passes_done.fill_(e); stages.append(bool(m.stage2(sch.epochs)))
    assert stages == [False, False] + [True] * 14
    m.param_groups(sch)   # no side effect: the run's length reaches HGAD only through the schedule it is given
    m.passes_done.fill_(2); assert not m.stage2() and m.stage2(16)   # the authors' 200 epochs: meta-epoch 0 of 25
    assert m.lr_factor(sch, 15, 0, 5) != m.lr_factor(m.schedule(), 15, 0, 5)
    assert hgad_lr_factor(0, 0, 10, 16) == pytest.approx(0.1)


def test_per_level_steps_torch2_vs_torch1():
    "code: a level's step leaves the other level alone (grads None); torch1: zero grads still move it (momentum)."
    for variant, moves in [('code', False), ('torch1', True)]:
        m = _tiny(variant); sch = m.schedule(); opt = make_optimizer(m.param_groups(sch), sch)
        st = _Store(4)
        b = torch.utils.data.default_collate([st[i] for i in range(4)])
        m.training_step(b['feats'], b, opt, sch)
        before = [p.detach().clone() for p in m.flows[1].parameters()]
        opt.zero_grad(set_to_none=m.cfg.grads_to_none)
        m._level_loss(0, b['feats'][0], b['cls_index'], False)['loss'].backward(); opt.step()
        changed = any(not torch.equal(a, p) for a, p in zip(before, m.flows[1].parameters()))
        assert changed == moves, variant


def test_fit_stages_and_resume(tmp_path):
    "Through the shared trainer: stage 2 from pass 2 of a 4-pass run; a resumed run equals an uninterrupted one."
    st = _Store(12)
    a = _tiny(); ra = fit(a, st, None, seed=0, epochs=4, batch_size=4, progress=False)
    assert ['L_g_intra' in h for h in ra.history] == [False, False, True, True]
    b = _tiny(); fit(b, st, None, seed=0, epochs=4, batch_size=4, progress=False, out_dir=tmp_path, max_epochs=2)
    c = _tiny()
    rc = fit(c, st, None, seed=0, epochs=4, batch_size=4, progress=False, out_dir=tmp_path)
    assert int(c.passes_done) == 4 and [('L_g_intra' in h) for h in rc.history] == [False, False, True, True]
    for (n, p), q in zip(a.state_dict().items(), c.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)


# ---------------------------------------------------------------- scoring
def test_scores_normalised_over_the_class_and_checkpoint_round_trip():
    st = _Store(12)
    m = _tiny()
    fit(m, st, None, seed=0, epochs=1, batch_size=4, progress=False)
    per = collect_scores(m, st, batch_size=5, progress=False)
    for c, d in per.items():
        assert d['maps'].shape == (4, 16, 16) and d['scores'].shape == (4,)
        np.testing.assert_allclose(d['scores'], d['maps'].reshape(4, -1).max(1))
        n = len(m.flows)
        want = (anomaly_from_levels([d['parts'][f'logp{l}'] for l in range(n)], (16, 16), 4 * 16 / 256)
                * anomaly_from_levels([d['parts'][f'negent{l}'] for l in range(n)], (16, 16), 4 * 16 / 256))
        np.testing.assert_allclose(d['maps'], want)
    # the batch size does not matter: the normalisation is over the whole class, not the batch
    per1 = collect_scores(m, st, batch_size=1, progress=False)
    for c in per: np.testing.assert_allclose(per1[c]['maps'], per[c]['maps'], rtol=1e-5, atol=1e-6)
    # state_dict round trip into a model built with other permutation seeds: identical scores
    m2 = _tiny(seed=9); m2.load_state_dict(m.state_dict())
    per2 = collect_scores(m2, st, batch_size=5, progress=False)
    for c in per: assert np.array_equal(per2[c]['maps'], per[c]['maps']) and np.array_equal(per2[c]['scores'], per[c]['scores'])


def test_logp_part_is_the_intra_class_log_likelihood_per_dim():
    st = _Store(6)
    m = _tiny()
    b = torch.utils.data.default_collate([st[i] for i in range(6)])
    s = m.score(b['feats'], b, (16, 16))
    for l, x in enumerate(b['feats']):
        z, ld = m.level(l, x)
        y = b['cls_index'].repeat_interleave(x.shape[2] * x.shape[3])
        pr = m.priors[l]
        C = pr.centres()[y]                                                       # the direct (z - mu)^2 form of the code's get_logps
        lse = torch.logsumexp(-0.5 * ((z[:, None] - C) ** 2).sum(2) + pr.phi_intra.log_softmax(1)[y], 1)
        want = (pr.dim * GCONST + lse + ld) / pr.dim
        torch.testing.assert_close(s.parts[f'logp{l}'].flatten(), want.detach(), rtol=1e-5, atol=1e-5)
        lg = -0.5 * torch.cdist(z, pr.mu) ** 2
        torch.testing.assert_close(s.parts[f'negent{l}'].flatten(), (lg.softmax(1) * lg.log_softmax(1)).sum(1).detach(), rtol=1e-4, atol=1e-5)


def test_label_free_does_not_read_labels():
    st = _Store(9)
    m = _tiny(); fit(m, st, None, seed=0, epochs=1, batch_size=3, progress=False)
    lf = HGAD(replace(m.cfg, variant='label_free')); lf.load_state_dict(m.state_dict())
    assert lf.needs_labels == 'train' and m.needs_labels == 'train+test'
    b = torch.utils.data.default_collate([st[i] for i in range(9)])
    ref = lf.score(b['feats'], b, (16, 16)).parts
    for cls in (b['cls_index'][torch.randperm(9)], torch.roll(b['cls_index'], 1)):
        s = lf.score(b['feats'], dict(b, cls_index=cls), (16, 16)).parts
        for k in ref: assert torch.equal(s[k], ref[k]), k
    s = lf.score(b['feats'], {k: v for k, v in b.items() if k != 'cls_index'}, (16, 16)).parts
    for k in ref: assert torch.equal(s[k], ref[k])
    # the labelled default does depend on the label (the test above could not pass by accident)
    s1 = m.score(b['feats'], b, (16, 16)).parts['logp0']
    s2 = m.score(b['feats'], dict(b, cls_index=torch.roll(b['cls_index'], 1)), (16, 16)).parts['logp0']
    assert not torch.equal(s1, s2)
    with pytest.raises(ValueError, match='label_free'): m.score(b['feats'], {}, (16, 16))


def test_sigma_follows_mask_size():
    maps = [np.random.default_rng(0).normal(size=(2, 4, 4)).astype(np.float32)]
    a = anomaly_from_levels(maps, (64, 64), sigma=0)
    np.testing.assert_allclose(anomaly_from_levels(maps, (64, 64), sigma=1.0),
                               np.stack([__import__('scipy').ndimage.gaussian_filter(x, 1.0) for x in a]), rtol=1e-6)


# ---------------------------------------------------------------- contract
def test_build_and_authors():
    from vqflow_nb.features import PRESETS
    assert AUTHORS == dict(backbone='hgad', image_size=1024, epochs=200) and AUTHORS['backbone'] in PRESETS
    m = build([112, 112, 112], variant='paper+label_free', small=True, seed=1, n_classes=5, extractor=None)
    assert (m.cfg.depth, m.cfg.pos_dim, m.cfg.n_classes, m.cfg.centre_lr_scale, m.needs_labels) == (4, 64, 5, 3.0, 'train')
    cfg = HGADConfig.for_channels([200, 200, 200], 15)
    assert (cfg.depth, cfg.pos_dim, cfg.n_centers, cfg.clamp, cfg.clamp_variant) == (12, 256, 10, 1.9, 'freia0.2')
    assert isinstance(m.flows, torch.nn.ModuleList) and len(m.flows) == 3 and isinstance(m.priors, torch.nn.ModuleList)
    assert all(k.startswith(('flows.', 'priors.', 'passes_done')) for k in m.state_dict())
    with pytest.raises(ValueError): build([8, 8], n_classes=None)
    with pytest.raises(ValueError, match='unknown variant'): build([8, 8], n_classes=2, variant='nope')
