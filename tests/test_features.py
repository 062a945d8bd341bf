"Fast tests of the installed `vqflow_nb.features` (offline weights, presets, cache)."
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vqflow_nb.features import (FeatureExtractor, FeatureStore, build_backbone, extract_features,
                                load_offline_classifier, offline_weights_path)

CATS = {281, 282, 283, 285, 287}  # ImageNet tabby, tiger cat, Persian, Egyptian cat, lynx


@pytest.mark.parametrize('k,size', [(0, 224), (1, 240), (2, 260)])  # native resolutions (timm pretrained_cfg)
def test_offline_weights_are_trained(k, size):
    from skimage import data
    img = torch.from_numpy(data.chelsea()).permute(2, 0, 1).float()[None] / 255
    x = F.interpolate(img, size=(size, size), mode='bilinear', antialias=True, align_corners=False)
    with torch.no_grad():
        top = load_offline_classifier(f'tf_efficientnet_lite{k}')((x - 0.5) / 0.5).topk(3).indices[0].tolist()
    assert CATS.issuperset(top), top


def test_offline_backbone_matches_classifier():
    clf = load_offline_classifier('tf_efficientnet_lite0')
    bb, src = build_backbone('tf_efficientnet_lite0', (1, 2, 3, 4), 'offline')
    assert src['kind'] == 'offline' and src['file'] == 'efficientnet-lite0-57934424.pth'
    ref = clf.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in bb.state_dict().items())


def test_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match='no such file'):
        build_backbone('tf_efficientnet_lite0', (1,), str(tmp_path / 'missing.pth'))
    with pytest.raises(ValueError, match='only for'):
        offline_weights_path('resnet50')
    with pytest.raises(KeyError, match='unknown preset'):
        FeatureExtractor.from_preset('nope')


@pytest.mark.parametrize('name,size,channels,strides,shapes', [
    ('offline', 64, [24, 40, 112, 320], [4, 8, 16, 32], [(24, 16, 16), (40, 8, 8), (112, 4, 4), (320, 2, 2)]),
    ('hvqtrans', 64, [272], [16], [(272, 4, 4)]),
])
def test_presets(name, size, channels, strides, shapes):
    e = FeatureExtractor.from_preset(name, weights='random', input_size=size)
    assert e.channels == channels and e.strides == strides and e.shapes == shapes
    assert e.weights_source['kind'] == 'random'


def test_hgad_pyramid():
    e = FeatureExtractor.from_preset('hgad', weights='random', input_size=128)
    assert e.pyramid == (128, 64, 32) and e.channels == [200] * 3 and e.strides == [16, 32, 64]
    assert [tuple(f.shape) for f in e(torch.rand(1, 3, 128, 128))] == [(1, 200, 8, 8), (1, 200, 4, 4), (1, 200, 2, 2)]


def _dataset(root, n=6, size=32):
    from PIL import Image
    rng = np.random.default_rng(0); root.mkdir(parents=True, exist_ok=True); recs = []
    for k in range(n):
        p = root / f'{k}.png'; Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(p)
        recs.append(SimpleNamespace(path=p, mask_path=None))
    class DS:
        records = recs
        def __len__(self): return n
        def __getitem__(self, i):
            img = torch.from_numpy(np.array(Image.open(recs[i].path))).permute(2, 0, 1).float() / 255
            return SimpleNamespace(image=img, mask=torch.zeros(1, size, size), label=i % 2, cls_index=0, cls_name='a',
                                   path=str(recs[i].path), has_mask=False)
    return DS()


