"""Benchmark of `vqflow_nb.features`: backbone throughput and cached-feature training vs re-extraction.

Usage (from the repository root):  .venv/bin/python benchmarks/bench_features.py [--threads 2] [--quick]

1. Throughput of the offline preset (tf_efficientnet_lite0 with the packaged ImageNet weights, stages at strides
   4/8/16/32) on CPU at 256x256, batch 16, images/s with channels_last (the extractor's CPU default) and without,
   with 1 and 2 torch threads; one warm-up batch, then the median over timed batches.
2. A training epoch on cached features vs re-extracting the features every epoch, on a synthetic dataset of
   100 training images (vqflow_nb.synthetic: 5 classes x 20, 256x256, read by vqflow_nb.data.AnomalyDataset).
   Stand-in model: one unconditional normalizing flow per scale from vqflow_nb.flows (`conditional_flow`,
   2 AllInOneBlocks with VQ-Flow's conv-LayerNorm subnets) on the three finer stages (24/40/112 channels at
   64/32/16), trained with Adam (lr 1e-4) on the Gaussian NLL, batch 16. Also times the one-off extraction into
   the on-disk cache and a cache hit.
Writes results/benchmarks/features.json and features.md.
"""
from __future__ import annotations
import argparse, json, os, statistics, shutil, tempfile, time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def bench_throughput(batch=16, size=256, n_batches=6, threads=(1, 2)):
    from vqflow_nb.features import FeatureExtractor
    out = dict(rows={})
    x = torch.rand(batch, 3, size, size)
    for th, cl in [(t, c) for t in threads for c in (True, False)]:
        torch.set_num_threads(th)
        ex = FeatureExtractor.from_preset('offline', input_size=size, channels_last=cl)
        ex(x)  # warm-up
        ts, cpu = [], []
        for _ in range(n_batches):
            t, c = time.perf_counter(), time.process_time(); ex(x)
            ts.append(time.perf_counter() - t); cpu.append(time.process_time() - c)
        med = statistics.median(ts)
        # on a shared machine wall time includes waiting for the CPU; CPU seconds / threads bounds the uncontended time
        cpu_med = statistics.median(cpu)
        out['rows'][f"{th} thread{'s' if th > 1 else ''}, {'channels_last' if cl else 'contiguous'}"] = dict(
            threads=th, channels_last=cl, img_per_s=batch / med, img_per_s_best=batch / min(ts),
            s_per_batch_median=med, s_per_batch_min=min(ts), n_batches=n_batches,
            cpu_s_per_batch_median=cpu_med, img_per_s_from_cpu_time=batch / (cpu_med / th))
    out.update(backbone='tf_efficientnet_lite0', weights='offline', input=f'{size}x{size}', batch=batch,
               stages='out_indices (1,2,3,4), strides 4/8/16/32')
    return out


def _flows(channels):
    from vqflow_nb.flows import conditional_flow
    return torch.nn.ModuleList([conditional_flow(c, 0, depth=2, subnet='conv_ln', seed=k) for k, c in enumerate(channels)])


def _nll(flows, feats):
    loss = 0.
    for f, x in zip(flows, feats):
        z, ld = f(x)
        loss = loss + (0.5 * z.pow(2).flatten(1).sum(1) - ld).mean() / x[0].numel()
    return loss


