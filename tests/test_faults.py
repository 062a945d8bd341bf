"""Faults and reproducibility: resuming with random re-assignment, and SIGKILL in the middle of training and of writing
the feature cache. Each rerun must resume, lose nothing, and give the numbers of an uninterrupted run."""
import json, os, signal, subprocess, sys, textwrap, time
from pathlib import Path

import numpy as np
import pytest
import torch

from vqflow_nb import train
from vqflow_nb.train import fit
from vqflow_nb.vqflow import VQFlow, VQFlowConfig

ROOT = Path(__file__).resolve().parents[1]

class _Feats(torch.utils.data.Dataset):
    "Random 4-stage features with two 'classes' of different means (what VQ-Flow's codebooks see)."
    classes = ['a', 'b']
    def __init__(self, n, anomalous=False, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = [torch.randn(n, c, s, s, generator=g) for c, s in ((8, 16), (8, 8), (8, 4), (16, 2))]
        for x in self.x: x[n // 2:] += 2.0
        self.y = torch.zeros(n, dtype=torch.long)
        self.m = torch.zeros(n, 1, 32, 32)
        if anomalous:
            for i in range(0, n, 2): self.x[0][i, :, 4:8, 4:8] += 5; self.y[i] = 1; self.m[i, :, 8:16, 8:16] = 1
    def __len__(self): return len(self.y)
    def __getitem__(self, i):
        return dict(feats=[x[i] for x in self.x], label=self.y[i], cls_index=torch.tensor(int(i >= len(self.y) // 2)),
                    mask=self.m[i], has_mask=torch.tensor(True), index=torch.tensor(i))

def _model():
    torch.manual_seed(0)   # the same initial weights in every run (run_experiment seeds before building too)
    cfg = VQFlowConfig.small([8, 8, 8, 16], depths=(1, 1, 1), k_cpc=8, k_cspc=8, reassign=True, seed=0)
    return VQFlow(cfg)

def _fit(out_dir=None, max_epochs=None):
    torch.set_num_threads(1)
    m = _model()
    r = fit(m, _Feats(16, seed=1), _Feats(8, True, seed=2), seed=3, out_dir=out_dir, progress=False, max_epochs=max_epochs,
            epochs=4, batch_size=4, lr=1e-3, eval_every=2, warmup_epochs=0)
    return m, r

def test_resume_with_reassignment_is_bit_identical(tmp_path, monkeypatch):
    "Dead-code re-assignment draws random numbers after every epoch: resuming must restore the RNG to match."
    full_m, full = _fit()
    _fit(tmp_path/'a', max_epochs=2)
    m, res = _fit(tmp_path/'a')
    for (k, v), (_, w) in zip(full_m.state_dict().items(), m.state_dict().items()): assert torch.equal(v, w), k
    assert [h['loss'] for h in res.history] == [h['loss'] for h in full.history]
    assert (res.last.values == full.last.values).all()
    # the test can fail: without the RNG restore the resumed run takes other codes
    monkeypatch.setattr(train, '_set_rng_state', lambda s: None)
    _fit(tmp_path/'b', max_epochs=2)
    m2, _ = _fit(tmp_path/'b')
    assert any(not torch.equal(v, w) for v, w in zip(full_m.state_dict().values(), m2.state_dict().values()))

_RUN = '''
import sys, json, torch
from pathlib import Path
from vqflow_nb.run import run_experiment, synthetic_root
torch.set_num_threads(1)
run = run_experiment('synthetic', data_root=str(synthetic_root()), classes=['bottle', 'stripes'], image_size=128, epochs={epochs}, batch_size=4,
                     eval_every=2, lr=1e-3, out_dir=sys.argv[1], cache_dir=sys.argv[2], progress=False)
print('DONE')
'''

def _spawn(code, *args):
    env = dict(os.environ, OMP_NUM_THREADS='1', VQFLOW_THREADS='1', PYTHONWARNINGS='ignore')
    return subprocess.Popen([sys.executable, '-c', code, *map(str, args)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

def _kill_when(proc, cond, timeout=300):
    t = time.time()
    while not cond():
        if proc.poll() is not None: raise AssertionError(f'finished before the kill point:\n{proc.stdout.read()[-3000:]}')
        if time.time() - t > timeout: proc.kill(); raise AssertionError('kill point never reached')
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL); proc.wait()

def _finish(proc):
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and 'DONE' in out, out[-3000:]
    return out

def test_sigkill_mid_training_resumes(tmp_path):
    cache, code = tmp_path/'cache', _RUN.format(epochs=6)
    _finish(_spawn(code, tmp_path/'full', cache))                      # uninterrupted (also fills the feature cache)
    ckpt = tmp_path/'killed'/'checkpoints'/'last.pt'
    p = _spawn(code, tmp_path/'killed', cache)
    # kill after at least one checkpoint, while a later epoch is being trained
    _kill_when(p, lambda: ckpt.exists() and torch.load(ckpt, weights_only=False)['epoch'] >= 1)
    assert not (tmp_path/'killed'/'metrics.json').exists()
    before = torch.load(ckpt, weights_only=False)['history']          # what the killed run had finished
    _finish(_spawn(code, tmp_path/'killed', cache))
    import pandas as pd                                                 # resumed, not restarted: those epochs' timings are kept
    assert pd.read_csv(tmp_path/'killed'/'history.csv')['seconds'][:len(before)].tolist() == [h['seconds'] for h in before]
    a, b = (json.loads((tmp_path/d/'metrics.json').read_text()) for d in ('full', 'killed'))
    assert a['last'] == b['last'] and a['best'] == b['best']
    ha, hb = ((tmp_path/d/'history.csv').read_text() for d in ('full', 'killed'))
    cols = lambda h: [l.split(',')[:2] + l.split(',')[3:] for l in h.splitlines()]   # all but the seconds column
    assert cols(ha) == cols(hb)

_EXTRACT = '''
import sys, torch
from vqflow_nb.data import AnomalyDataset
from vqflow_nb.features import FeatureExtractor, extract_features
from vqflow_nb.run import synthetic_root
torch.set_num_threads(1)
ds = AnomalyDataset(synthetic_root(), 'train', image_size=128, verbose=False)
ex = FeatureExtractor.from_preset('offline', input_size=128)
_ = ex.shapes   # its probe forward pass, before the count starts
seen = []   # the images this process runs through the backbone: a resumed cache extracts only the rest
ex.backbone.register_forward_hook(lambda m, i, o: seen.append(len(i[0])))
st = extract_features(ds, ex, sys.argv[1], batch_size=2, progress=False)
print('DONE', len(st), 'EXTRACTED', sum(seen))
'''

def test_sigkill_mid_feature_cache_resumes(tmp_path):
    from vqflow_nb.features import FeatureStore
    _finish(_spawn(_EXTRACT, tmp_path/'full'))
    p = _spawn(_EXTRACT, tmp_path/'killed')
    def partway():
        prog = list((tmp_path/'killed').glob('*.partial/progress.json'))
        return bool(prog) and json.loads(prog[0].read_text() or '{"done": 0}')['done'] >= 6
    _kill_when(p, partway)
    assert not [d for d in (tmp_path/'killed').iterdir() if d.is_dir() and not d.name.endswith('.partial')]
    (prog,) = (tmp_path/'killed').glob('*.partial/progress.json')
    done = json.loads(prog.read_text())['done']                        # what the killed process had saved
    out = _finish(_spawn(_EXTRACT, tmp_path/'killed'))
    n, extracted = map(int, out.split('DONE ')[1].split()[::2])
    assert 0 < done < n and extracted == n - done, (done, n, extracted)   # resumed, not restarted
    (fa,), (fb,) = ([d for d in (tmp_path/x).iterdir() if d.is_dir()] for x in ('full', 'killed'))
    a, b = FeatureStore.load(fa), FeatureStore.load(fb)
    assert len(a) == len(b) and a.paths == b.paths
    for x, y in zip(a.feats, b.feats): assert np.array_equal(np.asarray(x), np.asarray(y))
    assert np.array_equal(np.asarray(a.masks), np.asarray(b.masks)) and np.array_equal(a.labels, b.labels)

_RUN_HVQ = '''
import os, sys, signal, torch
from vqflow_nb import train
from vqflow_nb.run import run_experiment, synthetic_root
torch.set_num_threads(1)
kill_at, n = int(sys.argv[3]), [0]          # SIGKILL this process at the start of its kill_at-th training step (0: never)
step = train._step
def counted(*a, **k):
    n[0] += 1
    if n[0] == kill_at: os.kill(os.getpid(), signal.SIGKILL)
    return step(*a, **k)
train._step = counted
run = run_experiment('synthetic', data_root=str(synthetic_root()), classes=['bar', 'bottle', 'stripes'], method='hvqtrans',
                     variant=sys.argv[4], image_size=64, epochs=4, batch_size=4, eval_every=2, lr=1e-3,
                     out_dir=sys.argv[1], cache_dir=sys.argv[2], progress=False)
print('DONE', n[0])
'''

@pytest.mark.parametrize('variant', ['code', 'label_free'])
def test_sigkill_mid_epoch_hvqtrans_resumes_exactly(tmp_path, variant):
    """HVQ-Trans (dropout, drop-connect and train-mode BatchNorm in the backbone, EMA codebooks, AdamW): a run killed in
    the middle of an epoch resumes from the last epoch-end checkpoint and replays that epoch; it must end exactly where
    the uninterrupted run ends (weights, EMA codebooks, BN statistics, optimiser, losses, every evaluation)."""
    cache = tmp_path/'cache'
    out = _finish(_spawn(_RUN_HVQ, tmp_path/'full', cache, 0, variant))
    steps = int(out.split('DONE ')[1].split()[0]); per_epoch = steps // 4
    assert per_epoch >= 3, steps
    kill_at = 2 * per_epoch + per_epoch // 2 + 1          # in the middle of the 3rd epoch
    p = _spawn(_RUN_HVQ, tmp_path/'killed', cache, kill_at, variant); p.wait()
    assert p.returncode == -signal.SIGKILL, p.stdout.read()[-3000:]
    ckpt = torch.load(tmp_path/'killed'/'checkpoints'/'last.pt', weights_only=False)
    assert ckpt['epoch'] == 1 and not (tmp_path/'killed'/'metrics.json').exists()
    _finish(_spawn(_RUN_HVQ, tmp_path/'killed', cache, 0, variant))
    a, b = (torch.load(tmp_path/d/'checkpoints'/'last.pt', weights_only=False) for d in ('full', 'killed'))
    for k in a['model']: assert torch.equal(a['model'][k], b['model'][k]), k
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        for k in sa: assert torch.equal(sa[k], sb[k]), k
    ha, hb = ((tmp_path/d/'history.csv').read_text() for d in ('full', 'killed'))
    cols = lambda h: [l.split(',')[:2] + l.split(',')[3:] for l in h.splitlines()]   # all but the seconds column
    assert cols(ha) == cols(hb)
    ma, mb = (json.loads((tmp_path/d/'metrics.json').read_text()) for d in ('full', 'killed'))
    assert ma['last'] == mb['last'] and ma['best'] == mb['best']
    assert (tmp_path/'full'/'evals.csv').read_text() == (tmp_path/'killed'/'evals.csv').read_text()
