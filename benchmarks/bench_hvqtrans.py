#!/usr/bin/env python
"""HVQ-Trans training and inference speed and peak memory on this machine's CPU.

Each case runs in a fresh subprocess, so its peak resident memory (VmHWM) is its own (see CASES):
- authors: tf_efficientnet_b4 at 224 px (random weights: timing only), the authors' full `HVQTransConfig`
  (272 channels, 256-d tokens, 512 codes, 15 class copies), batch 16 (the authors' per-GPU batch);
- offline: tf_efficientnet_lite0 (packaged weights) at 224 px (`hvqtrans_offline`, 192 channels), `small=True`,
  5 class copies, batch 16.
'code' cases run the backbone inside the model in train mode on images (the faithful default); '_batched' the same
with one EMA step per class instead of per image; '_cached' the model alone on cached features (eval-mode
backbone, variant 'cached'). A training step is forward + backward + clip + AdamW step; inference = `score` on a
batch (with the POT term). The quantiser alone (5 levels, training mode) is also timed per image vs batched.
Other jobs may share the CPUs: every figure is timed several times and the table gives the minimum (the least
disturbed run) with the median beside it. Writes results/benchmarks/hvqtrans.{json,md}.
"""
import json, os, subprocess, sys, time, platform
from pathlib import Path
from _cases import vmhwm_gb, run_cases   # benchmarks/_cases.py: one subprocess per case

ROOT = Path(__file__).resolve().parents[1]

