"""HGAD side of `vs_authors.py --method hgad`: the authors' model (xcyao00/HGAD) from their checkout, every weight
copied into `vqflow_nb.hgad.HGAD`, their per-level training iteration and their per-image validation, ours beside.

Their files are imported as they are (never copied or edited). Replaced: the backbone's ImageNet weights
(`models/model.py:Encoder` calls `timm.create_model(..., pretrained=True)`) by the same timm architecture with
random weights (copied into our extractor as well), and, on a CPU only, `utils.onehot` (it allocates a
`torch.cuda.FloatTensor`) by the same smoothed one-hot on the batch's device.

`train.py:train` and `validate` are loops over a dataset with the step inline, so their step is driven here
line for line with their objects: `model.encoder(image)` under no_grad, then for each level the reshape to
(N, C) rows, `nf_model.positionalencoding2d`, `model(e, (label, onehot), pos, scale=l, epoch=2)` (stage 2: all five
losses), the loss sum of `train` for epoch >= 2, `model.optimizer.zero_grad()`, `backward`, `step`. Their inference
is `validate`'s per-image body (batch 1: encoder, per-level flow, `get_logps`, the inter-class entropy) for each
image, then their `convert_to_anomaly_scores` for both maps and the product's max.
"""
from __future__ import annotations
import copy, sys, types
from pathlib import Path

SIZES = dict(
    authors=dict(img=1024, batch=8, coupling_layers=12, pos=256, centers=10, backbone='tf_efficientnet_b6'),  # main.py defaults
    small=dict(img=512, batch=4, coupling_layers=12, pos=256, centers=10, backbone='tf_efficientnet_b6'),     # CPU: 1/4 of the positions
    smoke=dict(img=128, batch=2, coupling_layers=2, pos=32, centers=3, backbone='tf_efficientnet_b6'))
N_CLASSES, MSK = 15, 256
VARIANTS = ('ours', 'ours+backbone', 'ours+dense')
# what each of our sides does in a training step / an inference, against theirs (the backbone runs in every step of theirs)
SIDE_NOTES = {'ours': 'flows on the cached pyramid (the backbone ran once, into the feature cache); positional broadcast on',
              'ours+backbone': 'our extractor on the images, then the same flow steps (their loop\'s work, our code)',
              'ours+dense': 'flows on the cached pyramid with the dense positional condition (pos_broadcast=False)'}

def import_authors(authors_dir:str):
    d = Path(authors_dir).resolve()
    if not (d / 'models' / 'nf_model.py').exists():
        raise SystemExit(f'--authors {authors_dir}: no models/nf_model.py there (a checkout of xcyao00/HGAD?)')
    from _vs_common import forget_other_authors; forget_other_authors(str(d))
    if str(d) in sys.path: sys.path.remove(str(d))
    sys.path.insert(0, str(d))
    import main, train as T, utils as U
    import models.model as MM, models.nf_model as NF
    if not hasattr(MM, '_vs_authors_timm'):
        import timm
        MM._vs_authors_timm = timm
        MM.timm = types.SimpleNamespace(create_model=lambda *a, **k: timm.create_model(*a, **{**k, 'pretrained': False}))
    return types.SimpleNamespace(main=main, T=T, U=U, MM=MM, NF=NF)

def authors_args(A, size:dict, device):
    "Their `main.parse_args()` defaults with the size's overrides, `setting_lr_parameters`, and what `train` adds."
    argv = sys.argv
    sys.argv = ['main.py', '--img_size', str(size['img']), '--batch_size', str(size['batch']),
                '--coupling_layers', str(size['coupling_layers']), '--pos_embed_dim', str(size['pos']),
                '--n_intra_centers', str(size['centers']), '--backbone_arch', size['backbone'], '--msk_size', str(MSK)]
    try: args = A.main.parse_args()
    finally: sys.argv = argv
    A.U.setting_lr_parameters(args)
    args.device, args.n_classes = device, N_CLASSES
    args.class_to_idx = {str(i): i for i in range(N_CLASSES)}
    return args

