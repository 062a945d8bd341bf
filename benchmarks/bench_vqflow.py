#!/usr/bin/env python
"""VQ-Flow training and inference speed and peak memory on this machine's CPU.

Each case runs in a fresh subprocess, so its peak resident memory (VmHWM) is its own (see CASES):
- offline: tf_efficientnet_lite0 (packaged weights) at 256 px, `VQFlowConfig.small`, batch 8;
- authors: convnextv2_base at 384 px (random weights: timing only), the authors' full `VQFlowConfig`, batch 4.
`*_cached` cases time the VQ-Flow step alone with no backbone in the process (what our trainer does on cached
features); the others put a no-grad backbone forward into every step and also time inference per image.
Our speed against the authors' code is measured by `benchmarks/vs_authors.py` (same process, same machine,
identical weights, alternating timings); this script only times ours. Writes results/benchmarks/vqflow.{json,md}.
"""
import json, os, subprocess, sys, time, platform
from pathlib import Path
from _cases import vmhwm_gb, run_cases   # benchmarks/_cases.py: one subprocess per case

ROOT = Path(__file__).resolve().parents[1]

def case(name, steps):
    import gc, torch
    from vqflow_nb.vqflow import VQFlow, VQFlowConfig
    from vqflow_nb.features import FeatureExtractor
    from vqflow_nb.flows import count_params
    from vqflow_nb.train import make_optimizer, Schedule
    from vqflow_nb.core import cpu_memory_mode
    cpu_memory_mode()                                   # as the trainer does on CPU
    torch.manual_seed(0)
    authors = name.startswith('authors')
    ext, bs = (FeatureExtractor.from_preset('vqflow', weights='random'), 4) if authors else (FeatureExtractor.from_preset('offline'), 8)
    x = torch.rand(bs, 3, *ext.input_size)
    with torch.no_grad(): feats = ext(x)
    with_backbone = name in ('offline', 'authors')
    if not with_backbone: del ext; gc.collect()         # the trainer never holds the backbone: features come from the cache
    cfg = (VQFlowConfig.for_channels if authors else VQFlowConfig.small)([f.shape[1] for f in feats], seed=0,
                                                                         checkpoint=name.endswith('checkpoint'))
    model = VQFlow(cfg)
    opt = make_optimizer(model.parameters(), Schedule(lr=1e-4))   # the trainer's optimiser (fused Adam)
    def step(with_backbone):
        f = feats
        if with_backbone:
            with torch.no_grad(): f = ext(x)
        out = model.loss(f); opt.zero_grad(); out['loss'].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0); opt.step()
    model.train(); step(False)                               # warm-up (allocations, first-touch, Adam state)
    res = dict(case=name, batch=bs, input=list(x.shape[-2:]), threads=torch.get_num_threads(), checkpoint=cfg.checkpoint,
               flow_params_M=round((count_params(model.flows) + count_params(model.fusion)) / 1e6, 2),
               total_params_M=round(count_params(model) / 1e6, 2))
    t = time.time(); [step(with_backbone) for _ in range(steps)]; res['step_s'] = (time.time() - t) / steps
    res['train_img_per_s'] = bs / res['step_s']
    if with_backbone:
        model.eval()
        with torch.no_grad():
            t = time.time()
            for _ in range(steps): model.score(ext(x[:1]), None, out_size=tuple(x.shape[-2:]))
            res['infer_s_per_img'] = (time.time() - t) / steps
    res['peak_gb'] = vmhwm_gb()
    print(json.dumps(res))

CASES = [('offline', 5, 'backbone forward (no grad) + VQ-Flow step'),
         ('offline_cached', 5, 'VQ-Flow step on cached features (our trainer)'),
         ('authors', 2, 'backbone forward (no grad) + VQ-Flow step; inference'),
         ('authors_cached', 2, 'VQ-Flow step on cached features (our trainer)'),
         ('authors_cached_checkpoint', 2, 'same, with activation checkpointing of the flow blocks')]

def main():
    if len(sys.argv) > 1 and sys.argv[1] == '--case': return case(sys.argv[2], int(sys.argv[3]))
    rows = run_cases(__file__, CASES)
    out = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_avg=os.getloadavg()),
               cases=rows)
    d = ROOT/'results'/'benchmarks'; d.mkdir(parents=True, exist_ok=True)
    (d/'vqflow.json').write_text(json.dumps(out, indent=1))
    L = ['# VQ-Flow benchmark (CPU)', '', f"Machine: {out['machine']['platform']}, {out['machine']['cpus']} CPUs, "
         f"load average at the end {tuple(round(x, 2) for x in out['machine']['load_avg'])}. Each case in a fresh process; "
         "'authors' = convnextv2_base at 384 px with random weights (timing only), the authors' full VQFlowConfig, batch 4; "
         "'offline' = tf_efficientnet_lite0 (packaged weights) at 256 px, VQFlowConfig.small, batch 8.", '',
         '| case | what is timed | batch | input | flow params (M) | total params (M) | s/step | train img/s | inference s/img | peak RSS (GB) |',
         '|' + '---|' * 10]
    for r in rows:
        inf = f"{r['infer_s_per_img']:.2f}" if 'infer_s_per_img' in r else ''
        L.append(f"| {r['case']} | {r['what']} | {r['batch']} | {r['input'][0]} | {r['flow_params_M']} | {r['total_params_M']} | "
                 f"{r['step_s']:.2f} | {r['train_img_per_s']:.3f} | {inf} | {r['peak_gb']:.2f} |")
    L += ['', "Ours against the authors' code (same machine, same process, identical weights): "
          "`results/benchmarks/vs_authors.md` (`benchmarks/vs_authors.py`)."]
    (d/'vqflow.md').write_text('\n'.join(L) + '\n'); print('\n'.join(L))

if __name__ == '__main__': main()
