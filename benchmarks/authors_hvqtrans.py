"""HVQ-Trans side of `vs_authors.py --method hvqtrans`: the authors' model (RuiyingLu/HVQ-Trans) from their checkout,
every weight copied into `vqflow_nb.hvqtrans.HVQTrans`, their training step and inference, ours beside.

Their files are imported as they are (never copied or edited). What needs the internet or a GPU cluster is replaced:
the backbone's ImageNet weights (`models/backbones/efficientnet_b4(pretrained=True)` downloads them) by the same
architecture with random weights (`pretrained=False`; both sides then hold the same random numbers after the
transplant), `lmdb`/`cv2` (dataset and visualisation imports) by empty modules where absent. Their model is not
wrapped in DistributedDataParallel (one process; `tools/distributed.all_reduce` returns at world size 1).

Their training step is the body of `tools/train_val.py:train_one_epoch` on one batch: `model(input)`, the loss's
`.item()`, `optimizer.zero_grad()`, `backward`, `clip_grad_norm_(model.parameters(), 0.1)`, `optimizer.step()`, with
their `utils/optimizer_helper.get_optimizer` (AdamW 1e-4, wd 1e-4, from `experiments/MVTec-AD/config.yaml`).
Their inference is `models/HVQ_TR_switch_OT.HVQ_TR_switch_OT` in eval mode (the POT term) on the batch, and the image
score by their `utils/eval_helper.EvalImageMax.encode_pred` (avg-pool 16, max).
"""
from __future__ import annotations
import copy, sys, types
from pathlib import Path

# their configuration is fixed in their source (14x14 tokens, 272 channels, 15 classes, 512 codes); only the batch varies
SIZES = dict(authors=dict(batch=16, input=224),   # config.yaml: batch_size 16 per GPU, input_size 224
             small=dict(batch=4, input=224),      # CPU: fewer images per step, same model
             smoke=dict(batch=2, input=224))
N_CLASSES, CHANNELS = 15, 272
CLIP, POOL = 0.1, [16, 16]       # config.yaml: trainer.clip_max_norm, evaluator avgpool_size
VARIANTS = ('ours', 'ours+cached', 'ours+batched', 'ours+avgpool')
INFERENCE_ONLY = ('ours+avgpool',)
SIDE_NOTES = {'ours': 'the package as configured (variant code: train-mode backbone inside the step, per-image EMA)',
              'ours+avgpool': 'inference only: the image score by one 16x16 avg_pool2d as before `hvqtrans.box_mean` (same numbers)'}
CHANGED_MATHS = {'ours+cached': 'eval-mode backbone outside the step (cached features): no batch statistics, no drop-connect',
                 'ours+batched': 'one EMA codebook update per class instead of per image'}

def import_authors(authors_dir:str):
    d = Path(authors_dir).resolve()
    if not (d / 'models' / 'HVQ_TR_switch.py').exists():
        raise SystemExit(f'--authors {authors_dir}: no models/HVQ_TR_switch.py there (a checkout of RuiyingLu/HVQ-Trans?)')
    from _vs_common import forget_other_authors; forget_other_authors(str(d))
    for p in (str(d / 'tools'), str(d)):          # `import distributed as dist_fn` lives in tools/
        if p in sys.path: sys.path.remove(p)
        sys.path.insert(0, p)
    for name in ('lmdb', 'cv2'):                   # imported at module level, used only for datasets / visualisation
        try: __import__(name)
        except ImportError: sys.modules[name] = types.ModuleType(name)
    import models.HVQ_TR_switch as M, models.HVQ_TR_switch_OT as MO
    from utils.optimizer_helper import get_optimizer
    from utils.eval_helper import EvalImageMax
    for mod in (M, MO):                            # backbone weights cannot be downloaded here: random, same architecture
        if not hasattr(mod, '_vs_authors_b4'):
            mod._vs_authors_b4 = mod.efficientnet_b4
            mod.efficientnet_b4 = lambda pretrained, _f=mod._vs_authors_b4, **k: _f(False, **k)
    return types.SimpleNamespace(M=M, MO=MO, get_optimizer=get_optimizer, EvalImageMax=EvalImageMax)

