"""The readers of the other benchmarks' layouts (BTAD, MPDD, MVTec 3D-AD, MVTec AD 2, Real-IAD, unions), each read from a
fixture written in that layout, and a smoke replication of a union through the MVTec-layout notebook."""
import json, os, shutil, time
from pathlib import Path

import numpy as np
import papermill as pm
import pytest
from PIL import Image

from vqflow_nb.core import project_root
from vqflow_nb.data import (AnomalyDataset, DatasetError, collate_samples, detect_format, scan_dataset, realiad_root,
                            unlabeled_images)
from vqflow_nb.identity import data_fingerprint
from vqflow_nb.run import dataset_name, resolve_data
from vqflow_nb.synthetic import write_fixture, FIXTURE_LAYOUTS

# (train, test good, test defective) per class for write_fixture's defaults (3, 2, 2); Real-IAD counts views (5 per sample,
# views 1-3 of a defective sample show the defect)
EXPECTED = dict(btad=(3, 2, 2), mpdd=(3, 2, 2), mvtec3d=(3, 2, 2), mvtec_ad2=(3, 2, 2), realiad=(15, 10 + 4, 6))
FORMAT = dict(btad="btad", mpdd="mvtec", mvtec3d="mvtec3d", mvtec_ad2="mvtec_ad2", realiad="realiad")

@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    t = tmp_path_factory.mktemp("layouts")
    return {l: write_fixture(t / l, l) for l in FIXTURE_LAYOUTS}

@pytest.mark.parametrize("layout", list(FIXTURE_LAYOUTS))
def test_counts_classes_labels_masks(fx, layout):
    root = fx[layout]
    assert detect_format(root) == FORMAT[layout]
    tr = AnomalyDataset(root, "train", image_size=32, verbose=False)
    te = AnomalyDataset(root, "test", image_size=32, verbose=False, class_index=tr.class_index)
    assert tr.classes == te.classes == sorted(FIXTURE_LAYOUTS[layout])
    c = te.counts()
    n_train, n_good, n_bad = EXPECTED[layout]
    assert c["train_good"].tolist() == [n_train] * len(tr.classes)
    assert c["test_good"].tolist() == [n_good] * len(tr.classes) and c["test_defective"].tolist() == [n_bad] * len(tr.classes)
    assert all(r.label == 0 for r in tr.records) and te.has_masks == {k: True for k in te.classes}
    for r in te.records:   # a defective image's mask marks exactly the pixels the defect changed; a good one has none
        assert (r.mask_path is None) == (r.label == 0), r
        if r.label:
            m = np.asarray(Image.open(r.mask_path)) > 0
            assert 0 < m.mean() < 0.5, r.mask_path
    b = collate_samples([te[i] for i in range(len(te))])
    assert ((b["mask"].flatten(1).amax(1) > 0).long() == b["label"]).all()
    assert b["cls_index"].tolist() == [te.class_index[k] for k in b["cls_name"]]

def test_btad_and_mvtec3d_specifics(fx):
    bad03 = [r for r in scan_dataset(fx["btad"], "test", ["03"]) if r.label]
    assert {r.mask_path.suffix for r in bad03} == {".bmp"} and {r.defect for r in bad03} == {"ko"}
    m3 = scan_dataset(fx["mvtec3d"], "train")
    assert all(r.path.parent.name == "rgb" for r in m3) and len(m3) == 6   # validation/ and xyz/ not read

def test_mvtec_ad2_private_sets_never_evaluated(fx):
    with pytest.raises(DatasetError, match="benchmark server"): scan_dataset(fx["mvtec_ad2"], "test_private")
    with pytest.raises(DatasetError, match="benchmark server"): scan_dataset(fx["mvtec_ad2"], "test_private_mixed")
    test = scan_dataset(fx["mvtec_ad2"], "test")
    assert not any("test_private" in str(r.path) for r in test)
    assert {c: {s: len(v) for s, v in d.items()} for c, d in unlabeled_images(fx["mvtec_ad2"]).items()} == \
           {c: dict(test_private=3, test_private_mixed=2) for c in ("can", "fabric")}