def timed(f, n):
    "min and median of n timings of f() (after one warm-up call)."
    import statistics
    f(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return min(ts), statistics.median(ts)

def case(name, steps):
    import gc, torch
    from vqflow_nb.hvqtrans import build
    from vqflow_nb.features import FeatureExtractor
    from vqflow_nb.train import make_optimizer
    from vqflow_nb.core import cpu_memory_mode, set_threads
    cpu_memory_mode(); set_threads()
    torch.manual_seed(0)
    authors = name.startswith('authors')
    variant = 'cached' if name.endswith('cached') else 'batched' if name.endswith('batched') else 'code'
    ext = (FeatureExtractor.from_preset('hvqtrans', backbone='tf_efficientnet_b4', weights='random') if authors
           else FeatureExtractor.from_preset('hvqtrans_offline'))
    n_classes, bs = (15, 16) if authors else (5, 16)
    x = torch.rand(bs, 3, *ext.input_size)
    cls = torch.arange(bs) % n_classes
    model = build(ext.channels, variant=variant, small=not authors, seed=0, n_classes=n_classes, extractor=ext)
    if variant == 'cached':
        with torch.no_grad(): inputs = ext.eval()(x)                    # what the feature cache holds
        del ext; gc.collect()
    else: inputs = [x]
    batch = dict(cls_index=cls)
    sch = model.schedule()
    opt = make_optimizer([p for p in model.parameters() if p.requires_grad], sch)
    def step(): model.training_step(inputs, batch, opt, sch)
    model.train()
    res = dict(case=name, variant=variant, batch=bs, input=list(x.shape[-2:]), threads=torch.get_num_threads(),
               channels=model.cfg.channels, embed_dim=model.cfg.embed_dim, n_codes=model.cfg.n_codes, n_classes=n_classes,
               params_M=round(sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6, 2))
    res['step_s'], res['step_s_median'] = timed(step, steps)
    res['train_img_per_s'] = bs / res['step_s']
    # the quantiser alone, training mode (EMA updates), on this model's encoder outputs
    with torch.no_grad():
        es = model._encode(model._target(inputs))
        for ema in ('sequential', 'batched'):
            model.cfg.ema = ema
            res[f'quantise_{ema}_s'], res[f'quantise_{ema}_s_median'] = timed(lambda: model._quantise(es, cls), 4 * steps)
    model.cfg.ema = 'batched' if variant == 'batched' else 'sequential'
    model.eval()
    with torch.no_grad():
        t_min, t_med = timed(lambda: model.score(inputs, batch, out_size=tuple(x.shape[-2:])), steps)
        res['infer_img_per_s'], res['infer_img_per_s_median'] = bs / t_min, bs / t_med
    res['peak_gb'] = vmhwm_gb()
    print(json.dumps(res))

CASES = [('offline', 4, 'train-mode backbone + model step, per-image EMA (default)'),
         ('offline_batched', 4, 'same, one EMA step per class'),
         ('offline_cached', 4, 'model step on cached features (eval-mode backbone)'),
         ('authors', 3, 'train-mode backbone + model step, per-image EMA (default)'),
         ('authors_batched', 3, 'same, one EMA step per class'),
         ('authors_cached', 3, 'model step on cached features (eval-mode backbone)')]

def main():
    if len(sys.argv) > 1 and sys.argv[1] == '--case': return case(sys.argv[2], int(sys.argv[3]))
    rows = run_cases(__file__, CASES)
    out = dict(machine=dict(platform=platform.platform(), cpus=os.cpu_count(), load_avg=os.getloadavg()), cases=rows)
    d = ROOT/'results'/'benchmarks'; d.mkdir(parents=True, exist_ok=True)
    (d/'hvqtrans.json').write_text(json.dumps(out, indent=1))
    L = ['# HVQ-Trans benchmark (CPU)', '', f"Machine: {out['machine']['platform']}, {out['machine']['cpus']} CPUs, "
         f"{rows[0]['threads']} torch thread(s), load average at the end {tuple(round(x, 2) for x in out['machine']['load_avg'])} "
         "(other jobs shared the CPUs). Each case in a fresh process. 'authors' = tf_efficientnet_b4 at 224 px with random "
         "weights (timing only), the authors' full HVQTransConfig with 15 class copies, batch 16 (their per-GPU batch); "
         "'offline' = tf_efficientnet_lite0 (packaged weights) at 224 px, `small=True`, 5 class copies, batch 16. "
         "A step = forward, backward, clip, AdamW; inference = `score` (reconstruction error + POT) of a batch. "
         "Timings: minimum over repeats (median in brackets).", '',
         '| case | what is timed | batch | trainable params (M) | s/step | train img/s | inference img/s | quantiser per image (s/batch) | quantiser batched (s/batch) | peak RSS (GB) |',
         '|' + '---|' * 10]
    for r in rows:
        L.append(f"| {r['case']} | {r['what']} | {r['batch']} | {r['params_M']} | {r['step_s']:.2f} ({r['step_s_median']:.2f}) | "
                 f"{r['train_img_per_s']:.2f} | {r['infer_img_per_s']:.2f} ({r['infer_img_per_s_median']:.2f}) | "
                 f"{r['quantise_sequential_s']:.3f} ({r['quantise_sequential_s_median']:.3f}) | "
                 f"{r['quantise_batched_s']:.3f} ({r['quantise_batched_s_median']:.3f}) | {r['peak_gb']:.2f} |")
    by = {r['case']: r for r in rows}
    for k in ('offline', 'authors'):
        a, b, c = by[k], by[f'{k}_batched'], by[f'{k}_cached']
        L += ['', f"{k}: the quantiser (5 levels, training mode) takes {a['quantise_sequential_s']:.3f} s per batch with the "
              f"authors' per-image loop and {a['quantise_batched_s']:.3f} s batched by class (ratio "
              f"{a['quantise_sequential_s'] / a['quantise_batched_s']:.2f}), {100 * a['quantise_sequential_s'] / a['step_s']:.1f} % "
              f"of a training step; whole steps {a['step_s']:.2f} s (per image) vs {b['step_s']:.2f} s (batched). "
              f"The cached (eval-mode backbone) step takes {c['step_s']:.2f} s, {c['step_s'] / a['step_s']:.2f} of the "
              f"faithful step with the train-mode backbone; inference {c['infer_img_per_s'] / a['infer_img_per_s']:.2f}x "
              f"as many images per second without the backbone."]
    L += ['', "On a CPU the per-image loop costs about what the per-class calls cost (16 images of 15 classes make ~11 calls "
          "per level instead of 16); the loop's cost on a GPU (a kernel launch and a host sync per image and level) is "
          "not measured here."]
    (d/'hvqtrans.md').write_text('\n'.join(L) + '\n'); print('\n'.join(L))

if __name__ == '__main__': main()