def _opt(A, model):
    "Their `get_optimizer` with config.yaml's trainer.optimizer (AdamW 1e-4, betas 0.9/0.999, wd 1e-4) on the trainable parameters."
    return A.get_optimizer([{'params': filter(lambda p: p.requires_grad, model.parameters())}],
                           types.SimpleNamespace(type='AdamW', kwargs=dict(lr=1e-4, betas=[0.9, 0.999], weight_decay=1e-4)))

# ---------------------------------------------------------------------------------------------------------------
def transplant(theirs, ours) -> int:
    "Copy every weight and buffer of their HVQ_TR_switch into our HVQTrans (raises on anything left over)."
    import torch
    sd, mapped = theirs.state_dict(), {}
    # backbone: lukemelas' EfficientNet and timm's TF port list the same tensors in the same order (stem, blocks, ...);
    # ours stops after block 21 (the last block read), theirs goes on to block 31 and the head
    bb = ours.extractor.backbone.state_dict()
    src = [(k, v) for k, v in sd.items() if k.startswith('enc.')]
    for (k, v), (kb, vb) in zip(src, bb.items()):
        if v.shape != vb.shape: raise RuntimeError(f'transplant: backbone {k} {tuple(v.shape)} vs {kb} {tuple(vb.shape)}')
        mapped['extractor.backbone.' + kb] = v
    if len(bb) > len(src): raise RuntimeError('transplant: their backbone is shorter than ours')
    ren = [('quantize_conv_t.', 'proj.'), ('pos_embed.row_embed.', 'pos.row.'), ('pos_embed.col_embed.', 'pos.col.'),
           ('decoder.norm.', 'decoder.norm.')]
    for l in range(4):
        e, d = f'encoder.layers.{l}.', f'decoder.layers.{l}.'
        ren += [(e + 'self_attn.', e + 'attn.'), (e + 'linear1.', e + 'ff.0.'), (e + 'linear2.', e + 'ff.3.'),
                (e + 'norm1.', e + 'norm1.'), (e + 'norm2.', e + 'norm2.'),
                (d + 'self_attn.', d + 'self_attn.'), (d + 'multihead_attn.', d + 'cross_attn.'), (d + 'linear1.', d + 'ff.0.'),
                (d + 'linear2.', d + 'ff.3.')] + [(d + f'norm{i}.', d + f'norm{i}.') for i in (1, 2, 3)]
    for c in range(N_CLASSES):
        ren.append((f'output_proj_list.{c}.', f'heads.{c}.'))
        for lvl, q in enumerate((5, 4, 3, 2, 1)):      # LEVELS = top, e3, e2, e1, e0 = their quantize_list_5 .. _1
            ren.append((f'quantize_list_{q}.{c}.', f'codebooks.books.{c}.{lvl}.'))
    for k, v in sd.items():
        for a, b in ren:
            if k.startswith(a): mapped[b + k[len(a):]] = v; break
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    if unexpected or missing: raise RuntimeError(f'transplant: unexpected {unexpected[:5]}, not filled {missing[:5]}')
    # `input_proj` (Linear 272 -> 256) is built but never used in their forward: no gradient, AdamW skips it
    n_theirs = sum(p.numel() for k, p in theirs.named_parameters() if p.requires_grad and not k.startswith('input_proj.'))
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    if n_theirs != n_ours: raise RuntimeError(f'transplant: {n_theirs} trainable numbers theirs vs {n_ours} ours')
    return n_theirs

def ours_model(variant:str, device, seed=0):
    "Our HVQTrans at the authors' configuration: B4 (random weights) inside the model for 'code', features outside for 'cached'."
    from vqflow_nb.hvqtrans import build
    from vqflow_nb.features import FeatureExtractor
    ext = FeatureExtractor.from_preset('hvqtrans', backbone='tf_efficientnet_b4', weights='random')
    m = build(ext.channels, variant=variant, seed=seed, n_classes=N_CLASSES, extractor=ext)
    if m.extractor is None: m.extractor_outside = ext     # cached: the extractor makes the cache, outside the model
    return m.to(device)