def test_cache_hit_resume_and_equality(tmp_path):
    ds = _dataset(tmp_path / 'data')
    ex = FeatureExtractor('tf_efficientnet_lite0', (2,), input_size=32, weights='offline')
    _ = ex.shapes
    calls = []
    def hook(*a):
        calls.append(1)
        if len(calls) == 2: raise KeyboardInterrupt
    h = ex.backbone.register_forward_hook(hook)
    with pytest.raises(KeyboardInterrupt):
        extract_features(ds, ex, cache_dir=tmp_path / 'c', batch_size=2, progress=False)
    (part,) = [p for p in (tmp_path / 'c').iterdir() if not p.name.startswith('.')]  # skip the .lock file
    assert part.name.endswith('.partial') and json.loads((part / 'progress.json').read_text())['done'] == 2
    st = extract_features(ds, ex, cache_dir=tmp_path / 'c', batch_size=2, progress=False)
    assert len(calls) == 2 + 2  # resumed: only samples 2-5 extracted
    st2 = extract_features(ds, ex, cache_dir=tmp_path / 'c', batch_size=2, progress=False)
    assert len(calls) == 4 and st2.root == st.root  # cache hit, no backbone call
    h.remove()
    fresh = ex(torch.stack([ds[i].image for i in range(len(ds))]))[0].numpy()
    np.testing.assert_allclose(np.asarray(st.feats[0], dtype=np.float32), fresh, atol=2e-2, rtol=1e-2)
    item = st[3]
    assert item['label'] == 1 and item['feats'][0].dtype == torch.float32 and item['mask'].shape == (1, 32, 32)
    ex2 = FeatureExtractor('tf_efficientnet_lite0', (3,), input_size=32, weights='offline')
    st3 = extract_features(ds, ex2, cache_dir=tmp_path / 'c', batch_size=3, progress=False)
    assert st3.root != st.root and st.root.exists()
    assert isinstance(FeatureStore.load(st.root), FeatureStore)


# ---- issue 8: bad weights arguments and the embedded offline presets ----

def test_bad_checkpoint_files(tmp_path):
    empty = tmp_path / 'empty.pth'; empty.write_bytes(b'')
    with pytest.raises(ValueError, match=r'empty\.pth.*empty \(0 bytes\)'):
        build_backbone('tf_efficientnet_lite0', (1,), str(empty))
    junk = tmp_path / 'junk.pth'; junk.write_bytes(b'this is not a checkpoint' * 10)
    with pytest.raises(ValueError, match=r'cannot read checkpoint .*junk\.pth'):
        build_backbone('tf_efficientnet_lite0', (1,), str(junk))
    cut = tmp_path / 'cut.pth'; cut.write_bytes(offline_weights_path().read_bytes()[:100_000])  # interrupted copy
    with pytest.raises(ValueError, match=r'cannot read checkpoint .*cut\.pth'):
        build_backbone('tf_efficientnet_lite0', (1,), str(cut))


def test_weights_none_means_default(monkeypatch):
    import vqflow_nb.features as fm
    assert FeatureExtractor.from_preset('offline', weights=None, input_size=32).weights_source['kind'] == 'offline'
    monkeypatch.setitem(fm.PRESETS, 'tiny_random', dict(backbone='tf_efficientnet_lite0', out_indices=(2,),
                                                        input_size=32, weights='random', norm='inception'))
    assert FeatureExtractor.from_preset('tiny_random', weights=None).weights_source['kind'] == 'random'  # the preset's
    assert FeatureExtractor(out_indices=(2,), input_size=32, weights=None).weights_source['kind'] == 'offline'
    assert build_backbone('tf_efficientnet_lite0', (2,), None)[1]['kind'] == 'offline'
    with pytest.raises(TypeError, match="weights must be"):
        build_backbone('tf_efficientnet_lite0', (2,), 3)


@pytest.mark.parametrize('name,stage_ch,stage_strides,shapes', [
    # HGAD's structure: one stride-16 stage on a 3-level image pyramid (here Lite0's 112-ch stage at 512/256/128)
    ('hgad_offline', [112], [16], [(112, 32, 32), (112, 16, 16), (112, 8, 8)]),
    # HVQ-Trans's structure: the stride-2/4/8/16 stages aligned to input/16 and concatenated (16+24+40+112 ch)
    ('hvqtrans_offline', [16, 24, 40, 112], [2, 4, 8, 16], [(192, 14, 14)]),
])
def test_offline_method_presets(name, stage_ch, stage_strides, shapes):
    e = FeatureExtractor.from_preset(name)
    assert e.weights_source['kind'] == 'offline' and e.norm_name == 'inception'
    assert e.stage_channels == stage_ch and e.stage_strides == stage_strides
    assert e.shapes == shapes and [c for c, _, _ in shapes] == e.channels
    x = torch.rand(2, 3, 100, 120)  # any image size: resized to the preset's input
    assert [tuple(f.shape) for f in e(x)] == [(2, *s) for s in shapes]