def test_realiad_json_drives_split_and_labels(fx):
    root = fx["realiad"]
    sv = realiad_root(root / "realiad_jsons" / "realiad_jsons_sv")
    assert len(scan_dataset(sv, "train")) == 2 * 3 and len(scan_dataset(sv, "test")) == 2 * 4
    te = scan_dataset(root, "test")
    ng_folder_ok = [r for r in te if "/NG/" in r.path.as_posix() and r.label == 0]
    assert len(ng_folder_ok) == 2 * 2 * 2   # views 4, 5 of 2 defective samples per class: normal, as the JSON says
    assert {r.defect for r in te if r.label} <= {"AK", "BX", "CH", "HS", "PS", "QS", "YW", "ZW"}

def test_realiad_json_naming_missing_file(fx, tmp_path):
    root = shutil.copytree(fx["realiad"], tmp_path / "riad")
    f = root / "realiad_jsons/realiad_jsons/pcb.json"; d = json.loads(f.read_text())
    d["train"][2]["image_path"] = "OK/S0042/gone.jpg"; f.write_text(json.dumps(d))
    with pytest.raises(DatasetError, match=r"gone.jpg listed in .*pcb.json \(train\[2\]\) does not exist"):
        scan_dataset(root, "train")

def test_fingerprint_covers_split_files(fx, tmp_path):
    root = shutil.copytree(fx["realiad"], tmp_path / "riad")
    f = root / "realiad_jsons/realiad_jsons/audiojack.json"; d = json.loads(f.read_text())
    f.write_text(json.dumps(d)); size, mtime = f.stat().st_size, f.stat().st_mtime_ns
    fp = data_fingerprint(root)
    d["test"].append(d["train"].pop())   # the same image files, another split: another dataset
    f.write_text(json.dumps(d)); os.utime(f, ns=(mtime, mtime))
    assert f.stat().st_size == size      # the same size and mtime: only the content tells
    assert data_fingerprint(root) != fp
    # a union: its parts' files under the parts' names; the same part alone has the same class subset fingerprint
    u = resolve_data("union", [["btad", str(fx["btad"])], ["mpdd", str(fx["mpdd"])]])
    assert data_fingerprint(u) != data_fingerprint(resolve_data("union", [["mpdd", str(fx["btad"])], ["btad", str(fx["mpdd"])]]))

def test_union_unique_classes(fx):
    u = [["btad", str(fx["btad"])], ["mvtec_3d", str(fx["mvtec3d"])]]
    ds = AnomalyDataset(resolve_data("union", u), "test", image_size=32, verbose=False)
    assert ds.classes == ["btad/01", "btad/02", "btad/03", "mvtec_3d/bagel", "mvtec_3d/cable_gland"]
    assert sorted(ds.class_index.values()) == list(range(5))
    assert dataset_name(u, "mvtec_ad") == "union" and dataset_name(str(fx["mpdd"]), "mvtec_ad") == "mpdd"

def test_union_smoke_replication_through_mvtec_notebook(fx, tmp_path):
    "The MVTec-layout notebook runs a union of two fixture data sets end to end and reports per data set and per class."
    t0 = time.time()
    out = tmp_path / "run"
    pm.execute_notebook(str(project_root() / "nbs/replicate/mvtec_ad.ipynb"), str(tmp_path / "out.ipynb"), kernel_name="python3",
                        parameters=dict(data_root=[["mpdd", str(fx["mpdd"])], ["btad", str(fx["btad"])]], image_size=64,
                                        epochs=2, batch_size=4, eval_every=2, lr=1e-3, out_dir=str(out),
                                        cache_dir=str(tmp_path / "cache")),
                        progress_bar=False, cwd=str(project_root()))
    m = json.loads((out / "metrics.json").read_text())
    assert m["dataset"] == "union" and m["data_root"].startswith("union(mpdd=")
    assert m["classes"] == ["btad/01", "btad/02", "btad/03", "mpdd/bracket_black", "mpdd/connector"]
    assert set(m["last"]["per_class"]) == set(m["classes"])
    text = (tmp_path / "out.ipynb").read_text()
    assert "all classes" in text and "Δ hgad" in text   # the per-data-set table, and HGAD's published BTAD classes
    print(f"union smoke replication: {time.time() - t0:.1f} s")