def setup(authors_dir:str, size:str, device, seed:int=0) -> dict:
    import torch
    A = import_authors(authors_dir)
    torch.manual_seed(seed)
    theirs = A.M.HVQ_TR_switch(channel=CHANNELS, embed_dim=256).to(device)
    ours = ours_model('code', device)
    n = transplant(theirs, ours)
    B = SIZES[size]['batch']
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, 3, 224, 224, generator=g).to(device)                   # images in [0, 1] (ours normalises)
    cls = (torch.arange(B) * 7 % N_CLASSES).to(device)                        # distinct classes, repeats past 15
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    xn = (x - mean) / std                                                     # theirs: their dataset normalises (config.yaml)
    return dict(A=A, theirs=theirs, ours=ours, opt_a=_opt(A, theirs), x=x, xn=xn, cls=cls, n_numbers=n, size=size,
                spec=dict(SIZES[size], n_classes=N_CLASSES, channels=CHANNELS, embed_dim=256, n_codes=512, backbone='efficientnet-b4 (random weights)'),
                device=device)

# ---------------------------------------------------------------------------------------------------------------
def authors_inputs(S): return {'image': S['xn'], 'clslabel': S['cls']}

def authors_train_step(S):
    "One iteration of `train_one_epoch` (no DDP, no logging)."
    import torch
    m, opt = S['theirs'], S['opt_a']
    m.train(); m.training = True
    outputs = m(authors_inputs(S))
    loss = outputs['loss']
    loss.clone().item()
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP)
    opt.step()
    return float(loss)

def authors_ot_model(S):
    "Their test-time model (HVQ_TR_switch_OT) holding the training model's current state."
    if 'theirs_ot' not in S:
        S['theirs_ot'] = S['A'].MO.HVQ_TR_switch_OT(channel=CHANNELS, embed_dim=256).to(S['device'])
    S['theirs_ot'].load_state_dict(S['theirs'].state_dict())
    return S['theirs_ot']

def authors_infer(S, m=None):
    "Their `validate` forward on one batch (eval mode, POT on) and the image score of their 'max' metric."
    import torch
    m = m if m is not None else S['theirs_ot']
    m.eval(); m.training = False
    with torch.no_grad():
        out = m(authors_inputs(S))
    pred = out['pred'].cpu().numpy()[:, 0]                          # `dump` + `merge_together`: N x H x W numpy
    if pred_is_cuda_only(S): return pred, image_max(pred)
    return pred, S['A'].EvalImageMax.encode_pred(pred, POOL)

def pred_is_cuda_only(S) -> bool:
    "`EvalImageMax.encode_pred` moves the map to CUDA (`.cuda()`): without a GPU the same pooling runs on the CPU."
    import torch
    return not torch.cuda.is_available()

def image_max(pred):
    "What `EvalImageMax.encode_pred` computes: avg-pool 16x16 stride 1 of each map, then the max (on the CPU)."
    import torch, torch.nn.functional as F
    p = torch.as_tensor(pred)[:, None]
    return F.avg_pool2d(p, POOL, stride=1).reshape(len(p), -1).amax(1).numpy()

def ours_optimizer(m):
    from vqflow_nb.train import make_optimizer
    sch = m.schedule()
    return make_optimizer([p for p in m.parameters() if p.requires_grad], sch), sch

def ours_inputs(m, S):
    "Images for the faithful model; the eval-mode backbone's map (what the feature cache holds) for 'cached'."
    import torch
    if m.cfg.backbone_train: return [S['x']]
    key = 'cached_feats'
    if key not in S:
        ext = S['ours'].extractor if S['ours'].extractor is not None else m.extractor_outside
        was = ext.backbone.training; ext.backbone.eval()
        with torch.no_grad(): S[key] = [ext(S['x'])[0]]
        ext.backbone.train(was)
    return S[key]

def variant_model(S, v:str):
    "Our model for variant `v`, from the transplanted state."
    from dataclasses import replace
    if v == 'ours': return S['ours']
    m = copy.deepcopy(S['ours'])
    if v == 'ours+batched': m.cfg = replace(m.cfg, ema='batched', variant='batched')
    elif v == 'ours+cached':
        m.extractor_outside = m.extractor
        m.cfg = replace(m.cfg, backbone_train=False, variant='cached'); m.extractor = None
    else: raise ValueError(f'unknown variant {v!r}; choose from {VARIANTS}')
    return m

