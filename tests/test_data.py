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
    with pytest.raises(DatasetError, match="000.png"): AnomalyDataset(r, "train", verbose=False)   # at load
    ds = AnomalyDataset(r, "train", verbose=False, check_files=False)
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


# ---- issue 8: every bad input caught (each test fails without its fix) ----

SMALL = dict(classes=["bar", "leather"], n_train=2, n_test_good=2, n_test_bad=2, size=64)

def _warns(fn):
    "Run `fn`, return (result, list of warning messages)."
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always"); out = fn()
    return out, [str(x.message) for x in w]

@pytest.mark.parametrize("keep", ["good", "defective"])
def test_single_label_test_class_fails_at_load(tmp_path, keep):
    r = make_synthetic(tmp_path / "d", **SMALL)
    t = r / "leather/test"
    for d in t.iterdir():
        if (d.name == "good") == (keep == "defective"): shutil.rmtree(d)
    if keep == "good": shutil.rmtree(r / "leather/ground_truth")   # else its masks without images are the error
    want = "2 good and 0 defective" if keep == "good" else "0 good and 2 defective"
    with pytest.raises(DatasetError, match=f"class 'leather'.*{want}"): AnomalyDataset(r, "test", verbose=False)
    AnomalyDataset(r, "train", verbose=False)  # the training split is normal-only by design: fine
    assert AnomalyDataset(r, "test", ["bar"], verbose=False).classes == ["bar"]

def test_single_label_visa_csv(tmp_path):
    r = make_synthetic(tmp_path / "c", layout="visa_csv", **SMALL)
    f = r / "split_csv/1cls.csv"
    f.write_text("".join(l for l in f.read_text().splitlines(True) if not ("leather" in l and ",test,normal," in l)))
    with pytest.raises(DatasetError, match="class 'leather'.*0 good and 2 defective"): AnomalyDataset(r, "test", verbose=False)

def test_16bit_greyscale_rescaled(tmp_path):
    from vqflow_nb.data import open_image
    r = make_synthetic(tmp_path / "d", **SMALL)
    p = r / "bar/train/good/000.png"
    a16 = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    Image.fromarray(a16).save(p)
    assert Image.open(p).mode == "I;16"
    s = AnomalyDataset(r, "train", image_size=None, verbose=False)[0]
    want = torch.from_numpy(a16 / 65535.).float()
    assert (s.image - want).abs().max() <= 0.5 / 255 + 1e-6  # 8-bit rounding only
    assert s.image[0].equal(s.image[2])
    # mode I (32-bit integers, e.g. a TIFF): the 16-bit range when the values fit it, else a clear error
    q = tmp_path / "i32.tif"; Image.fromarray(a16.astype(np.int32)).save(q); assert Image.open(q).mode == "I"
    assert np.abs(np.asarray(open_image(q))[..., 0] / 255 - a16 / 65535).max() <= 0.5 / 255 + 1e-6
    Image.fromarray(a16.astype(np.int32) * 4).save(q)
    with pytest.raises(DatasetError, match="i32.tif"): open_image(q)

def test_jpeg_mask_half_range_and_warns(tmp_path):
    from vqflow_nb.data import open_mask
    truth = np.zeros((64, 64), bool); truth[20:29, 17:25] = True; truth[29, 18:21] = True  # 75 px, off the 8x8 grid
    f = tmp_path / "m.jpg"; Image.fromarray(truth.astype(np.uint8) * 255).save(f, quality=75)
    assert (np.asarray(Image.open(f)) != 0).sum() > 1.5 * truth.sum()  # what `!= 0` would read
    m, w = _warns(lambda: open_mask(f))
    assert (m ^ truth).sum() <= 3 and any("m.jpg" in x and "JPEG" in x for x in w)
    g = tmp_path / "m.png"; Image.fromarray(truth.astype(np.uint8)).save(g)  # lossless: any non-zero value counts
    m, w = _warns(lambda: open_mask(g))
    assert (m == truth).all() and not w
    # in a dataset: one counted warning at load, not one per sample
    r = make_synthetic(tmp_path / "d", **SMALL)
    for mp in sorted((r / "bar/ground_truth").rglob("*_mask.png")):
        Image.open(mp).save(mp.with_suffix(".jpg"), quality=75); mp.unlink()
    ds, w = _warns(lambda: AnomalyDataset(r, "test", image_size=None, verbose=False))
    assert sum("JPEG" in x for x in w) == 1 and any("2 masks" in x for x in w)
    _, w = _warns(lambda: [ds[i] for i in range(len(ds))])
    assert not [x for x in w if "JPEG" in x]

def test_empty_mask_of_defect_image_is_an_error(tmp_path):
    r = make_synthetic(tmp_path / "d", **SMALL)
    mp = sorted((r / "leather/ground_truth").rglob("*_mask.png"))[0]
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(mp)
    ds = AnomalyDataset(r, "test", verbose=False)
    i = [x.mask_path for x in ds.records].index(mp)
    with pytest.raises(DatasetError, match=f"{mp.name}.*empty"): ds[i]