def bench_cached_vs_reextract(n_per_class=20, epochs=2, batch=16, size=256):
    from vqflow_nb.synthetic import make_synthetic, SYNTH_CLASSES
    from vqflow_nb.data import AnomalyDataset, collate_samples
    from vqflow_nb.features import FeatureExtractor, extract_features
    tmp = Path(tempfile.mkdtemp(prefix='bench_features_'))
    try:
        t = time.perf_counter()
        root = make_synthetic(tmp / 'synth', n_train=n_per_class, n_test_good=1, n_test_bad=1, size=size)
        t_data = time.perf_counter() - t
        ds = AnomalyDataset(root, 'train', image_size=size, verbose=False)
        ex = FeatureExtractor.from_preset('offline', input_size=size)
        scales = 3  # the three finer stages, as VQ-Flow's flows use stages 1-3
        t = time.perf_counter()
        store = extract_features(ds, ex, cache_dir=tmp / 'cache', batch_size=batch, progress=False)
        t_extract = time.perf_counter() - t
        t = time.perf_counter(); extract_features(ds, ex, cache_dir=tmp / 'cache', batch_size=batch, progress=False)
        t_hit = time.perf_counter() - t
        cache_mb = sum(p.stat().st_size for p in store.root.iterdir()) / 2**20

        def run(mode):
            torch.manual_seed(0)
            flows = _flows(ex.channels[:scales])
            opt = torch.optim.Adam(flows.parameters(), lr=1e-4)
            g = torch.Generator().manual_seed(0)
            if mode == 'cached':
                dl = torch.utils.data.DataLoader(store, batch_size=batch, shuffle=True, drop_last=True, generator=g)
            else:
                dl = torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, drop_last=True, generator=g,
                                                 collate_fn=collate_samples)
            times, losses = [], []
            for _ in range(epochs):
                t = time.perf_counter(); tot = 0.
                for b in dl:
                    feats = b['feats'][:scales] if mode == 'cached' else ex(b['image'])[:scales]
                    loss = _nll(flows, feats)
                    opt.zero_grad(); loss.backward(); opt.step(); tot += loss.item()
                times.append(time.perf_counter() - t); losses.append(tot / len(dl))
            return dict(epoch_s=times, epoch_s_mean=float(np.mean(times)), mean_loss_per_epoch=losses)

        cached, reext = run('cached'), run('reextract')
        return dict(n_images=len(ds), classes=ds.classes, image_size=size, batch=batch, epochs=epochs,
                    model='vqflow_nb.flows.conditional_flow(C, 0, depth=2, subnet="conv_ln") per scale on stages '
                          'of 24/40/112 ch (64/32/16 px); Adam lr 1e-4; Gaussian NLL per dimension',
                    t_make_synthetic_s=t_data, t_extract_to_cache_s=t_extract, t_cache_hit_s=t_hit, cache_mb=cache_mb,
                    cached=cached, reextract=reext, speedup=reext['epoch_s_mean'] / cached['epoch_s_mean'])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def to_md(res):
    tp, tr = res['throughput'], res['train']
    L = ['# Features benchmark', '',
         f"Machine: {res['env']['platform']}, torch {res['env']['versions'].get('torch')}, "
         f"{os.cpu_count()} CPUs, load average at start {res['loadavg_start']}, at end {res['loadavg_end']}.", '',
         f"## Backbone throughput ({tp['backbone']}, offline weights, {tp['input']}, batch {tp['batch']}, CPU)", '',
         '| torch threads, memory format | images/s (wall, median batch) | images/s (best batch) | s/batch median | CPU s/batch | batch / (CPU s / threads) |',
         '|---|---|---|---|---|---|']
    for k, v in tp['rows'].items():
        L.append(f"| {k} | {v['img_per_s']:.1f} | {v['img_per_s_best']:.1f} | {v['s_per_batch_median']:.3f} | "
                 f"{v['cpu_s_per_batch_median']:.2f} | {v['img_per_s_from_cpu_time']:.1f} |")
    L += ['', 'Wall-clock numbers depend on what else runs on the machine (load average above). A 1-thread run that '
          'gets a whole core is robust to that (wall = CPU time); 2-thread runs on a shared 2-core machine wait for '
          'each other whenever one thread is descheduled, so their wall numbers understate an idle machine.']
    L += ['', f"## Training epoch: cached features vs re-extracting every epoch", '',
          f"torch threads: {tr['threads']}. {tr['n_images']} synthetic training images ({len(tr['classes'])} classes) at {tr['image_size']}x{tr['image_size']}, "
          f"batch {tr['batch']}, {tr['epochs']} epochs each. Model: {tr['model']}.", '',
          '| | s/epoch (mean) | per-epoch s |', '|---|---|---|',
          f"| cached features | {tr['cached']['epoch_s_mean']:.2f} | {', '.join(f'{t:.2f}' for t in tr['cached']['epoch_s'])} |",
          f"| re-extract every epoch | {tr['reextract']['epoch_s_mean']:.2f} | {', '.join(f'{t:.2f}' for t in tr['reextract']['epoch_s'])} |",
          '', f"Speed-up of an epoch from caching: {tr['speedup']:.2f}x. One-off extraction into the cache: "
          f"{tr['t_extract_to_cache_s']:.1f} s ({tr['cache_mb']:.1f} MB on disk, float16); a cache hit: {tr['t_cache_hit_s']:.2f} s.", '']
    return '\n'.join(L)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--threads', type=int, default=2, help='torch threads for the multi-thread throughput rows (default 2)')
    ap.add_argument('--train-threads', type=int, default=1,
                    help='torch threads for the cached-vs-re-extract timing (default 1: robust on a shared machine)')
    ap.add_argument('--quick', action='store_true', help='fewer batches/images (smoke run)')
    a = ap.parse_args()
    from vqflow_nb.core import provenance
    res = dict(loadavg_start=[round(v, 2) for v in os.getloadavg()], env=provenance(device='cpu'))
    res['throughput'] = bench_throughput(n_batches=2 if a.quick else 6, threads=sorted({1, a.threads}))
    print(json.dumps(res['throughput'], indent=1))
    torch.set_num_threads(a.train_threads)
    res['train'] = bench_cached_vs_reextract(n_per_class=4 if a.quick else 20, epochs=1 if a.quick else 2)
    res['train']['threads'] = a.train_threads
    print(json.dumps({k: v for k, v in res['train'].items() if k != 'classes'}, indent=1))
    res['loadavg_end'] = [round(v, 2) for v in os.getloadavg()]
    out = ROOT / 'results' / 'benchmarks'; out.mkdir(parents=True, exist_ok=True)
    from vqflow_nb.core import record
    record(out, 'features', res)
    (out / 'features.md').write_text(to_md(res))
    print(to_md(res))


if __name__ == '__main__':
    main()
