#!/usr/bin/env python
"""Ours vs the authors' VQ-Flow at the same maths: identical weights, identical inputs, one process, alternating timings.

The authors' code comes from a checkout of cool-xuan/vqflow that the user provides (`--authors DIR`); its files are
imported as they are, never copied or edited. Their `train.py:train` builds the models (we stop it at the first
`train_meta_epoch` call and keep what it built); their `train_meta_epoch` is the timed training step and their
`inference_meta_epoch` + `post_process.py:post_process` the timed inference. What would need the internet is replaced:
the backbone (`models/extractors.py:build_extractor`) by identical random feature maps at the backbone's widths
(the flows, codebooks and prior are what is compared), and `wandb` by an empty module. Their datasets are never read.

Steps: (1) build theirs, transplant every weight and buffer into `vqflow_nb.vqflow.VQFlow`; (2) one training-mode
forward on each: max |difference| of the loss, latents and log-det, and of the gradients; (3) inference on each from
the same state: max |difference| of the image scores and both maps; (4) time training steps and inference
alternately (A B, B A, ... after warm-ups) and print the per-pair ratios theirs/ours (median, min, max);
(5) peak memory per side, each in its own process (VmHWM on CPU, torch.cuda.max_memory_allocated on CUDA).
Variants named with `--variants` are ours with a change not (yet) in the package, patched in here (see VARIANTS).
Writes <out>.json and <out>.md (default results/benchmarks/vs_authors).
"""
from __future__ import annotations
import argparse, contextlib, io, json, os, platform, statistics, subprocess, sys, time, types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path: sys.path.insert(0, str(ROOT))
if str(ROOT/'benchmarks') not in sys.path: sys.path.insert(0, str(ROOT/'benchmarks'))
from _vs_common import sync, timed, maxdiff, ratios, alternate, loadavg   # shared with the per-method sides

# the authors' configuration: README command (--multi-class --quantize-enable --quantize-type residual --concat-pos
# --mixed-gaussian --extractor convnextv2_base) over `main.py:parsing_args` defaults and `default.py`
SIZES = dict(
    authors=dict(channels=(128, 256, 512, 1024), input=384, batch=4, dim_cpc=512, pe=64, k_cpc=32, k_cspc=512, blocks=(2, 5, 8)),
    small=dict(channels=(32, 64, 128, 256), input=128, batch=2, dim_cpc=64, pe=16, k_cpc=8, k_cspc=64, blocks=(2, 2, 2)),
    smoke=dict(channels=(8, 16, 32, 64), input=64, batch=2, dim_cpc=16, pe=8, k_cpc=4, k_cspc=16, blocks=(1, 2, 2)),
)

def cpu_info() -> dict:
    "CPU model and the SIMD flags that decide float32/bf16 throughput."
    flags, model = set(), platform.processor()
    try:
        for l in open('/proc/cpuinfo'):
            if l.startswith('flags') and not flags: flags = set(l.split(':', 1)[1].split())
            if l.startswith('model name'): model = l.split(':', 1)[1].strip()
    except OSError: pass
    keep = sorted(f for f in flags if f in ('avx2', 'fma', 'f16c') or f.startswith(('avx512', 'amx', 'avx_vnni')))
    return dict(model=model, cpus=os.cpu_count(), flags=keep)

def env_info(device) -> dict:
    import torch
    d = dict(platform=platform.platform(), python=platform.python_version(), torch=torch.__version__,
             threads=torch.get_num_threads(), cpu=cpu_info(), device=str(device))
    try: d['cpu_capability'] = torch.backends.cpu.get_cpu_capability()
    except Exception: pass
    if device.type == 'cuda': d['gpu'] = torch.cuda.get_device_name(device)
    return d

# ---------------------------------------------------------------------------------------------------------------
# the authors' side
def import_authors(authors_dir:str):
    "Import the authors' `train`, `post_process` from their checkout; stub modules that are absent here (logging only)."
    d = str(Path(authors_dir).resolve())
    if not Path(d, 'train.py').exists(): raise SystemExit(f'--authors {authors_dir}: no train.py there (a checkout of cool-xuan/vqflow?)')
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path: sys.path.insert(0, here)
    from _vs_common import forget_other_authors; forget_other_authors(d)
    if d in sys.path: sys.path.remove(d)
    sys.path.insert(0, d)
    for name in ('wandb',):   # experiment logging: needs an account and the internet, off in the README commands
        try: __import__(name)
        except ImportError: sys.modules[name] = types.ModuleType(name)
    # evaluation-only imports of theirs (datasets, metrics): stubbed only where the package is missing (GPU machines)
    for name, attrs in (('sklearn.metrics', ('roc_auc_score', 'auc', 'precision_recall_curve')),
                        ('skimage.measure', ('label', 'regionprops')),
                        ('torchvision.transforms', ('InterpolationMode',)), ('PIL', ('Image',))):
        try: __import__(name)
        except ImportError:
            for i, part in enumerate(name.split('.')):
                full = '.'.join(name.split('.')[:i + 1])
                sys.modules.setdefault(full, types.ModuleType(full))
            for a in attrs: setattr(sys.modules[name], a, None)
    import train as A, post_process as P
    return A, P

class _Captured(Exception):
    def __init__(self, models, params, optimizer): self.models, self.params, self.optimizer = models, params, optimizer

class _NoData(list):
    "Stands in for their datasets: `train` only wraps it in a DataLoader before we stop it."
    def __init__(self, c, is_train=True): super().__init__([0])