def _csv(tmp_path, name="c"):
    r = make_synthetic(tmp_path / name, layout="visa_csv", **SMALL)
    f = r / "split_csv/1cls.csv"
    return r, f, f.read_text().splitlines()

def test_visa_csv_split_values(tmp_path):
    r, f, rows = _csv(tmp_path)
    i = next(k for k, l in enumerate(rows) if ",test," in l)
    f.write_text("\n".join(rows[:i] + [rows[i].replace(",test,", ",Test,")] + rows[i + 1:]))
    te, w = _warns(lambda: scan_visa_csv(r, "test"))
    assert len(te) == 8 and any("'Test'" in x and f"line {i + 1}" in x for x in w)  # normalised, with a warning
    f.write_text("\n".join(rows[:i] + [rows[i].replace(",test,", ",test ,")] + rows[i + 1:]))
    assert len(_warns(lambda: scan_visa_csv(r, "test"))[0]) == 8
    f.write_text("\n".join(rows[:i] + [rows[i].replace(",test,", ",val,")] + rows[i + 1:]))
    with pytest.raises(DatasetError, match=f"1cls.csv, line {i + 1}.*'val'"): scan_visa_csv(r, "test")

def test_visa_csv_duplicates(tmp_path):
    r, f, rows = _csv(tmp_path)
    i = next(k for k, l in enumerate(rows) if ",test,anomaly," in l)
    f.write_text("\n".join(rows + [rows[i]]))
    with pytest.raises(DatasetError, match=f"twice.*lines {i + 1} and {len(rows) + 1}"): scan_visa_csv(r, "test")
    j = next(k for k, l in enumerate(rows) if ",test,normal," in l)
    f.write_text("\n".join(rows + [rows[j].replace(",test,", ",train,")]))
    with pytest.raises(DatasetError, match="both train.*and test"): scan_visa_csv(r, "train")

def test_visa_csv_malformed_rows(tmp_path):
    r, f, rows = _csv(tmp_path)
    f.write_text("\n".join(rows[:3] + [rows[3] + ",extra"] + rows[4:]))
    with pytest.raises(DatasetError, match=r"1cls.csv, line 4: 6 cells"): scan_visa_csv(r, "train")
    c = rows[3].split(","); c[3] = ""
    f.write_text("\n".join(rows[:3] + [",".join(c)] + rows[4:]))
    with pytest.raises(DatasetError, match=r"1cls.csv, line 4: empty image cell"): scan_visa_csv(r, "train")

def test_mask_extensions_any_case(tmp_path):
    r = make_synthetic(tmp_path / "d", **SMALL)
    d = next(x for x in sorted((r / "bar/test").iterdir()) if x.name != "good")  # a defect folder
    img = sorted(d.iterdir())[0]; mp = r / "bar/ground_truth" / d.name / f"{img.stem}_mask.png"
    Image.open(img).save(img.with_suffix(".jpeg"), quality=95); img.unlink()
    Image.open(mp).save(mp.with_suffix(".TIF")); mp.unlink()
    te = scan_mvtec(r, "test", ["bar"])
    assert {x.path.name: x.mask_path.name for x in te if x.label}[f"{img.stem}.jpeg"] == f"{img.stem}_mask.TIF"
    mp.with_suffix(".TIF").unlink()
    with pytest.raises(DatasetError, match=rf"{img.stem}_mask\.<ext> or {img.stem}\.<ext>.*any case"): scan_mvtec(r, "test")

def test_symlinked_class_folder_refused(tmp_path):
    r = make_synthetic(tmp_path / "d", **SMALL)
    (r / "bar_copy").symlink_to(r / "bar", target_is_directory=True)
    with pytest.raises(DatasetError, match="bar_copy.*same folder"): scan_mvtec(r, "train")
    with pytest.raises(DatasetError, match="same folder"): AnomalyDataset(r, "test", ["bar", "bar_copy"], verbose=False)
    assert len(scan_mvtec(r, "train", ["bar_copy", "leather"])) == 4  # one name per folder is fine
    # class folders that are all links to data elsewhere are fine
    s = tmp_path / "links"; s.mkdir()
    for c in ("bar", "leather"): (s / c).symlink_to(r / c, target_is_directory=True)
    assert len(scan_mvtec(s, "train")) == 4
    # a defect folder linked to another one duplicates its images too
    (r / "bar_copy").unlink()
    d = next(x.name for x in sorted((r / "leather/test").iterdir()) if x.name != "good")
    for sub in ("test", "ground_truth"):
        (r / "leather" / sub / "dup").symlink_to(r / "leather" / sub / d, target_is_directory=True)
    with pytest.raises(DatasetError, match="twice"): scan_mvtec(r, "test")