def ours_train_step(m, opt, sch, S):
    m.train()
    return float(m.training_step(ours_inputs(m, S), dict(cls_index=S['cls']), opt, sch)['loss'])

def ours_infer(m, S):
    import torch
    m.eval()
    with torch.no_grad():
        if m.cfg.backbone_train: s = m.score([S['x']], dict(cls_index=S['cls']), out_size=(224, 224))
        else: s = m.score(ours_inputs(m, S), dict(cls_index=S['cls']), out_size=(224, 224))
    return s

# ---------------------------------------------------------------------------------------------------------------
def _no_randomness(m, drop_connect_attr=True):
    "Dropout p=0 everywhere and no drop-connect/drop-path: both sides then compute the same function in train mode."
    import torch.nn as nn
    saved = []
    for mod in m.modules():
        if isinstance(mod, nn.Dropout): saved.append((mod, 'p', mod.p)); mod.p = 0.
        if isinstance(mod, nn.MultiheadAttention): saved.append((mod, 'dropout', mod.dropout)); mod.dropout = 0.
        if hasattr(mod, 'drop_prob'): saved.append((mod, 'drop_prob', mod.drop_prob)); mod.drop_prob = 0.
        if hasattr(mod, '_global_params') and mod._global_params.drop_connect_rate:
            saved.append((mod, '_global_params', mod._global_params))
            mod._global_params = mod._global_params._replace(drop_connect_rate=None)
    return saved

def _restore(saved):
    for mod, k, v in saved: setattr(mod, k, v)

def _record_assignments(theirs, ours):
    "Hooks on every quantiser call of both sides: (input rows, codes before the call's EMA update, chosen indices)."
    from vqflow_nb.codebooks import EMACodebook
    rec, hooks = dict(theirs=[], ours=[]), []
    def pre(mod, inp): mod._vs_codes = mod.embed.detach().clone()
    def post(side, k):
        def f(mod, inp, out): rec[side].append((inp[0].detach().reshape(-1, mod.dim), mod._vs_codes, out[k].detach().reshape(-1)))
        return f
    for side, model, cls_, k in (('theirs', theirs, None, 2), ('ours', ours, EMACodebook, 1)):
        for mod in model.modules():
            if (cls_ is not None and isinstance(mod, cls_)) or (cls_ is None and type(mod).__name__ == 'Quantize'):
                hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post(side, k))]
    return rec, hooks

def _flips(rec) -> dict:
    """Code assignments that differ between the sides (calls in the same order: level by level, image by image), and
    how close to a tie the FIRST was under their input and codes: |d(our code) - d(their code)| / d(their code), squared
    distances (later flips may follow from it: a flipped top-level code changes every lower level's input of that
    image, a flipped assignment changes that codebook for the next image of the class).
    A near-tie flipped by float32 rounding changes that code's EMA statistics; from then on the two runs differ in
    that codebook (an unused code's EMA value is its running sum over a tiny smoothed count, so such a difference is large)."""
    import torch
    n = flips = 0; first = None; detail = []
    for c, ((xa, ea, ia), (xo, eo, io)) in enumerate(zip(rec['theirs'], rec['ours'])):
        n += len(ia); bad = (ia != io).nonzero().flatten()
        flips += len(bad)
        if len(bad):
            x = xa[bad].double(); e = ea.double()
            d = (x.pow(2).sum(1, keepdim=True) - 2 * x @ e + e.pow(2).sum(0, keepdim=True))
            da, do = d.gather(1, ia[bad, None]).flatten(), d.gather(1, io[bad, None]).flatten()
            gap = float(((do - da).abs() / da.abs().clamp_min(1e-30)).max())
            detail.append(dict(call=c, flips=len(bad), gap_rel=gap, input_rel=float((xa - xo).abs().max() / xa.abs().max()),
                               codes_diff=float((ea - eo).abs().max())))
            if first is None: first = gap
    return dict(code_flips=flips, assignments=n, flip_gap_rel=first if first is not None else 0., flip_detail=detail,
                calls=(len(rec['theirs']), len(rec['ours'])))