def authors_config(size:dict, device):
    "The namespace their `train` reads: `default.py`, overridden by `main.py:parsing_args` defaults and the README flags."
    c = types.SimpleNamespace()
    import default as D   # their default.py (plain constants)
    for k, v in vars(D).items():
        if not k.startswith('_') and not isinstance(v, types.ModuleType): setattr(c, k, v)
    c.__dict__.update(dict(
        dataset='mvtec', input_size=(size['input'],) * 2, pre_extract=False, mode='train', multi_class=True,
        amp_enable=False, wandb_enable=False, resume=False, eval_ckpt='', class_names=['x'], lr=1e-4,
        batch_size=size['batch'], meta_epochs=30, sub_epochs=1, extractor='convnextv2_base', pool_type='avg',
        parallel_blocks=list(size['blocks']), c_conds=[64, 64, 64], loc_eval=False, pro_eval=False, pro_eval_interval=4,
        quantize_enable=True, quantize_type='residual', no_pattern_quantize=False, concat_pos=True,
        reassign_quantize=False, quantize_weight=1., dim_cpc=size['dim_cpc'], c_pos_conds=[size['pe']] * 3,
        k_cspc=size['k_cspc'], k_cpc=size['k_cpc'], mixed_gaussian=True, device=device, workers=0,
        ckpt_dir='/nonexistent', version_name='vs_authors',
        # `models/flow_models.py:build_vqflow_model` reads c.condition_blocks, which neither default.py nor the
        # argparse defines (the released code raises AttributeError there); it is only printed, so any 3 values do
        condition_blocks=[0, 0, 0]))
    return c

def build_authors(A, c, channels):
    "Run their `train.train(c)` until it has built models and optimiser; return (models, params, optimizer)."
    A.MultiClassDataset = A.MVTecDataset = A.MVTecFeatureDataset = A.VisADataset = _NoData
    import torch.nn as nn
    A.build_extractor = lambda c: (nn.Identity(), list(channels))   # the backbone is replaced by given feature maps
    def stop(c, epoch, loader, extractor, models, params, optimizer, *a, **k): raise _Captured(models, params, optimizer)
    A.train_meta_epoch = stop
    try:
        with contextlib.redirect_stdout(io.StringIO()): A.train(c)
    except _Captured as e: return e.models, e.params, e.optimizer
    raise RuntimeError("the authors' train() returned without starting an epoch")

class _Loader(list):
    "A one-batch loader for their epoch functions (they read `len(loader.dataset)`)."
    @property
    def dataset(self): return [None] * len(self[0][-1])

def authors_batch(feats):
    import torch
    B = feats[0].shape[0]
    return _Loader([(*feats, torch.zeros(B, dtype=torch.long), torch.zeros(B, 1, 1, 1), torch.zeros(B, dtype=torch.long))])

def authors_extractor(*feats): return list(feats)   # `train.py:extract_features` calls extractor(*inputs)

# the authors' train_meta_epoch (unpatched) is kept before build_authors replaces the module attribute
_AUTHORS_EPOCH = {}

def authors_train_step(A, c, models, params, opt, loader):
    "One optimisation step by their `train_meta_epoch` (sub_epochs=1, a one-batch loader)."
    with contextlib.redirect_stdout(io.StringIO()):
        _AUTHORS_EPOCH['train'](c, 0, loader, authors_extractor, models, params, opt, None, None, None)

def authors_infer(A, P, c, models, loader):
    "Their inference on one batch: `inference_meta_epoch` then `post_process` (image score, add map, mul map)."
    with contextlib.redirect_stdout(io.StringIO()):
        _, _, outputs, sizes = A.inference_meta_epoch(c, 0, loader, authors_extractor, models)
        return P.post_process(c, sizes, outputs)

def authors_forward(A, c, models, feats):
    "Their `model_forward`: (latents, log-det, commitment)."
    z, jac, diff, _, _ = A.model_forward(c, authors_extractor, models, list(feats))
    return z, jac, diff

def authors_loss(z, jac, diff, c):
    "Their loss as written in `train_meta_epoch`."
    loss = 0.
    for zz in z: loss += 0.5 * (zz ** 2).sum((1, 2, 3))
    return (loss - jac).mean() + diff * c.quantize_weight

# ---------------------------------------------------------------------------------------------------------------
# transplant
def transplant(models, ours):
    "Copy every weight and buffer of their ModuleDict into our VQFlow (raises on anything left over)."
    import torch
    sd, mapped = models.state_dict(), {}
    n_scales = len(ours.flows)
    def put(src_prefix, dst_prefix, rename=lambda k: k):
        for k, v in sd.items():
            if k.startswith(src_prefix): mapped[dst_prefix + rename(k[len(src_prefix):])] = v
    put('semantic_mlp.', 'codebooks.cpc.semantic_mlp.')
    put('cpc_quantizer.', 'codebooks.cpc.codebook.')
    put('semantic_encoder.', 'codebooks.semantic_encoder.')
    for l in range(n_scales):
        put(f'feature_mlps.{l}.', f'codebooks.cspcs.{l}.feature_mlp.')
        put(f'cspc_quantizers.{l}.', f'codebooks.cspcs.{l}.codebook.')
        put(f'upsamplers.{l}.1.', f'codebooks.cspcs.{l}.upsampler.')   # [0] is the nn.Upsample
        # `sigma_mu_generator.forward` returns (sigma, mu) and `model_forward` unpacks (mu, sigma): their `.sigma`
        # head is the mean and `.mu` the scale
        put(f'sigma_mu_generators.{l}.sigma.', f'prior.mu.{l}.')
        put(f'sigma_mu_generators.{l}.mu.', f'prior.sigma.{l}.')
    put(f'feature_mlps.{n_scales}.', 'codebooks.top_cspc.feature_mlp.')
    put(f'cspc_quantizers.{n_scales}.', 'codebooks.top_cspc.codebook.')
    missing, unexpected = ours.load_state_dict(mapped, strict=False)
    left = [k for k in missing if not k.startswith(('flows.', 'fusion.'))]
    if unexpected or left: raise RuntimeError(f'transplant: unexpected {unexpected}, not filled {left}')
    for l, flow in enumerate(models['parallel_flows']):
        for k, blk in enumerate(flow.module_list): ours.flows[l].blocks[k].load_freia_state_dict(blk.state_dict())
    with torch.no_grad():
        for node in models['fusion_flow'].node_list:
            if node.name.startswith('permute_'):
                l = int(node.name.split('_')[1])
                getattr(ours.fusion, f'perm_{l}').copy_(node.module.perm)
                getattr(ours.fusion, f'perm_inv_{l}').copy_(torch.argsort(node.module.perm))
            elif node.name == 'fusion flow':
                for i in (1, 2):
                    sub = {k.replace('cross_convs.', ''): v for k, v in getattr(node.module, f'subnet_{i}').state_dict().items()}
                    getattr(ours.fusion, f'subnet_{i}').load_state_dict(sub, strict=True)
    # trainable parameters must match one to one (permutations are stored differently: matrices there, indices here)
    n_theirs = sum(p.numel() for p in models.parameters() if p.requires_grad)
    n_ours = sum(p.numel() for p in ours.parameters() if p.requires_grad)
    if n_theirs != n_ours: raise RuntimeError(f'transplant: {n_theirs} parameters theirs vs {n_ours} ours')
    return n_theirs