def test_relabelled_dataset_is_another_cache_key(tmp_path):
    "Labels and has-mask flags are cached with the features, so a relabelling (same files) must change the key."
    from vqflow_nb.features import cache_key, dataset_fingerprint
    ds = _dataset(tmp_path / 'data')
    ex = FeatureExtractor('tf_efficientnet_lite0', (2,), input_size=32, weights='random')
    k0 = cache_key(ds, ex)
    assert cache_key(ds, ex) == k0                                   # deterministic
    for r, lab in zip(ds.records, [0, 1, 0, 1, 0, 1]): r.label = lab  # labelled records: no sample is read
    k1 = cache_key(ds, ex)
    assert k1['dataset']['labels'] == k0['dataset']['labels']        # the same labels the samples report
    ds.records[2].label = 1                                          # relabel one image, move nothing
    k2 = cache_key(ds, ex)
    assert k2['dataset']['files'] == k1['dataset']['files'] and k2 != k1
    ds.has_masks = {'a': False}; k3 = cache_key(ds, ex)
    ds.has_masks = {'a': True}; assert cache_key(ds, ex) != k3       # a class's masks switched on or off
    st = extract_features(ds, ex, cache_dir=tmp_path / 'c', batch_size=3, progress=False)
    assert st.key == cache_key(ds, ex) and json.loads((st.root / 'key.json').read_text())['dataset']['labels'] == k3['dataset']['labels']


def test_same_size_pixel_change_with_restored_mtime_is_a_cache_miss(tmp_path, monkeypatch):
    "Issue 20, defect 1: new pixels in a file of the same size whose mtime was set back (`cp -p`, `rsync -a`, `tar`) must not be served the old features."
    import os, time
    from PIL import Image
    from vqflow_nb import core
    from vqflow_nb.features import cache_key
    monkeypatch.setenv('VQFLOW_DIGEST_MEMO', str(tmp_path / 'memo.json'))
    monkeypatch.setattr(core, '_RACY_S', -1.0)   # remember the digests of these just-written files (the memo is under test too)
    ds = _dataset(tmp_path / 'data')
    rng = np.random.default_rng(1)
    for r in ds.records:   # uncompressed PNGs: the file size depends only on the image size
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(r.path, compress_level=0)
        os.utime(r.path, ns=(10**18, 10**18))
    ex = FeatureExtractor('tf_efficientnet_lite0', (2,), input_size=32, weights='random')
    st = extract_features(ds, ex, cache_dir=tmp_path / 'c', batch_size=3, progress=False)
    p = ds.records[4].path; s0 = p.stat(); time.sleep(0.01)
    Image.fromarray(255 - np.asarray(Image.open(p))).save(p, compress_level=0)   # other pixels, in place
    os.utime(p, ns=(s0.st_atime_ns, s0.st_mtime_ns))
    s1 = p.stat()
    assert (s1.st_size, s1.st_mtime_ns, s1.st_ino) == (s0.st_size, s0.st_mtime_ns, s0.st_ino)
    assert cache_key(ds, ex)['dataset']['files'] != st.key['dataset']['files']
    st2 = extract_features(ds, ex, cache_dir=tmp_path / 'c', batch_size=3, progress=False)
    assert st2.root != st.root                                           # a miss: extracted again
    old, new = (np.asarray(s.feats[0], dtype=np.float32) for s in (st, st2))
    assert not np.allclose(old[4], new[4]) and np.array_equal(old[:4], new[:4])
    core._DIGESTS.clear()                                                # a new process, with only the disk memo
    assert extract_features(ds, ex, cache_dir=tmp_path / 'c', batch_size=3, progress=False).root == st2.root