def equivalence(S) -> dict:
    """Same state, same images: training loss, target map, reconstruction, gradients, EMA codebooks, the state after
    one whole training step (AdamW, clip), and the inference maps and image scores. Dropout and drop-connect are off on
    both sides for the training comparisons (their random draws cannot be matched); BatchNorm runs on batch statistics."""
    import torch
    from _vs_common import maxdiff, rel
    theirs, ours = S['theirs'], S['ours']
    sd_a, sd_o = copy.deepcopy(theirs.state_dict()), copy.deepcopy(ours.state_dict())
    sv = _no_randomness(theirs) + _no_randomness(ours)
    theirs.train(); theirs.training = True; ours.train()
    rec, hooks = _record_assignments(theirs, ours)
    out_a = theirs(authors_inputs(S))
    out_o = ours([S['x']], S['cls'])
    for h in hooks: h.remove()
    import torch.nn.functional as F
    loss_o = F.mse_loss(out_o['rec'], out_o['target']) + ours.cfg.commit_weight * out_o['commit']
    theirs.zero_grad(); ours.zero_grad()
    out_a['loss'].backward(); loss_o.backward()
    c0 = int(S['cls'][0])
    pairs = [(theirs.quantize_conv_t.weight, ours.proj.weight), (theirs.encoder.layers[0].self_attn.in_proj_weight, ours.encoder.layers[0].attn.in_proj_weight),
             (theirs.decoder.layers[-1].linear2.weight, ours.decoder.layers[-1].ff[3].weight),
             (theirs.output_proj_list[c0].weight, ours.heads[c0].weight), (theirs.pos_embed.row_embed.weight, ours.pos.row.weight)]
    res = dict(loss_theirs=float(out_a['loss'].detach()), loss_ours=float(loss_o.detach()), loss=abs(float(out_a['loss'].detach()) - float(loss_o.detach())),
               target_rel=rel(out_a['feature_align'], out_o['target']), reconstruction=maxdiff(out_a['feature_rec'], out_o['rec']),
               grad_rel=max(rel(a.grad, b.grad) for a, b in pairs),
               ema_codebooks=max(maxdiff(getattr(theirs, f'quantize_list_{q}')[int(c)].embed, ours.codebooks.books[int(c)][l].embed)
                                 for c in S['cls'].unique() for l, q in enumerate((5, 4, 3, 2, 1))),
               bn_running_mean=max(maxdiff(a, b) for (ka, a), (kb, b) in zip(
                   [(k, v) for k, v in theirs.state_dict().items() if k.startswith('enc.') and k.endswith('running_mean')],
                   [(k, v) for k, v in ours.state_dict().items() if k.startswith('extractor.backbone.') and k.endswith('running_mean')])))
    res.update(_flips(rec))
    # one whole training step each from the same state: every trainable number afterwards
    theirs.load_state_dict(sd_a); ours.load_state_dict(sd_o)
    S_opt = S['opt_a']; S['opt_a'] = _opt(S['A'], theirs)
    authors_train_step(S)
    opt, sch = ours_optimizer(ours); ours_train_step(ours, opt, sch, S)
    S['opt_a'] = S_opt
    # the first AdamW step moves every number by about lr * sign(grad): a gradient entry near 0 may flip sign between
    # two float32 summation orders (a difference of 2 lr there); count the numbers whose step differs by > 0.1 lr
    pa = dict(theirs.named_parameters()); po = dict(ours.named_parameters())
    pairs = [('quantize_conv_t.weight', 'proj.weight'), ('encoder.layers.0.self_attn.in_proj_weight', 'encoder.layers.0.attn.in_proj_weight'),
             ('decoder.layers.3.linear2.weight', 'decoder.layers.3.ff.3.weight'), (f'output_proj_list.{c0}.weight', f'heads.{c0}.weight')]
    d = torch.cat([(pa[a] - po[b]).detach().abs().flatten() for a, b in pairs])
    res['params_after_step'] = float(d.max())
    res['step_mismatch_frac'] = float((d > 0.1 * 1e-4).double().mean())
    _restore(sv)
    theirs.load_state_dict(sd_a); ours.load_state_dict(sd_o)
    # inference (eval mode, POT term, ground-truth class switch)
    pred, img_a = authors_infer(S, authors_ot_model(S))
    s = ours_infer(ours, S)
    res.update(pixel_map=maxdiff(pred, s.pixel), image_score=maxdiff(img_a, s.image),
               image_score_scale=float(abs(torch.as_tensor(img_a)).max()))
    theirs.load_state_dict(sd_a); ours.load_state_dict(sd_o)
    return res

