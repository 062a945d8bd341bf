#!/usr/bin/env python
"""HGAD training and inference speed and peak memory on this machine's CPU, and what caching the pyramid features saves.

Each case runs in a fresh subprocess, so its peak resident memory (VmHWM) is its own:
- offline: feature preset `hgad_offline` (tf_efficientnet_lite0 stage 3, packaged weights, pyramid 512/256/128 -> 32/16/8
  maps of 112 channels), `HGADConfig.small` (4 blocks, 64-d condition), batch 8, 5 classes (the synthetic set);
- authors: feature preset `hgad` (tf_efficientnet_b6 stage 3, pyramid 1024/512/256 -> 64/32/16 maps of 200 channels)
  with random weights (timing only), the authors' full `HGADConfig` (12 blocks, 256-d condition, 15 classes), batch 8.
Per case: the backbone's no-grad forward per batch (what the authors' loop adds to every step), one HGAD training step on
cached features (three levels, each with its own zero_grad/backward/step: our trainer), and inference per image
(backbone + flows + the raw level maps; the class-wide normalisation and Gaussian filter are timed separately per image).
From these, the cost of the authors' whole schedule on MVTec AD (3,629 training images, 200 passes at batch 8 with
drop_last, and 200 validations of the 1,725 test images with the backbone re-run each time) against ours (features
extracted once per image) is estimated for this CPU.
Writes results/benchmarks/hgad.{json,md}. Usage: VQFLOW_THREADS=1 python benchmarks/bench_hgad.py [offline|authors ...]
"""
import json, os, subprocess, sys, time, platform
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MVTEC = dict(train=3629, test=1725, passes=200, batch=8, validations=200)   # MVTec AD counts; HGAD main.py/train.py schedule
STEPS = dict(offline=5, authors=2)

def vmhwm_gb():
    for l in open('/proc/self/status'):
        if l.startswith('VmHWM'): return int(l.split()[1]) / 1024**2

def case(name, steps):
    import numpy as np, torch
    from vqflow_nb.core import cpu_memory_mode, set_threads
    from vqflow_nb.features import FeatureExtractor
    from vqflow_nb.flows import count_params
    from vqflow_nb.hgad import HGAD, HGADConfig, anomaly_from_levels
    from vqflow_nb.train import make_optimizer
    cpu_memory_mode(); set_threads()                   # as the trainer does on CPU
    torch.manual_seed(0)
    authors = name == 'authors'
    ext = FeatureExtractor.from_preset('hgad', weights='random') if authors else FeatureExtractor.from_preset('hgad_offline')
    n_classes, bs = (15, 8) if authors else (5, 8)
    x = torch.rand(bs, 3, *ext.input_size)
    with torch.no_grad(): feats = ext(x)                                     # warm-up
    t = time.time()
    with torch.no_grad(): feats = ext(x)
    backbone_s = time.time() - t
    cfg = (HGADConfig.for_channels if authors else HGADConfig.small)(ext.channels, n_classes, seed=0)
    model = HGAD(cfg)
    sch = model.schedule(); opt = make_optimizer(model.param_groups(sch), sch)   # the trainer's optimiser (fused Adam)
    batch = dict(cls_index=torch.arange(bs) % n_classes)
    model.train(); model.passes_done.fill_(16)                               # stage 2: all five losses
    model.training_step(feats, batch, opt, sch)                              # warm-up (allocations, Adam state)
    t = time.time()
    for _ in range(steps): model.training_step(feats, batch, opt, sch)
    step_s = (time.time() - t) / steps
    model.eval()
    with torch.no_grad():
        t = time.time()
        for i in range(steps): s = model.score(ext(x[i:i + 1]), dict(cls_index=batch['cls_index'][i:i + 1]), out_size=(256, 256))
        infer_s = (time.time() - t) / steps
        n = 16                                                               # class-wide maps for 16 images at 256 px masks
        parts = {k: np.repeat(v.numpy(), n, 0) for k, v in s.parts.items()}
        t = time.time()
        for key in ('logp', 'negent'): anomaly_from_levels([parts[f'{key}{l}'] for l in range(len(feats))], (256, 256), 4.0)
        finalize_s = (time.time() - t) / n
    res = dict(case=name, batch=bs, input=list(ext.input_size), pyramid=list(ext.pyramid), maps=[list(f.shape[1:]) for f in feats],
               threads=torch.get_num_threads(), depth=cfg.depth, pos_dim=cfg.pos_dim, n_classes=n_classes,
               flow_params_M=round(count_params(model.flows) / 1e6, 2), steps=steps, backbone_s_per_batch=backbone_s,
               step_s=step_s, train_img_per_s=bs / step_s, authors_loop_step_s=backbone_s + step_s,
               authors_loop_img_per_s=bs / (backbone_s + step_s), infer_s_per_img=infer_s + finalize_s,
               infer_img_per_s=1 / (infer_s + finalize_s), finalize_s_per_img=finalize_s, peak_gb=vmhwm_gb())
    print(json.dumps(res))