# ---- issue 20, defect 6: readers that lost data or failures silently ----

def _png16(a, path):
    "Write a uint16 (H,W,3) array as a 16-bit RGB PNG (Pillow cannot)."
    import struct, zlib
    h, w, _ = a.shape
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xffffffff)
    raw = b"".join(b"\0" + a[i].astype(">u2").tobytes() for i in range(h))
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

def test_masks_without_test_folder_are_an_error(tmp_path):
    r = make_synthetic(tmp_path / "d", **SMALL)
    (t,) = [d for d in (r / "bar/test").iterdir() if d.name != "good"][:1]
    assert (r / "bar/ground_truth" / t.name).is_dir()
    shutil.rmtree(t)   # the type's images gone, its masks still there
    with pytest.raises(DatasetError, match=rf"defect type\(s\) \['{t.name}'\].*ground_truth/{t.name}.*no test folder"):
        AnomalyDataset(r, "test", verbose=False)

def test_realiad_misspelt_normal_label_is_named(tmp_path):
    import json
    from vqflow_nb.synthetic import write_fixture
    root = write_fixture(tmp_path / "riad", "realiad")
    f = root / "realiad_jsons/realiad_jsons/pcb.json"; d = json.loads(f.read_text())
    i = next(k for k, e in enumerate(d["test"]) if e["anomaly_class"] == "OK")
    d["test"][i]["anomaly_class"] = "ok"; f.write_text(json.dumps(d))
    with pytest.raises(DatasetError, match=rf"pcb.json \(test\[{i}\]\): anomaly_class 'ok' .* not the normal label 'OK'"):
        scan_dataset(root, "test")

def test_16bit_rgb_mask_with_small_values(tmp_path):
    r = make_synthetic(tmp_path / "d", **SMALL)
    mp = sorted((r / "leather/ground_truth").rglob("*_mask.png"))[0]
    truth = np.asarray(Image.open(mp)) > 0
    _png16(np.repeat(truth[..., None].astype(np.uint16), 3, -1) * np.array([3, 0, 1], np.uint16), mp)  # values 0..3
    assert not np.asarray(Image.open(mp)).any()                     # what Pillow alone reads: empty
    ds = AnomalyDataset(r, "test", image_size=None, verbose=False)
    i = [x.mask_path for x in ds.records].index(mp)
    assert ds[i].mask[0].numpy().astype(bool).tolist() == truth.tolist()
    g = tmp_path / "g16.png"; Image.fromarray(truth.astype(np.uint16) * 2).save(g)   # 16-bit greyscale: values kept
    from vqflow_nb.data import open_mask
    assert (open_mask(g) == truth).all()

def test_12bit_data_in_16bit_files_rescaled_with_warning(tmp_path):
    from vqflow_nb.data import open_image
    a12 = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    for name, write in (("g12.png", lambda p: Image.fromarray(a12).save(p)),
                        ("rgb12.png", lambda p: _png16(np.repeat(a12[..., None], 3, -1), p))):
        d = tmp_path / name[:-4]; d.mkdir(); p = d / name; write(p)
        x, w = _warns(lambda: np.asarray(open_image(p)))
        assert np.abs(x[..., 0] / 255 - a12 / 4095).max() <= 0.51 / 255, name
        assert any(name in m and "12-bit" in m for m in w), w

def test_rgba_alpha_dropped_and_warned_once(tmp_path):
    r = make_synthetic(tmp_path / "d", **SMALL)
    ps = sorted((r / "bar/train/good").glob("*.png"))[:2]
    want = [np.asarray(Image.open(p).convert("RGB")) for p in ps]
    for p, a in zip(ps, want):
        Image.fromarray(np.dstack([a, np.zeros(a.shape[:2], np.uint8)]), "RGBA").save(p)   # fully transparent
    ds, w = _warns(lambda: AnomalyDataset(r, "train", image_size=None, verbose=False))
    assert [m for m in w if "alpha" in m] and len([m for m in w if "alpha" in m]) == 1 and "2 images" in w[0] + "".join(w)
    for p, a in zip(ps, want):
        i = [x.path for x in ds.records].index(p)
        assert np.array_equal((ds[i].image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), a)

@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image_fails_at_load(tmp_path, ext):
    r = make_synthetic(tmp_path / "d", **SMALL)
    p = sorted((r / "leather/test/good").glob("*.png"))[0]
    if ext == "jpg":
        q = p.with_suffix(".jpg"); Image.open(p).convert("RGB").save(q, quality=90); p.unlink(); p = q
    p.write_bytes(p.read_bytes()[: p.stat().st_size * 2 // 3])
    with pytest.raises(DatasetError, match=rf"{p.name} is truncated"):
        AnomalyDataset(r, "test", verbose=False)