def onehot(A, y, n, smooth, device):
    "Their `utils.onehot` on CUDA; on a CPU the same smoothed one-hot built on the CPU."
    import torch
    if device.type == 'cuda': return A.U.onehot(y, n, smooth)
    o = torch.zeros(y.shape[0], n, device=device).scatter_(1, y.view(-1, 1), 1.)
    return o * (1 - smooth) + smooth / n if smooth else o

# ---------------------------------------------------------------------------------------------------------------
def ours_model(args, device, pos_broadcast=True):
    from vqflow_nb.hgad import HGAD, HGADConfig
    cfg = HGADConfig.for_channels([200] * 3, N_CLASSES, depth=args.coupling_layers, pos_dim=args.pos_embed_dim,
                                  n_centers=args.n_intra_centers, seed=0, pos_broadcast=pos_broadcast)
    return HGAD(cfg).to(device)

def transplant(theirs, ours) -> int:
    "Their `utils.save_model` dict loaded by our `HGAD.load_authors_state` (the path a released checkpoint takes)."
    sd = dict(epoch=0, nfs=[nf.state_dict() for nf in theirs.nfs], phi_inters=theirs.phi_inters.state_dict(),
              phi_intras=theirs.phi_intras.state_dict(), mus=theirs.mus.state_dict(), mu_deltas=theirs.mu_deltas.state_dict())
    ours.load_authors_state(sd)
    n_theirs = sum(p.numel() for g in theirs.optimizer.param_groups for p in g['params'])
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    if n_theirs != n_ours: raise RuntimeError(f'transplant: {n_theirs} trainable numbers theirs vs {n_ours} ours')
    return n_theirs

def ours_extractor(theirs, size, device):
    "Our pyramid extractor (the 'hgad' preset at this image size) holding their encoder's random weights."
    from vqflow_nb.features import FeatureExtractor
    ext = FeatureExtractor.from_preset('hgad', backbone=size['backbone'], weights='random', input_size=size['img'])
    ext.backbone.load_state_dict(theirs.encoder.feature_extractor.state_dict())
    return ext.to(device).eval()

