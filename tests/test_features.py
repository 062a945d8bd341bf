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
            return SimpleNamespace(image=img, mask=torch.zeros(1, size, size), label=i % 2, cls_index=0,
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