ROWS = ('code_flips', 'flip_gap_rel', 'loss', 'target_rel', 'reconstruction', 'grad_rel', 'ema_codebooks', 'bn_running_mean', 'params_after_step',
        'step_mismatch_frac', 'pixel_map', 'image_score')
# float32 with other summation orders (batch-first attention, channels-last convolutions); params_after_step is bounded by
# 2 lr (a sign flip of a near-zero gradient entry), so the step is checked by the fraction of numbers that moved differently
TOLERANCE = dict(code_flips=0, flip_gap_rel=1e-4, loss=1e-4, target_rel=1e-4, reconstruction=1e-3, grad_rel=1e-2, ema_codebooks=1e-3, bn_running_mean=1e-4,
                 params_after_step=2.1e-4, step_mismatch_frac=1e-3, pixel_map=1e-2, image_score=1e-2)

# rows that a near-tie flip of a code assignment moves (see `_flips`): within when every flip was a near-tie
AFTER_FLIP = ('code_flips', 'reconstruction', 'grad_rel', 'ema_codebooks', 'step_mismatch_frac')

def explained(e:dict) -> bool:
    "All differing assignments were near-ties (relative distance gap <= 1e-4): rows in AFTER_FLIP follow from them."
    return e['code_flips'] > 0 and e['flip_gap_rel'] <= TOLERANCE['flip_gap_rel']

def sides(S, variants) -> dict:
    "name -> dict(train=fn, infer=fn, kind='theirs'|'ours')"
    out = dict(theirs=dict(train=lambda: authors_train_step(S), infer=lambda: authors_infer(S), kind='theirs'))
    authors_ot_model(S)
    for v in variants:
        if v == 'ours+avgpool':
            out[v] = dict(train=None, infer=lambda: _with_avgpool(lambda: ours_infer(S['ours'], S)), kind='ours'); continue
        m = variant_model(S, v); opt, sch = ours_optimizer(m)
        if not m.cfg.backbone_train: ours_inputs(m, S)
        out[v] = dict(train=lambda m=m, opt=opt, sch=sch: ours_train_step(m, opt, sch, S), infer=lambda m=m: ours_infer(m, S), kind='ours')
    return out

def _with_avgpool(fn):
    "Run `fn` with `hvqtrans.box_mean` replaced by the one-window avg_pool2d it stands for."
    import vqflow_nb.hvqtrans as HV, torch.nn.functional as F
    keep = HV.box_mean
    HV.box_mean = lambda x, k: F.avg_pool2d(x, k, stride=1)
    try: return fn()
    finally: HV.box_mean = keep

def authors_step(S): return lambda: authors_train_step(S)

# ---------------------------------------------------------------------------------------------------------------
# bf16 (vs_authors.method_sides: 'theirs+bf16'): their test-time forward under the bf16 context, read on the host in float32
def _float_cosine(MO):
    """`HVQ_TR_switch_OT.OT` reads the features on the host through sklearn's `cosine_similarity`, which has no bfloat16:
    give it the same numbers widened to float32 (a no-op for float32 inputs)."""
    if getattr(MO, '_vs_float_cosine', False): return
    f = MO.cosine_similarity
    MO.cosine_similarity = lambda a, b, *r, **k: f(a.float() if hasattr(a, 'float') else a, b.float() if hasattr(b, 'float') else b, *r, **k)
    MO._vs_float_cosine = True

class _FloatOut:
    "Their model called under the bf16 context, its floating outputs returned in float32 (their `dump` reads them with .numpy())."
    def __init__(self, m, device): self.m, self.device, self.training = m, device, False
    def eval(self): self.m.eval(); return self
    def __call__(self, x):
        import torch
        from vs_authors import bf16_ctx
        with bf16_ctx(self.device): out = self.m(x)
        return {k: v.float() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in out.items()}

def authors_infer_bf16(S):
    "`authors_infer` with their test-time model under bf16 autocast (the POT score's host-side inputs and the map read as float32)."
    _float_cosine(S['A'].MO)
    return authors_infer(S, _FloatOut(S['theirs_ot'], S['device']))