# ---------------------------------------------------------------------------------------------------------------
# our side and its variants
def ours_model(size:dict, device):
    from vqflow_nb.vqflow import VQFlow, VQFlowConfig
    cfg = VQFlowConfig.for_channels(list(size['channels']), proto_dim=size['dim_cpc'], pe_dim=size['pe'], k_cpc=size['k_cpc'],
                                    k_cspc=size['k_cspc'], depths=tuple(size['blocks']), seed=0)
    return VQFlow(cfg).to(device)

def ours_optimizer(model):
    from vqflow_nb.train import make_optimizer, Schedule
    sch = Schedule(lr=1e-4, clip_grad=2.0)
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], sch)
    return opt, sch

def ours_train_step(model, opt, sch, feats, amp=None):
    "The trainer's step (`vqflow_nb.train._step`): loss (under `amp`'s autocast), backward, clip 2.0, Adam (fused where available)."
    from vqflow_nb.train import _step
    model.train()
    return _step(model, dict(feats=feats), opt, sch, [p for g in opt.param_groups for p in g['params']], amp=amp)

def ours_infer(model, feats, out_size):
    "`VQFlow.score` on one batch, results brought to numpy as the authors' `post_process` does."
    import torch
    model.eval()
    with torch.no_grad():
        s = model.score(feats, None, out_size=out_size)
    return s.image.float().cpu().numpy(), s.pixel.float().cpu().numpy(), s.pro.float().cpu().numpy()

def _patch_variant(model, name:str):
    """Apply a named variant to `model` (its config or instance-level patches; the package is untouched); return its
    `train.Amp` or None. 'ours' is the package as configured by default (on a CPU: `quant_conv='cpu'`, the condition
    convolved from its codes). Parts after 'ours': dense (`quant_conv='none'`: the authors' dense convolution of the
    condition), quant (`quant_conv='all'`, also on a GPU), bcond (`broadcast_cond=True` with `quant_conv='none'`),
    cl (channels_last subnets), compile (torch.compile of every flow subnet), bf16 / fp16 (the trainer's mixed precision)."""
    import torch
    from dataclasses import replace
    parts = set(name.split('+')[1:])
    unknown = parts - {'dense', 'quant', 'bcond', 'cl', 'compile', 'bf16', 'fp16'}
    if not name.startswith('ours') or unknown: raise ValueError(f'unknown variant {name!r} ({unknown})')
    from vqflow_nb import flows as F_
    subnets = [m for m in model.modules() if isinstance(m, (F_.ConvLNSubnet, F_.FusionSubnet))]
    if 'dense' in parts: model.cfg = replace(model.cfg, quant_conv='none')
    if 'quant' in parts: model.cfg = replace(model.cfg, quant_conv='all')
    if 'bcond' in parts: model.cfg = replace(model.cfg, quant_conv='none', broadcast_cond=True)
    if 'cl' in parts:
        for m in subnets: m.to(memory_format=torch.channels_last)
    if 'compile' in parts:
        for m in subnets: m.compile(dynamic=False)
    amp = None
    for prec in ('bf16', 'fp16'):
        if prec in parts:
            from vqflow_nb.train import Amp
            amp = Amp(prec, next(model.parameters()).device)
    return amp

def _autocast(amp): return amp.autocast() if amp is not None else contextlib.nullcontext()