def schedule_cost(r):
    "Hours for the authors' MVTec AD schedule with and without cached features, from the per-batch timings of case `r`."
    per_img_bb = r['backbone_s_per_batch'] / r['batch']
    steps = MVTEC['passes'] * (MVTEC['train'] // MVTEC['batch'])
    flows = steps * r['step_s']
    theirs_bb = (steps * MVTEC['batch'] + MVTEC['validations'] * MVTEC['test']) * per_img_bb
    ours_bb = (MVTEC['train'] + MVTEC['test']) * per_img_bb
    return dict(steps=steps, flows_h=flows / 3600, authors_backbone_h=theirs_bb / 3600, cached_backbone_h=ours_bb / 3600,
                backbone_saved_h=(theirs_bb - ours_bb) / 3600, total_speedup=(flows + theirs_bb) / (flows + ours_bb))

def main():
    if len(sys.argv) > 2 and sys.argv[1] == '--case': return case(sys.argv[2], int(sys.argv[3]))
    names = sys.argv[1:] or ['offline', 'authors']
    out_json = ROOT/'results'/'benchmarks'/'hgad.json'
    old = {r['case']: r for r in json.loads(out_json.read_text())['cases']} if out_json.exists() else {}
    rows = {}
    for name in names:
        print(f'running {name} ...', flush=True)
        p = subprocess.run([sys.executable, __file__, '--case', name, str(STEPS[name])], capture_output=True, text=True, cwd=ROOT)
        if p.returncode: print(p.stderr[-3000:]); sys.exit(1)
        rows[name] = json.loads(p.stdout.strip().splitlines()[-1]); print(rows[name], flush=True)
    rows = {**{k: v for k, v in old.items() if k not in rows}, **rows}
    cases = [rows[k] for k in ('offline', 'authors') if k in rows]
    for r in cases: r['schedule'] = schedule_cost(r)
    out = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_avg=os.getloadavg()), mvtec=MVTEC, cases=cases)
    out_json.parent.mkdir(parents=True, exist_ok=True); out_json.write_text(json.dumps(out, indent=1))
    L = ['# HGAD benchmark (CPU)', '',
         f"Machine: {out['machine']['platform']}, {out['machine']['cpus']} CPUs, load average at the end "
         f"{tuple(round(x, 2) for x in out['machine']['load_avg'])} (other jobs shared the CPUs: absolute times are upper bounds). "
         "Each case in a fresh process. 'authors' = tf_efficientnet_b6 stage 3 on a 1024/512/256 pyramid with random weights "
         "(timing only), the authors' full HGADConfig (12 blocks, 256-d condition, 15 classes); 'offline' = feature preset "
         "hgad_offline (Lite0 stage 3 on 512/256/128), HGADConfig.small, 5 classes. Batch 8, stage-2 losses, three optimiser "
         "steps per batch (one per level). Inference per image: backbone + flows + level maps, plus the class-wide "
         "normalisation/Gaussian/product at 256-px masks.", '',
         '| case | maps | threads | flow params (M) | backbone s/batch (no grad) | HGAD s/step, cached features | train img/s, cached | '
         "authors' loop s/step (backbone + step) | authors' loop img/s | inference s/img | inference img/s | peak RSS (GB) |",
         '|' + '---|' * 12]
    for r in cases:
        L.append(f"| {r['case']} | {'/'.join(str(m[1]) for m in r['maps'])} | {r['threads']} | {r['flow_params_M']} | "
                 f"{r['backbone_s_per_batch']:.2f} | {r['step_s']:.2f} | {r['train_img_per_s']:.2f} | {r['authors_loop_step_s']:.2f} | "
                 f"{r['authors_loop_img_per_s']:.2f} | {r['infer_s_per_img']:.3f} | {r['infer_img_per_s']:.2f} | {r['peak_gb']:.2f} |")
    L += ['', "What caching saves over the authors' schedule on MVTec AD (3,629 training images, 200 passes of 453 steps at "
          "batch 8, 200 validations of 1,725 test images), estimated from the timings above on this CPU:", '',
          '| case | flow steps | flow training (h) | backbone, authors\' loop (h) | backbone, cached once (h) | backbone time saved (h) | whole-run speed-up |',
          '|' + '---|' * 7]
    for r in cases:
        s = r['schedule']
        L.append(f"| {r['case']} | {s['steps']} | {s['flows_h']:.1f} | {s['authors_backbone_h']:.1f} | {s['cached_backbone_h']:.2f} | "
                 f"{s['backbone_saved_h']:.1f} | {s['total_speedup']:.2f}x |")
    L += ['', "The authors' loop runs the backbone on every training batch (no grad) and on the whole test set at each of the "
          "200 validations; ours extracts each image's pyramid features once into the feature cache. The flows' cost is the "
          "same in both."]
    (ROOT/'results'/'benchmarks'/'hgad.md').write_text('\n'.join(L) + '\n'); print('\n'.join(L))

if __name__ == '__main__': main()
