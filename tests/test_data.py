"Fast tests of the installed vqflow_nb.synthetic and vqflow_nb.data."
import hashlib, shutil, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from vqflow_nb.synthetic import make_synthetic, synth_image, SYNTH_CLASSES, SYNTH_DEFECTS
from vqflow_nb.data import (AnomalyDataset, DatasetError, collate_samples, detect_format, scan_dataset,
                            scan_mvtec, scan_visa_csv, MVTEC_CLASSES, VISA_CLASSES)

KW = dict(classes=["bar", "leather"], n_train=3, n_test_good=2, n_test_bad=4, size=64)

def _digest(root):
    h = hashlib.sha1()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file(): h.update(str(p.relative_to(root)).encode()); h.update(p.read_bytes())
    return h.hexdigest()

@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    t = tmp_path_factory.mktemp("synth")
    return {l: make_synthetic(t / l, layout=l, **KW) for l in ("mvtec", "visa_mvtec", "visa_csv")}

def test_constants():
    assert len(MVTEC_CLASSES) == 15 and len(VISA_CLASSES) == 12 and len(SYNTH_CLASSES) >= 5

def test_synthetic_deterministic(tmp_path):
    a, b, c = (make_synthetic(tmp_path / n, seed=s, **KW) for n, s in [("a", 0), ("b", 0), ("c", 3)])
    assert _digest(a) == _digest(b) != _digest(c)
    mt = (a / "synthetic.json").stat().st_mtime_ns
    make_synthetic(a, seed=0, **KW)  # complete build with the same parameters: skipped
    assert (a / "synthetic.json").stat().st_mtime_ns == mt
    with pytest.raises(ValueError, match="different synthetic build"): make_synthetic(a, seed=1, **KW)

def test_synthetic_masks_exact():
    for c in SYNTH_CLASSES:
        x0, m0 = synth_image(c, np.random.default_rng(5), 96)
        assert not m0.any()
        for k in SYNTH_DEFECTS[c]:
            x, m = synth_image(c, np.random.default_rng(5), 96, k)
            changed = (x != x0).any(-1)
            assert m.any() and not (changed & ~m).any() and changed[m].mean() > 0.9

def test_synthetic_classes_differ():
    mean = {c: np.stack([synth_image(c, np.random.default_rng(i), 64)[0].reshape(-1, 3).mean(0) for i in range(4)])
            for c in SYNTH_CLASSES}
    cent = {c: v.mean(0) for c, v in mean.items()}
    for c, v in mean.items():  # every image is closest to its own class's mean colour
        for f in v: assert min(cent, key=lambda k: np.linalg.norm(cent[k] - f)) == c

def test_layouts_read_alike(roots):
    assert [detect_format(r) for r in roots.values()] == ["mvtec", "mvtec", "visa_csv"]
    for l, r in roots.items():
        assert len(scan_dataset(r, "train")) == 6
        te = scan_dataset(r, "test")
        assert len(te) == 12 and sum(x.label for x in te) == 8
        assert all((x.mask_path is None) == (x.label == 0) for x in te)
    assert {x.defect for x in scan_mvtec(roots["mvtec"], "test", ["bar"])} == {"good", *SYNTH_DEFECTS["bar"]}
    assert {x.defect for x in scan_visa_csv(roots["visa_csv"], "test")} == {"good", "bad"}

def test_dataset_samples(roots):
    sums = []
    for l, r in roots.items():
        ds = AnomalyDataset(r, "test", image_size=32, verbose=False)
        assert ds.classes == ["bar", "leather"] and ds.class_index == {"bar": 0, "leather": 1}
        b = collate_samples([ds[i] for i in range(len(ds))])
        assert b["image"].shape == (12, 3, 32, 32) and b["image"].dtype == torch.float32
        assert 0 <= b["image"].min() and b["image"].max() <= 1
        assert set(b["mask"].unique().tolist()) == {0.0, 1.0}
        assert ((b["mask"].flatten(1).amax(1) > 0).long() == b["label"]).all()
        assert b["has_mask"].all() and b["cls_index"].tolist() == [ds.class_index[c] for c in b["cls_name"]]
        sums.append(b["mask"].sum().item())
        c = ds.counts()
        assert c["train_good"].tolist() == [3, 3] and c["test_defective"].tolist() == [4, 4]
    assert sums[1] == sums[2]  # VisA converted (0/255) and original (small values) binarise alike

def test_bad_inputs(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"): AnomalyDataset(tmp_path / "none", verbose=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="cannot tell the layout"): AnomalyDataset(tmp_path / "empty", verbose=False)
    r = make_synthetic(tmp_path / "b", **KW)
    with pytest.raises(DatasetError, match="class folder"): scan_mvtec(r, "train", ["cable"])
    p = r / "bar/train/good/000.png"; p.write_bytes(b"garbage")
    ds = AnomalyDataset(r, "train", verbose=False)
    with pytest.raises(DatasetError, match="000.png"): ds[0]
    m = next((r / "leather/ground_truth").rglob("*_mask.png"))
    Image.fromarray(np.zeros((64, 32), np.uint8)).save(m)
    ds = AnomalyDataset(r, "test", verbose=False)
    with pytest.raises(DatasetError, match="aspect ratio"): ds[[x.mask_path for x in ds.records].index(m)]
    m.unlink()
    with pytest.raises(DatasetError, match="no mask for defect image"): scan_mvtec(r, "test")
    shutil.rmtree(r / "leather/ground_truth")  # now image-level only: fine
    ds = AnomalyDataset(r, "test", verbose=False)
    assert ds.has_masks == {"bar": True, "leather": False} and ds.counts().loc["leather", "masks"] == "image-level only"
    shutil.rmtree(r / "leather/train/good")
    with pytest.raises(DatasetError, match="has no train/good"): scan_mvtec(r, "train")