# ---------------------------------------------------------------------------------------------------------------
def make_feats(size:dict, device, seed=0):
    "Identical random backbone maps at the backbone's widths and strides 4/8/16/32 (what both sides consume)."
    import torch
    g = torch.Generator().manual_seed(seed)
    B, S = size['batch'], size['input']
    return [torch.randn(B, c, S // s, S // s, generator=g).to(device) for c, s in zip(size['channels'], (4, 8, 16, 32))]

def setup(args, device):
    "Both sides built, weights transplanted; returns a dict of everything."
    import torch
    A, P = import_authors(args.authors)
    _AUTHORS_EPOCH.setdefault('train', A.train_meta_epoch)
    size = SIZES[args.size]
    torch.manual_seed(0)
    import numpy as np; np.random.seed(0)
    c = authors_config(size, device)
    models, params, opt_a = build_authors(A, c, size['channels'])
    ours = ours_model(size, device)
    n = transplant(models, ours)
    return dict(A=A, P=P, c=c, size=size, models=models, params=params, opt_a=opt_a, ours=ours, n_numbers=n)

def equivalence(S, feats, device) -> dict:
    "Same state, same inputs: max |theirs - ours| of loss, latents, log-det, gradients, image scores and maps."
    import torch, copy
    A, c, models, ours = S['A'], S['c'], S['models'], S['ours']
    sd_a, sd_o = copy.deepcopy(models.state_dict()), copy.deepcopy(ours.state_dict())
    models.train(); ours.train()
    z_a, jac_a, diff_a = authors_forward(A, c, models, feats)
    loss_a = authors_loss(z_a, jac_a, diff_a, c)
    out = ours(feats)
    from vqflow_nb.vqflow import flow_nll
    loss_o = flow_nll(out['zs'], out['log_det']).mean() + ours.cfg.commit_weight * out['commit']
    models.zero_grad(); ours.zero_grad(); loss_a.backward(); loss_o.backward()
    # gradients of the first and last parallel-flow blocks' first conv, and of the fusion's first conv
    ga = [models['parallel_flows'][0].module_list[0].subnet.conv1.weight.grad, models['parallel_flows'][-1].module_list[-1].subnet.conv1.weight.grad,
          [n for n in models['fusion_flow'].node_list if n.name == 'fusion flow'][0].module.subnet_1.cross_convs.conv1.weight.grad]
    go = [ours.flows[0].blocks[0].subnet.conv1.weight.grad, ours.flows[-1].blocks[-1].subnet.conv1.weight.grad, ours.fusion.subnet_1.conv1.weight.grad]
    res = dict(loss_theirs=float(loss_a), loss_ours=float(loss_o), loss=abs(float(loss_a) - float(loss_o)),
               latents=max(maxdiff(a, b) for a, b in zip(z_a, out['zs'])), log_det=maxdiff(jac_a, out['log_det']),
               commit=abs(float(diff_a) - float(out['commit'])),
               grad_rel=max(maxdiff(a, b) / max(float(a.abs().max()), 1e-30) for a, b in zip(ga, go)))
    models.zero_grad(set_to_none=True); ours.zero_grad(set_to_none=True)
    models.load_state_dict(sd_a); ours.load_state_dict(sd_o)   # the training forward moved the EMA codebooks
    img_a, add_a, mul_a = authors_infer(A, S['P'], c, models, authors_batch(feats))
    img_o, add_o, mul_o = ours_infer(ours, feats, c.input_size)
    res.update(image_score=maxdiff(img_a, img_o), add_map=maxdiff(add_a, add_o), mul_map=maxdiff(mul_a, mul_o),
               image_score_scale=float(abs(img_a).max()))
    return res

def timing(S, feats, device, pairs:int, warmup:int, variants:list, infer:bool=True) -> dict:
    "Alternating timings (order swapped every pair) of theirs and each of our variants: training step and inference."
    import torch, copy
    A, P, c, models = S['A'], S['P'], S['c'], S['models']
    loader = authors_batch(feats)
    sides = {}
    for v in variants:
        m = S['ours'] if v == 'ours' else copy.deepcopy(S['ours'])
        amp = _patch_variant(m, v)
        opt, sch = ours_optimizer(m)
        sides[v] = dict(model=m, amp=amp, opt=opt, sch=sch)
    step = {'theirs': lambda: authors_train_step(A, c, models, S['params'], S['opt_a'], loader)}
    inf = {'theirs': lambda: authors_infer(A, P, c, models, loader)}
    for v, d in sides.items():
        step[v] = (lambda d=d: ours_train_step(d['model'], d['opt'], d['sch'], feats, d['amp']))
        inf[v] = (lambda d=d: _infer_ctx(d, feats, c.input_size))
    out = {}
    for what, fns in (('train_step', step), ('inference', inf)) if infer else (('train_step', step),):
        t = alternate(fns, pairs, warmup, device, what)
        out[what] = dict(seconds=t, ratios={v: ratios(t['theirs'], t[v]) for v in sides})
    return out

def _infer_ctx(d, feats, out_size):
    with _autocast(d['amp']): return ours_infer(d['model'], feats, out_size)

# ---------------------------------------------------------------------------------------------------------------
def memory_child(args):
    """In a fresh process: build one side, run inference then training steps, print the peak of each as JSON.
    Inference runs first (no optimiser state exists yet); the peak is reset before training (CUDA: the allocator's
    statistics; CPU: VmHWM through /proc/self/clear_refs)."""
    import torch, gc
    device = torch.device(args.device)
    S = setup(args, device)
    feats = make_feats(S['size'], device)
    side = args.child
    if side == 'theirs': del S['ours']
    else:
        for k in ('models', 'params', 'opt_a'): del S[k]
    gc.collect()
    if side == 'theirs':
        loader = authors_batch(feats)
        modes = dict(inference=lambda: authors_infer(S['A'], S['P'], S['c'], S['models'], loader),
                     train=lambda: authors_train_step(S['A'], S['c'], S['models'], S['params'], S['opt_a'], loader))
    else:
        m = S['ours']; amp = _patch_variant(m, side); opt, sch = ours_optimizer(m)
        modes = dict(inference=lambda: _infer_ctx(dict(model=m, amp=amp), feats, S['c'].input_size),
                     train=lambda: ours_train_step(m, opt, sch, feats, amp))
    print_peaks(side, modes, device, args.mem_steps)

def print_peaks(side:str, modes:dict, device, steps:int):
    "Run each mode's callable `steps` times after resetting the peak; print the peaks as one `MEMORY` JSON line."
    import torch, gc
    res = dict(side=side)
    for mode, fn in modes.items():
        sync(device); gc.collect()
        if device.type == 'cuda': torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(device)
        res[f'{mode}_rss_before_gb'], res[f'{mode}_reset'] = _rss_gb(), _reset_hwm()
        for _ in range(steps): fn()
        sync(device)
        res[f'{mode}_vmhwm_gb'] = _vmhwm_gb()
        if device.type == 'cuda': res[f'{mode}_cuda_peak_gb'] = torch.cuda.max_memory_allocated(device) / 1024 ** 3
    print('MEMORY ' + json.dumps(res), flush=True)

def _reset_hwm() -> bool:
    "Reset VmHWM to the current resident size (Linux: write 5 to /proc/self/clear_refs)."
    try:
        with open('/proc/self/clear_refs', 'w') as f: f.write('5')
        return True
    except OSError: return False

def _status(key):
    try:
        for l in open('/proc/self/status'):
            if l.startswith(key): return int(l.split()[1]) / 1024 ** 2
    except OSError: return None

def _vmhwm_gb(): return _status('VmHWM')
def _rss_gb(): return _status('VmRSS')

def memory(args, sides:list, timeout=None) -> dict:
    "Peak memory of each side (inference, then training) in its own process."
    out = {}
    for side in sides:
        cmd = [sys.executable, __file__, '--method', args.method, '--authors', args.authors, '--device', args.device, '--size', args.size,
               '--threads', str(args.threads), '--child', side, '--mem-steps', str(args.mem_steps)]
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
            line = [l for l in r.stdout.splitlines() if l.startswith('MEMORY ')]
            out[side] = json.loads(line[0][7:]) if line and not r.returncode else dict(error=(r.stderr or r.stdout)[-2000:])
        except subprocess.TimeoutExpired: out[side] = dict(error=f'timed out after {timeout} s')
        print('  memory', side, out[side], flush=True)
    return out

# ---------------------------------------------------------------------------------------------------------------
def write(res:dict, out:Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + '.json').write_text(json.dumps(res, indent=1, default=str))
    e, env = res['equivalence'], res['env']
    L = ["# Ours vs the authors' VQ-Flow (one process, identical weights and inputs)", '',
         f"Configuration `{res['size']}`: {res['size_spec']}. Machine: {env['cpu']['model']}, {env['cpu']['cpus']} CPUs, "
         f"flags {' '.join(env['cpu']['flags'])}; torch {env['torch']} ({env.get('cpu_capability', '')}), {env['threads']} thread(s), "
         f"device {env['device']}{' (' + env['gpu'] + ')' if 'gpu' in env else ''}. {res['n_numbers']:,} trainable parameters (and all buffers) transplanted.", '',
         '## Same numbers', '', '| quantity | max abs difference |', '|---|---|']
    for k in ('loss', 'latents', 'log_det', 'commit', 'grad_rel', 'image_score', 'add_map', 'mul_map'):
        L.append(f'| {k} | {e[k]:.3g} |')
    L += ['', f"(loss {e['loss_theirs']:.6g} theirs, {e['loss_ours']:.6g} ours; grad_rel = max difference / max |grad| of three "
          f"conv weights; image scores are of order {e['image_score_scale']:.3g}.)", '']
    if res.get('variant_equivalence'):
        L += ['Our variants against ours as configured (same state; training loss and inference outputs):', '',
              '| variant | loss (relative) | image_score | add_map | mul_map |', '|---|---|---|---|---|']
        for v, d in res['variant_equivalence'].items():
            L.append(f"| {v} | {d['loss_rel']:.3g} | {d['image_score']:.3g} | {d['add_map']:.3g} | {d['mul_map']:.3g} |")
        L.append('')
    if 'timing' in res:
        L += ['## Time (theirs / ours, per alternating pair; > 1 means ours is faster)', '',
              '| what | variant | pairs | median | min | max | theirs median (s) | ours median (s) |', '|---|---|---|---|---|---|---|---|']
        for what, d in res['timing'].items():
            for v, r in d['ratios'].items():
                L.append(f"| {what} | {v} | {r['pairs']} | {r['median']:.2f}× | {r['min']:.2f}× | {r['max']:.2f}× | "
                         f"{r['theirs_median_s']:.3f} | {r['ours_median_s']:.3f} |")
        L.append('')
    if 'memory' in res:
        key = 'cuda_peak_gb' if env['device'].startswith('cuda') else 'vmhwm_gb'
        what = 'torch.cuda.max_memory_allocated' if key == 'cuda_peak_gb' else 'VmHWM, whole process, reset between modes'
        cpu = key == 'vmhwm_gb'
        L += [f"## Peak memory ({what}, GB; each side in its own process, inference first, then training)", '',
              '| side | inference | of theirs | training | of theirs |' + (' training above start | of theirs |' if cpu else ''),
              '|---|---|---|---|---|' + ('---|---|' if cpu else '')]
        ref = res['memory'].get('theirs', {})
        def above(m): return m['train_vmhwm_gb'] - m['train_rss_before_gb'] if m.get('train_vmhwm_gb') and m.get('train_rss_before_gb') else None
        for side, m in res['memory'].items():
            if 'error' in m: L.append(f'| {side} | error | | error | |'); continue
            cells = []
            for mode in ('inference', 'train'):
                v, r = m.get(f'{mode}_{key}'), ref.get(f'{mode}_{key}')
                cells += [f'{v:.2f}' if v is not None else '', f'{100 * v / r:.0f} %' if v is not None and r else '']
            if cpu:
                v, r = above(m), above(ref) if 'error' not in ref else None
                cells += [f'{v:.2f}' if v is not None else '', f'{100 * v / r:.0f} %' if v is not None and r else '']
            L.append(f"| {side} | " + ' | '.join(cells) + ' |')
        L += ['', '(On CPU the whole-process peak includes Python, torch and the input features; "training above start" is '
              'the training peak minus the resident size just before the first training step, i.e. what the step itself '
              'adds: gradients, optimiser state and activations.)' if cpu else '', '']
    L += [f"Command: `{res['command']}`", '']
    Path(str(out) + '.md').write_text('\n'.join(L))
    print('\n'.join(L))

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--method', default='vqflow', choices=['vqflow', 'hgad', 'hvqtrans'])
    ap.add_argument('--authors', required=True, help='checkout of the authors\' repository (cool-xuan/vqflow, xcyao00/HGAD, '
                    'RuiyingLu/HVQ-Trans); their files are imported, not copied')
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--size', default='authors', choices=list(SIZES), help='authors (their configuration), small, smoke (CPU)')
    ap.add_argument('--steps', type=int, default=5, help='timed pairs per measurement')
    ap.add_argument('--warmup', type=int, default=1)
    ap.add_argument('--threads', type=int, default=int(os.environ.get('VQFLOW_THREADS', 1)))
    ap.add_argument('--variants', default=None, help="default: ours (vqflow), the method module's VARIANTS (hgad, hvqtrans); vqflow: comma-separated: ours, ours+dense, ours+bcond, ours+quant, ours+cl, ours+bf16 ... (see _patch_variant)")
    ap.add_argument('--memory-sides', default=None, help='comma-separated sides for the memory processes (default: theirs + variants)')
    ap.add_argument('--mem-steps', type=int, default=2, help='steps per mode in each memory process')
    ap.add_argument('--no-memory', action='store_true')
    ap.add_argument('--no-timing', action='store_true')
    ap.add_argument('--out', default=None, help='default results/benchmarks/vs_authors (vqflow), vs_authors_<method> (others)')
    ap.add_argument('--no-combined', action='store_true', help='do not update the method\'s section of results/benchmarks/vs_authors.md')
    ap.add_argument('--child', default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    if args.method != 'vqflow': return run_method(args)
    if args.variants is None: args.variants = 'ours'
    if args.out is None: args.out = str(ROOT / 'results' / 'benchmarks' / 'vs_authors')
    if args.child: return memory_child(args)
    device = torch.device(args.device)
    S = setup(args, device)
    feats = make_feats(S['size'], device)
    res = dict(size=args.size, size_spec=S['size'], env=env_info(device), n_numbers=S['n_numbers'],
               command=portable_command())
    print(f"transplanted {S['n_numbers']:,} numbers", flush=True)
    res['equivalence'] = equivalence(S, feats, device); print('equivalence', res['equivalence'], flush=True)
    variants = [v.strip() for v in args.variants.split(',') if v.strip()]
    res['variant_equivalence'] = {v: variant_equivalence(S, feats, v) for v in variants if v != 'ours'}
    if res['variant_equivalence']: print('variants vs ours', res['variant_equivalence'], flush=True)
    if not args.no_timing: res['timing'] = timing(S, feats, device, args.steps, args.warmup, variants)
    del S; import gc; gc.collect()
    if not args.no_memory:
        sides = ['theirs'] + (variants if args.memory_sides is None else [s for s in args.memory_sides.split(',') if s != 'theirs'])
        res['memory'] = memory(args, sides)
    write(res, Path(args.out))

def variant_equivalence(S, feats, v) -> dict:
    "Max |variant - ours| of the training loss and the inference outputs, from the same state (one extra copy)."
    import torch, copy
    ours = S['ours']; sd = {k: t.clone() for k, t in ours.state_dict().items()}
    m = copy.deepcopy(ours); amp = _patch_variant(m, v)
    m.train(); ours.train()
    with _autocast(amp): lv = float(m.loss(feats)['loss'])
    lb = float(ours.loss(feats)['loss'])
    m.load_state_dict(sd); ours.load_state_dict(sd)           # training forwards move the EMA codebooks
    with _autocast(amp): iv = ours_infer(m, feats, S['c'].input_size)
    ib = ours_infer(ours, feats, S['c'].input_size)
    del m, sd
    return dict(loss=abs(lv - lb), loss_rel=abs(lv - lb) / abs(lb), loss_ours=lb, loss_variant=lv,
                image_score=maxdiff(iv[0], ib[0]), add_map=maxdiff(iv[1], ib[1]), mul_map=maxdiff(iv[2], ib[2]))


# ---------------------------------------------------------------------------------------------------------------
# HGAD and HVQ-Trans: their sides live in benchmarks/authors_hgad.py and authors_hvqtrans.py (setup, transplant,
# equivalence, sides); what follows drives them the same way for both.
def method_module(method:str):
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path: sys.path.insert(0, here)
    import importlib
    return importlib.import_module(dict(hgad='authors_hgad', hvqtrans='authors_hvqtrans')[method])

# bf16 sides of any method: 'X+bf16' is side X (theirs, theirs_flows, ours, ours+<variant>) run under the trainer's bf16
# context (`train.Amp('bf16', device).autocast()`, i.e. `Schedule.precision='bf16'`), their model wrapped in the same
# autocast. Changed maths: compared with fp32 by benchmarks/gpu_vs_authors.py, timed only against sides of the same precision.
BF16 = '+bf16'
def is_bf16(side:str) -> bool: return side.endswith(BF16)
def base_side(side:str) -> str: return side[:-len(BF16)] if is_bf16(side) else side
def side_kind(side:str) -> str: return 'theirs' if side.startswith('theirs') else 'ours'
def same_precision(a:str, b:str) -> bool: return is_bf16(a) == is_bf16(b)

def bf16_ctx(device):
    "The trainer's bf16 context: `train.Amp('bf16', device).autocast()` (torch.autocast with bfloat16)."
    import warnings
    from vqflow_nb.train import Amp
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # 'this CPU has no native bfloat16': smoke runs on such CPUs time nothing
        return Amp('bf16', device).autocast()

def under_bf16(fn, device):
    "`fn` run under `bf16_ctx` (None stays None: an inference-only side has no training callable)."
    if fn is None: return None
    def g():
        with bf16_ctx(device): return fn()
    return g

def method_sides(M, S, names, share=False) -> dict:
    """The module's `sides` (its theirs sides and the fp32 names); 'X+bf16' is side X under `bf16_ctx`, ours on its own copy of the
    transplanted model (unless `share`: a memory process, which keeps one side). A module may define
    `authors_infer_bf16(S)` where their inference cannot simply run under autocast (HVQ-Trans: host-side numpy)."""
    import copy
    sd = M.sides(S, [n for n in names if not is_bf16(n) and side_kind(n) == 'ours'])
    out = dict(sd)   # the module's theirs sides always, as `M.sides` gives them
    for n in names:
        b = base_side(n)
        if not is_bf16(n): continue
        if side_kind(n) == 'theirs':
            d = sd[b]
            infer = (lambda: M.authors_infer_bf16(S)) if b == 'theirs' and hasattr(M, 'authors_infer_bf16') else under_bf16(d['infer'], S['device'])
            out[n] = dict(train=under_bf16(d['train'], S['device']), infer=infer, kind='theirs')
        else:
            d = M.sides(S if share else {**S, 'ours': copy.deepcopy(S['ours'])}, [b])[b]
            out[n] = dict(train=under_bf16(d['train'], S['device']), infer=under_bf16(d['infer'], S['device']), kind='ours')
    return out

def equality_ok(M, e:dict) -> dict:
    """Each equality row against the module's tolerance: {row: True | False | 'near-tie'}. 'near-tie': the row is beyond
    tolerance only through code assignments that flipped at float32 near-ties (HVQ-Trans, `authors_hvqtrans._flips`)."""
    ex = getattr(M, 'explained', lambda e: False)(e)
    return {k: True if e[k] <= M.TOLERANCE[k] else ('near-tie' if ex and k in getattr(M, 'AFTER_FLIP', ()) else False)
            for k in M.ROWS if k in e}

def all_equal(eq:dict) -> bool: return all(v is True or v == 'near-tie' for v in eq.values())

def portable_command() -> str:
    "This run's command line with paths inside the repository made relative and others written as DIR (no machine paths)."
    out = []
    for a in [Path(sys.argv[0]).as_posix()] + sys.argv[1:]:
        p = Path(a)
        if p.is_absolute():
            try: a = p.resolve().relative_to(ROOT).as_posix()
            except ValueError: a = 'DIR'
        out.append(a)
    return 'python ' + ' '.join(out)

def run_method(args):
    "`--method hgad|hvqtrans`: equality first, then alternating timings, then memory per side in its own process."
    import torch, gc
    M = method_module(args.method)
    if args.out is None: args.out = str(ROOT / 'results' / 'benchmarks' / f'vs_authors_{args.method}')
    variants = [v.strip() for v in (args.variants or ','.join(M.VARIANTS)).split(',') if v.strip()]
    if args.child: return method_memory_child(args, M)
    device = torch.device(args.device)
    S = M.setup(args.authors, args.size, device)
    res = dict(method=args.method, size=args.size, size_spec=S['spec'], env=env_info(device), n_numbers=S['n_numbers'],
               command=portable_command(), loadavg_start=loadavg(),
               notes=getattr(M, 'SIDE_NOTES', {}), changed_maths=getattr(M, 'CHANGED_MATHS', {}))
    print(f"transplanted {S['n_numbers']:,} trainable numbers (and every buffer)", flush=True)
    e = M.equivalence(S)
    res['equivalence'], res['tolerance'], res['equal'] = e, M.TOLERANCE, equality_ok(M, e)
    print('equivalence', e, '\nwithin tolerance', res['equal'], flush=True)
    if not all_equal(res['equal']): print('WARNING: some equality rows exceed their tolerance', flush=True)
    if not args.no_timing:
        sd = method_sides(M, S, variants)
        refs = [k for k, d in sd.items() if d['kind'] == 'theirs']
        ours = [k for k, d in sd.items() if d['kind'] == 'ours']
        res['timing'] = {}
        for what, key in (('train_step', 'train'), ('inference', 'infer')):
            fns = {k: d[key] for k, d in sd.items() if d[key] is not None}
            t = alternate(fns, args.steps, args.warmup, device, what)
            res['timing'][what] = dict(seconds=t, ratios={r: {v: ratios(t[r], t[v]) for v in ours if v in t and same_precision(r, v)} for r in refs if r in t})
        res['loadavg_end'] = loadavg()
        del sd
    del S; gc.collect()
    if not args.no_memory:
        skip = getattr(M, 'INFERENCE_ONLY', ())
        sides = ['theirs'] + ([v for v in variants if v not in skip] if args.memory_sides is None else [s for s in args.memory_sides.split(',') if s != 'theirs'])
        res['memory'] = memory(args, sides)
    write_method(res, Path(args.out), M)
    if not args.no_combined: update_combined(res, Path(args.out))

def drop_other_side(method:str, S:dict, side:str):
    """What a memory process measuring `side` of HGAD or HVQ-Trans does not need: for their side our model and our
    extractor (HGAD's B6, which only `ours+backbone` runs); for ours their model, optimiser and pyramid (a variant
    runs on its own copy by then, so ours goes too)."""
    if side_kind(side) == 'theirs': S.pop('ours', None); S.pop('ext', None)
    else:
        if base_side(side) != 'ours': S.pop('ours', None)
        th = S.pop('theirs'); S.pop('theirs_ot', None); S.pop('opt_a', None)
        if method == 'hgad': S['their_feats'] = None; th.nfs = []; th.optimizer = None
        del th

def method_memory_child(args, M):
    "In a fresh process: build both, drop the other side, run inference then training steps; print each mode's peak."
    import torch, gc
    device = torch.device(args.device)
    S = M.setup(args.authors, args.size, device)
    side = args.child
    sd = method_sides(M, S, [side], share=True)
    if sd[side]['train'] is None: return print('MEMORY ' + json.dumps(dict(side=side, error='inference-only side')), flush=True)
    keep = sd[side]
    drop_other_side(args.method, S, side)
    del sd; gc.collect()
    try:   # give the dropped side's freed pages back to the system, so the kept side's peak is its own
        import ctypes; ctypes.CDLL('libc.so.6').malloc_trim(0)
    except Exception: pass
    print_peaks(side, dict(inference=keep['infer'], train=keep['train']), device, args.mem_steps)

def _method_md(res:dict, M) -> list:
    e, env = res['equivalence'], res['env']
    name = dict(hgad='HGAD', hvqtrans='HVQ-Trans')[res['method']]
    L = [f"# Ours vs the authors' {name} (one process, identical weights and inputs)", '',
         f"Configuration `{res['size']}`: {res['size_spec']}. Machine: {env['cpu']['model']}, {env['cpu']['cpus']} CPUs; "
         f"torch {env['torch']} ({env.get('cpu_capability', '')}), {env['threads']} thread(s) per side, device {env['device']}"
         f"{' (' + env['gpu'] + ')' if 'gpu' in env else ''}. Load average at the start {res.get('loadavg_start')}, at the end "
         f"of the timings {res.get('loadavg_end')} (other jobs shared the CPUs). {res['n_numbers']:,} trainable numbers "
         f"(and every buffer) copied from their model into ours.", '',
         '## Same numbers (checked first)', '', '| quantity | max abs difference | tolerance | within |', '|---|---|---|---|']
    for k in M.ROWS:
        if k in e:
            ok = res['equal'].get(k)
            L.append(f"| {k} | {e[k]:.3g} | {M.TOLERANCE[k]:g} | {'yes' if ok is True else 'after near-tie flips' if ok == 'near-tie' else '**no**'} |")
    L += ['', 'Quantities: ' + M.equivalence.__doc__.strip().replace('\n   ', ''), '']
    if 'loss_theirs' in e: L += [f"(loss theirs {e['loss_theirs']}, ours {e['loss_ours']}; image scores of order {e.get('image_score_scale', float('nan')):.3g}.)", '']
    if 'timing' in res:
        L += ['## Time (theirs / ours per alternating round; > 1 means ours is faster)', '',
              '| what | theirs | ours | rounds | median | min | max | theirs median (s) | ours median (s) |', '|---|---|---|---|---|---|---|---|---|']
        for what, d in res['timing'].items():
            for ref, rr in d['ratios'].items():
                for v, r in rr.items():
                    L.append(f"| {what} | {ref} | {v} | {r['pairs']} | {r['median']:.2f}× | {r['min']:.2f}× | {r['max']:.2f}× | "
                             f"{r['theirs_median_s']:.3f} | {r['ours_median_s']:.3f} |")
        L.append('')
        for k, v in {**res.get('notes', {}), **{k: 'CHANGED MATHS: ' + v for k, v in res.get('changed_maths', {}).items()}}.items():
            L.append(f'- `{k}`: {v}')
        L.append('')
    if 'memory' in res:
        cuda = env['device'].startswith('cuda')
        key = 'cuda_peak_gb' if cuda else 'vmhwm_gb'
        L += [f"## Peak memory ({'torch.cuda.max_memory_allocated' if cuda else 'VmHWM, whole process, reset between modes'}, GB; "
              'each side in its own process, inference first, then training)', '',
              '| side | inference | of theirs | training | of theirs | training above start | of theirs |', '|---|---|---|---|---|---|---|']
        ref = res['memory'].get('theirs', {})
        def above(m): return m['train_' + key] - (0 if cuda else m['train_rss_before_gb']) if m.get('train_' + key) and m.get('train_rss_before_gb') else None
        for side, m in res['memory'].items():
            if 'error' in m: L.append(f'| {side} | error | | | | | |'); continue
            cells = []
            for v, r in ((m.get(f'inference_{key}'), ref.get(f'inference_{key}')), (m.get(f'train_{key}'), ref.get(f'train_{key}')),
                         (above(m), above(ref) if 'error' not in ref else None)):
                cells += [f'{v:.2f}' if v is not None else '', f'{100 * v / r:.0f} %' if v is not None and r else '']
            L.append(f"| {side} | " + ' | '.join(cells) + ' |')
        L += ['', '(Each process builds both models, then drops the other side before measuring. On CPU the whole-process '
              'peak includes Python, torch, the inputs and what the set-up left; "training above start" is the training '
              'peak minus the resident size just before the first training step.)', '']
    L += [f"Command: `{res['command']}`", '']
    return L

def write_method(res:dict, out:Path, M):
    out.parent.mkdir(parents=True, exist_ok=True)
    Path(str(out) + '.json').write_text(json.dumps(res, indent=1, default=str))
    L = _method_md(res, M)
    Path(str(out) + '.md').write_text('\n'.join(L))
    print('\n'.join(L))

def update_combined(res:dict, out:Path):
    "Replace (or append) this method's section of results/benchmarks/vs_authors.md, between markers."
    comb = out.parent / 'vs_authors.md'
    start, end = f"<!-- vs_authors:{res['method']} -->", f"<!-- /vs_authors:{res['method']} -->"
    name = dict(hgad='HGAD', hvqtrans='HVQ-Trans')[res['method']]
    e = res['equivalence']
    L = [start, f"## {name} against the authors' code (`--method {res['method']} --size {res['size']}`)", '',
         f"Full output: `{out.name}.md`. Equality rows (max |theirs - ours|): " +
         ', '.join(f"{k} {e[k]:.2g}" for k in res['equal']) + f" — all within tolerance: {'yes' if all(v is True for v in res['equal'].values()) else 'yes, apart from rows moved by near-tie code flips' if all_equal(res['equal']) else 'NO'}.", '']
    if 'timing' in res:
        L += ['| what | theirs | ours | rounds | theirs / ours, median | min | max | theirs (s) | ours (s) |', '|---|---|---|---|---|---|---|---|---|']
        for what, d in res['timing'].items():
            for ref, rr in d['ratios'].items():
                for v, r in rr.items():
                    L.append(f"| {what} | {ref} | {v} | {r['pairs']} | {r['median']:.2f}× | {r['min']:.2f}× | {r['max']:.2f}× | {r['theirs_median_s']:.3f} | {r['ours_median_s']:.3f} |")
        L += ['', f"Load average {res.get('loadavg_start')} → {res.get('loadavg_end')}; {res['env']['threads']} thread(s), {res['env']['device']}.", '']
    L.append(end)
    text = comb.read_text() if comb.exists() else ''
    if start in text and end in text:
        text = text[:text.index(start)] + '\n'.join(L) + text[text.index(end) + len(end):]
    else: text = text.rstrip('\n') + '\n\n' + '\n'.join(L) + '\n'
    comb.write_text(text)

# ---------------------------------------------------------------------------------------------------------------
def authors_step_seconds(method:str, authors_dir:str, device:str='cpu', steps:int=3, size:str='authors') -> dict:
    """Seconds per training step of the authors' own code at their configuration on `device`: median of `steps`
    timed steps after one warm-up step. VQ-Flow: their `train_meta_epoch` on one batch (backbone replaced by given
    random feature maps, as in this benchmark); HGAD: their loop's iteration (backbone + three per-level steps);
    HVQ-Trans: their `train_one_epoch` iteration (train-mode backbone inside the model). Backbone weights are random."""
    import torch
    dev = torch.device(device)
    if method == 'vqflow':
        a = types.SimpleNamespace(authors=authors_dir, size=size)
        S = setup(a, dev)
        feats = make_feats(S['size'], dev)
        loader = authors_batch(feats)
        fn = lambda: authors_train_step(S['A'], S['c'], S['models'], S['params'], S['opt_a'], loader)
        bs, spec = S['size']['batch'], S['size']
    else:
        M = method_module(method)
        S = M.setup(authors_dir, size, dev)
        fn, bs, spec = M.authors_step(S), S['spec']['batch'], S['spec']
    fn()
    ts = [timed(fn, dev) for _ in range(steps)]
    import statistics
    return dict(seconds_per_step=statistics.median(ts), batch_size=int(bs), times=ts, method=method, size=size,
                spec={k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.items()}, device=str(dev),
                threads=torch.get_num_threads(), weights='random backbone')

if __name__ == '__main__': main()