def setup(authors_dir:str, size:str, device, seed:int=0) -> dict:
    import torch, numpy as np
    A = import_authors(authors_dir)
    sz = SIZES[size]
    torch.manual_seed(seed); np.random.seed(seed)
    import contextlib, io
    args = authors_args(A, sz, device)
    with contextlib.redirect_stdout(io.StringIO()): theirs = A.MM.HGAD(args).to(device)
    ours = ours_model(args, device)
    n = transplant(theirs, ours)
    ours.passes_done.fill_(2 * ours.cfg.sub_epochs)       # meta-epoch 2: stage 2, as their epoch=2 below
    A.U.adjust_learning_rate(args, theirs.optimizer, 2)   # their loop at meta-epoch 2 sets one lr for every group
    ext = ours_extractor(theirs, sz, device)
    g = torch.Generator().manual_seed(seed)
    B = sz['batch']
    x = torch.rand(B, 3, sz['img'], sz['img'], generator=g).to(device)          # images in [0, 1] (ours normalises)
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    cls = (torch.arange(B) * 7 % N_CLASSES).to(device)
    S = dict(A=A, args=args, theirs=theirs, ours=ours, ext=ext, x=x, xn=(x - mean) / std, cls=cls, n_numbers=n, size=size,
             device=device, lr=theirs.optimizer.param_groups[0]['lr'],
             spec=dict(sz, n_classes=N_CLASSES, channels=200, mask=MSK, levels=[sz['img'] // 16 >> l for l in range(3)]))
    with torch.no_grad(): S['feats'] = ext(x)                                    # the cached pyramid (our extractor)
    return S

# ---------------------------------------------------------------------------------------------------------------
def authors_level_losses(S, features, lvl, label, epoch=2):
    "One level of their training loop: rows, condition, `model(...)`; returns (loss, losses)."
    A, args, m = S['A'], S['args'], S['theirs']
    e = features[lvl].detach()
    bs, dim, h, w = e.size()
    e = e.permute(0, 2, 3, 1).reshape(-1, dim)
    label_r = label.view(-1, 1, 1).repeat([1, h, w])
    label_onehot = onehot(A, label_r.reshape(-1), N_CLASSES, args.label_smoothing, S['device'])
    pos = A.NF.positionalencoding2d(args.pos_embed_dim, h, w).to(S['device']).unsqueeze(0).repeat(bs, 1, 1, 1)
    pos = pos.permute(0, 2, 3, 1).reshape(-1, args.pos_embed_dim)
    losses = m(e, (label_r, label_onehot), pos, scale=lvl, epoch=epoch)
    loss = args.lambda1 * losses['L_g'] - args.lambda2 * losses['L_mi'] + losses['L_g_intra'] + losses['L_z'] + losses['L_e']
    return loss, losses

def authors_train_step(S, features=None):
    "Their loop's iteration: backbone (no grad) unless `features` is given, then per level zero_grad/backward/step."
    import torch
    m = S['theirs']
    if features is None:
        with torch.no_grad(): features = m.encoder(S['xn'])
    total = 0.
    for lvl in range(S['args'].feature_levels):
        loss, _ = authors_level_losses(S, features, lvl, S['cls'])
        m.optimizer.zero_grad(); loss.backward(); m.optimizer.step()
        total += float(loss.detach())
    return total

def authors_features(S):
    import torch
    if 'their_feats' not in S:
        with torch.no_grad(): S['their_feats'] = S['theirs'].encoder(S['xn'])
    return S['their_feats']

def authors_image_maps(S, image, class_id):
    "`validate`'s body for one image: per level log p / D under the class's intra-class mixture, and the entropy."
    import torch
    A, args, m = S['A'], S['args'], S['theirs']
    logps_l, ent_l = [], []
    with torch.no_grad():
        features = m.encoder(image)
        for lvl in range(args.feature_levels):
            e = features[lvl].detach()
            bs, dim, h, w = e.size()
            e = e.permute(0, 2, 3, 1).reshape(-1, dim)
            pos = A.NF.positionalencoding2d(args.pos_embed_dim, h, w).to(S['device']).unsqueeze(0).repeat(bs, 1, 1, 1)
            pos = pos.permute(0, 2, 3, 1).reshape(-1, args.pos_embed_dim)
            z, ljd = m.nfs[lvl](e, [pos, ])
            z, ljd = z.reshape(-1, z.shape[-1]), ljd.reshape(-1)
            mu = m.mus[lvl]; centres = mu
            mu = torch.cat([mu.unsqueeze(1), mu.unsqueeze(1) + m.mu_deltas[lvl]], dim=1)
            y = e.new_full((image.shape[0],), class_id, dtype=torch.long)
            mu_intra = mu[y].expand([e.shape[0], mu.shape[1], dim])
            log_py = torch.log_softmax(m.phi_intras[lvl], dim=1).unsqueeze(0)[:, y, :].squeeze(0).expand([e.shape[0], mu.shape[1]])
            logps = m.get_logps(z, mu_intra, log_py, ljd, m.feat_dims[lvl]) / m.feat_dims[lvl]
            logits = -0.5 * m.calculate_distances_to_inter_class_centers(z, mu=centres)
            ent = -torch.sum(-torch.softmax(logits, dim=1) * torch.log_softmax(logits, dim=1), dim=1)
            logps_l.append(logps.reshape(bs, h, w).cpu()); ent_l.append(ent.reshape(bs, h, w).cpu())
    return logps_l, ent_l

def authors_infer(S, class_id=0):
    "Their validation of the batch's images as one class's test set (batch 1 each), then their score conversion."
    import numpy as np
    L = S['args'].feature_levels
    logps, ents = [[] for _ in range(L)], [[] for _ in range(L)]
    for i in range(len(S['xn'])):
        lp, en = authors_image_maps(S, S['xn'][i:i + 1], class_id)
        for l in range(L): logps[l].append(lp[l]); ents[l].append(en[l])
    raw = dict(logps=[__import__('torch').cat(v) for v in logps], ents=[__import__('torch').cat(v) for v in ents])
    scores = S['A'].T.convert_to_anomaly_scores(S['args'], logps) * S['A'].T.convert_to_anomaly_scores(S['args'], ents)
    return scores, np.max(scores, axis=(1, 2)), raw

def ours_optimizer(m, lr):
    from vqflow_nb.train import make_optimizer
    sch = m.schedule()
    opt = make_optimizer(m.param_groups(sch), sch)
    for g in opt.param_groups: g['lr'] = lr * g.get('lr_scale', 1.0)   # the lr their loop sets at meta-epoch 2
    return opt

def ours_train_step(m, opt, S, backbone=False):
    import torch
    m.train()
    if backbone:
        with torch.no_grad(): feats = S['ext'](S['x'])
    else: feats = S['feats']
    return float(m.training_step(feats, dict(cls_index=S['cls']), opt, None)['loss'])

def ours_infer(m, S, backbone=False, class_id=0):
    "Our score of the batch as one class's test set, then `finalize_scores` (class-wide normalisation, maps, max)."
    import torch, numpy as np
    m.eval()
    with torch.no_grad():
        feats = S['ext'](S['x']) if backbone else S['feats']
        cls = torch.full((len(S['x']),), class_id, dtype=torch.long, device=S['device'])
        s = m.score(feats, dict(cls_index=cls))
    d = dict(masks=np.zeros((len(S['x']), MSK, MSK), dtype=bool),
             parts={k: v.cpu().numpy() for k, v in s.parts.items() if k != 'cls_used'})
    m.finalize_scores(d)
    return d['maps'], d['scores'], s.parts

# ---------------------------------------------------------------------------------------------------------------
def equivalence(S) -> dict:
    """Same state, same images: features, per-level latents, log-det and stage-2 loss, gradients, the state after one
    whole three-level step, and the per-level maps, final maps and image scores of inference."""
    import torch
    from _vs_common import maxdiff, rel
    A, theirs, ours = S['A'], S['theirs'], S['ours']
    sd_a = copy.deepcopy(theirs.state_dict()); nfs_a = [copy.deepcopy(nf.state_dict()) for nf in theirs.nfs]
    sd_o = copy.deepcopy(ours.state_dict())
    fa = authors_features(S)
    res = dict(features=max(maxdiff(a, b) for a, b in zip(fa, S['feats'])))
    lat, ld, loss, grads, la, lo = 0., 0., 0., 0., [], []
    for lvl in range(3):
        e = S['feats'][lvl]
        theirs.optimizer.zero_grad(); ours.zero_grad()
        l_a, _ = authors_level_losses(S, S['feats'], lvl, S['cls'])
        p_o = ours._level_loss(lvl, e, S['cls'], True)
        l_a.backward(); p_o['loss'].backward()
        la.append(float(l_a.detach())); lo.append(float(p_o['loss'].detach()))
        loss = max(loss, abs(la[-1] - lo[-1]))
        blk_a = theirs.nfs[lvl].module_list[0]; blk_o = ours.flows[lvl].blocks[0]
        ga = [p.grad for p in blk_a.subnet.parameters()] + [theirs.mus[lvl].grad, theirs.mu_deltas[lvl].grad]
        go = [p.grad for p in blk_o.subnet.parameters()] + [ours.priors[lvl].mu.grad, ours.priors[lvl].delta.grad]
        grads = max([grads] + [rel(a, b) for a, b in zip(ga, go)])
        with torch.no_grad():
            B, C, h, w = e.shape
            rows = e.permute(0, 2, 3, 1).reshape(-1, C)
            pos = A.NF.positionalencoding2d(S['args'].pos_embed_dim, h, w).unsqueeze(0).repeat(B, 1, 1, 1).permute(0, 2, 3, 1).reshape(-1, S['args'].pos_embed_dim)
            z_a, j_a = theirs.nfs[lvl](rows, [pos.to(e.device)])
            z_o, j_o = ours.level(lvl, e)
        lat = max(lat, maxdiff(z_a, z_o)); ld = max(ld, maxdiff(j_a.reshape(-1), j_o))
    theirs.optimizer.zero_grad(); ours.zero_grad(set_to_none=True)
    res.update(latents=lat, log_det=ld, loss=loss, loss_theirs=la, loss_ours=lo, grad_rel=grads)
    # one whole iteration each (three per-level steps) from the same state, on the same features
    opt_state = copy.deepcopy(theirs.optimizer.state_dict())
    authors_train_step(S, S['feats'])
    opt = ours_optimizer(ours, S['lr']); ours_train_step(ours, opt, S)
    pa = [p for nf in theirs.nfs for p in nf.parameters() if p.requires_grad] + list(theirs.mus) + list(theirs.mu_deltas)
    po = [p for f in ours.flows for p in f.parameters() if p.requires_grad] + [pr.mu for pr in ours.priors] + [pr.delta for pr in ours.priors]
    res['params_after_step'] = max(maxdiff(a, b) for a, b in zip(pa, po)) if len(pa) == len(po) else float('nan')
    theirs.load_state_dict(sd_a)
    for nf, s in zip(theirs.nfs, nfs_a): nf.load_state_dict(s)
    theirs.optimizer.load_state_dict(opt_state); ours.load_state_dict(sd_o)
    # inference: the batch as one class's test set (class 0)
    maps_a, img_a, raw = authors_infer(S)
    maps_o, img_o, parts = ours_infer(ours, S)
    res.update(logp_maps=max(maxdiff(raw['logps'][l], parts[f'logp{l}']) for l in range(3)),
               entropy_maps=max(maxdiff(raw['ents'][l], parts[f'negent{l}']) for l in range(3)),
               anomaly_map=maxdiff(maps_a, maps_o), image_score=maxdiff(img_a, img_o),
               image_score_scale=float(abs(img_a).max()))
    return res

ROWS = ('features', 'latents', 'log_det', 'loss', 'grad_rel', 'params_after_step', 'logp_maps', 'entropy_maps', 'anomaly_map', 'image_score')
TOLERANCE = dict(features=1e-3, latents=1e-2, log_det=1e-1, loss=1e-3, grad_rel=1e-2, params_after_step=1e-3,
                 logp_maps=1e-3, entropy_maps=1e-3, anomaly_map=1e-3, image_score=1e-3)

def variant_model(S, v):
    from dataclasses import replace
    if v in ('ours', 'ours+backbone'): return S['ours'] if v == 'ours' else copy.deepcopy(S['ours'])
    if v == 'ours+dense':
        m = copy.deepcopy(S['ours']); m.cfg = replace(m.cfg, pos_broadcast=False); return m
    raise ValueError(f'unknown variant {v!r}; choose from {VARIANTS}')

def sides(S, variants) -> dict:
    "name -> dict(train=fn, infer=fn): theirs (backbone in the step), theirs_flows (their three level steps on given features), ours..."
    authors_features(S)
    out = dict(theirs=dict(train=lambda: authors_train_step(S), infer=lambda: authors_infer(S), kind='theirs'),
               theirs_flows=dict(train=lambda: authors_train_step(S, S['their_feats']), infer=None, kind='theirs'))
    for v in variants:
        m = variant_model(S, v); opt = ours_optimizer(m, S['lr']); bb = v == 'ours+backbone'
        out[v] = dict(train=lambda m=m, opt=opt, bb=bb: ours_train_step(m, opt, S, bb),
                      infer=lambda m=m, bb=bb: ours_infer(m, S, bb), kind='ours')
    return out

def authors_step(S): return lambda: authors_train_step(S)
