#!/usr/bin/env python
"""VQ-Flow training and inference speed and peak memory on this machine's CPU.

Cases (each in a fresh subprocess, so the peak resident memory VmHWM is the case's own):
- offline: tf_efficientnet_lite0 (packaged weights) at 256 px, `VQFlowConfig.small`, batch 8, on cached features;
- authors: convnextv2_base at 384 px (random weights: timing only), the authors' full VQFlowConfig, batch 4:
  `step+backbone` = backbone forward under no_grad + VQ-Flow forward/backward/Adam step (what a run without the
  cache does), `step (cached)` = the VQ-Flow step alone (what our trainer does), and inference seconds per image.
The authors' own code, same configuration, same machine: 77.9 s per training step (it back-propagates through the
frozen backbone), 13.1 GB peak, 5.96 s per image at inference (figures given in the issue).
Writes results/benchmarks/vqflow.{json,md}.
"""
import json, os, subprocess, sys, time, platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
AUTHORS = dict(step_s=77.9, peak_gb=13.1, infer_s_per_img=5.96)

def vmhwm_gb():
    for l in open('/proc/self/status'):
        if l.startswith('VmHWM'): return int(l.split()[1]) / 1024**2

def case(name, steps):
    import torch
    from vqflow_nb.vqflow import VQFlow, VQFlowConfig
    from vqflow_nb.features import FeatureExtractor
    from vqflow_nb.flows import count_params
    torch.manual_seed(0)
    if name == 'offline':
        ext, bs = FeatureExtractor.from_preset('offline'), 8
        model = VQFlow(VQFlowConfig.small(ext.channels, seed=0))
    else:
        ext, bs = FeatureExtractor.from_preset('vqflow', weights='random'), 4
        model = VQFlow(VQFlowConfig.for_channels(ext.channels, seed=0))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.rand(bs, 3, *ext.input_size)
    with torch.no_grad(): feats = ext(x)
    def step(with_backbone):
        f = feats
        if with_backbone:
            with torch.no_grad(): f = ext(x)
        out = model.loss(f); opt.zero_grad(); out['loss'].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0); opt.step()
    model.train(); step(False)                               # warm-up (allocations, first-touch)
    res = dict(case=name, batch=bs, input=list(ext.input_size), threads=torch.get_num_threads(),
               flow_params_M=round((count_params(model.flows) + count_params(model.fusion)) / 1e6, 2),
               total_params_M=round(count_params(model) / 1e6, 2))
    t = time.time(); [step(False) for _ in range(steps)]; res['step_cached_s'] = (time.time() - t) / steps
    t = time.time(); [step(True) for _ in range(steps)]; res['step_backbone_s'] = (time.time() - t) / steps
    res['train_img_per_s_cached'] = bs / res['step_cached_s']; res['train_img_per_s_backbone'] = bs / res['step_backbone_s']
    model.eval()
    with torch.no_grad():
        t = time.time()
        for _ in range(steps): model.score(ext(x[:1]), None, out_size=tuple(ext.input_size))
        res['infer_s_per_img'] = (time.time() - t) / steps
    res['peak_gb'] = vmhwm_gb()
    print(json.dumps(res))

def main():
    if len(sys.argv) > 1 and sys.argv[1] == '--case': return case(sys.argv[2], int(sys.argv[3]))
    rows = []
    for name, steps in [('offline', 5), ('authors', 2)]:
        print(f'running {name} ...', flush=True)
        out = subprocess.run([sys.executable, __file__, '--case', name, str(steps)], capture_output=True, text=True, cwd=ROOT)
        if out.returncode: print(out.stderr[-3000:]); sys.exit(1)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1])); print(rows[-1], flush=True)
    a = next(r for r in rows if r['case'] == 'authors')
    cmp = dict(step_speedup_vs_authors_with_backbone=AUTHORS['step_s'] / a['step_backbone_s'],
               step_speedup_vs_authors_cached=AUTHORS['step_s'] / a['step_cached_s'],
               peak_ratio_vs_authors=a['peak_gb'] / AUTHORS['peak_gb'],
               infer_speedup_vs_authors=AUTHORS['infer_s_per_img'] / a['infer_s_per_img'])
    out = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_avg=os.getloadavg()),
               authors_code=AUTHORS, cases=rows, comparison=cmp)
    d = ROOT/'results'/'benchmarks'; d.mkdir(parents=True, exist_ok=True)
    (d/'vqflow.json').write_text(json.dumps(out, indent=1))
    L = ['# VQ-Flow benchmark (CPU)', '', f"Machine: {out['machine']['platform']}, {out['machine']['cpus']} CPUs, "
         f"load average at the end {tuple(round(x, 2) for x in out['machine']['load_avg'])}. Each case in a fresh process.", '',
         '| case | batch | input | flow params (M) | total params (M) | train step, cached features (s) | train img/s cached | '
         'train step incl. backbone fwd (s) | train img/s incl. backbone | inference s/img | peak RSS (GB) |', '|' + '---|' * 11]
    for r in rows:
        L.append(f"| {r['case']} | {r['batch']} | {r['input'][0]} | {r['flow_params_M']} | {r['total_params_M']} | "
                 f"{r['step_cached_s']:.2f} | {r['train_img_per_s_cached']:.3f} | {r['step_backbone_s']:.2f} | "
                 f"{r['train_img_per_s_backbone']:.3f} | {r['infer_s_per_img']:.2f} | {r['peak_gb']:.2f} |")
    L += ['', f"Authors' code, same configuration and machine: {AUTHORS['step_s']} s/step, {AUTHORS['peak_gb']} GB peak, "
          f"{AUTHORS['infer_s_per_img']} s/img inference.", '',
          f"Ours vs theirs (authors' configuration): step {cmp['step_speedup_vs_authors_with_backbone']:.2f}x faster including the "
          f"backbone forward, {cmp['step_speedup_vs_authors_cached']:.2f}x on cached features; peak memory "
          f"{100*cmp['peak_ratio_vs_authors']:.0f} % of theirs; inference {cmp['infer_speedup_vs_authors']:.2f}x faster."]
    (d/'vqflow.md').write_text('\n'.join(L) + '\n'); print('\n'.join(L))

if __name__ == '__main__': main()
