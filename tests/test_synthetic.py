"Fast tests of the installed `vqflow_nb.synthetic`: the frozen default preset and the benchmark preset."
import hashlib, json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqflow_nb.synthetic import (make_synthetic, synth_image, defect_kinds, SYNTH_CLASSES, SYNTH_DEFECTS, BENCH_CLASSES,
                                 BENCH_OBJECTS, BENCH_DEFECTS, DEFECT_DIFFICULTY, SYNTH_PRESETS)
from vqflow_nb.data import AnomalyDataset, scan_mvtec
from vqflow_nb.metrics import defect_kind


def _digest(root):
    h = hashlib.sha1()
    for p in sorted(Path(root).rglob("*")):
        if p.is_file(): h.update(str(p.relative_to(root)).encode()); h.update(p.read_bytes())
    return h.hexdigest()


# sha1 of the written trees before the benchmark preset existed: committed runs were trained on these bytes
FROZEN = {"mvtec": "cc10ebbea67ff0cde15a341366137de328a39b11", "visa_csv": "551d351443427cf392e59e4bbac3d51e38f19589"}


@pytest.mark.parametrize("layout", ["mvtec", "visa_csv"])
def test_default_preset_is_frozen(tmp_path, layout):
    assert _digest(make_synthetic(tmp_path / layout, layout=layout)) == FROZEN[layout]
    man = json.loads((tmp_path / layout / "synthetic.json").read_text())
    assert "preset" not in man  # manifests of existing default builds keep matching


def test_default_small_build_is_frozen(tmp_path):
    kw = dict(classes=["stripes", "bar"], n_train=3, n_test_good=2, n_test_bad=4, size=96, seed=3)
    assert _digest(make_synthetic(tmp_path / "s", **kw)) == "9a5d18d9aa6b76627b373b7c8aaa8e6aa478d71a"


def test_catalogue():
    assert set(SYNTH_CLASSES) < set(BENCH_CLASSES) and len(BENCH_CLASSES) == 10 and len(BENCH_OBJECTS) == 5
    for c in BENCH_CLASSES:
        assert len(BENCH_DEFECTS[c]) == 8 and "cross_class" in BENCH_DEFECTS[c]
        assert ("missing" in BENCH_DEFECTS[c]) == (c in BENCH_OBJECTS) != ("warp" in BENCH_DEFECTS[c])
    for c in SYNTH_CLASSES: assert set(SYNTH_DEFECTS[c]) <= set(defect_kinds(c))
    assert set(DEFECT_DIFFICULTY.values()) == {"easy", "medium", "hard"}


@pytest.mark.parametrize("cls", BENCH_CLASSES)
def test_masks_are_exact(cls):
    "With the photometric variation on, a defect changes exactly its mask (re-drawn with the same seed)."
    x0, m0 = synth_image(cls, np.random.default_rng(7), 96, imaging=True)
    assert not m0.any()
    for k in BENCH_DEFECTS[cls]:
        x, m = synth_image(cls, np.random.default_rng(7), 96, k, imaging=True)
        changed = (x != x0).any(-1)
        assert m.any() and not (changed & ~m).any(), k
        assert changed[m].mean() > 0.9, (k, changed[m].mean())


def test_kinds_on_wrong_class_fail():
    with pytest.raises(ValueError, match="not available"): synth_image("nut", np.random.default_rng(0), 64, "warp")
    with pytest.raises(ValueError, match="not available"): synth_image("tile", np.random.default_rng(0), 64, "missing")
    with pytest.raises(ValueError, match="unknown synthetic class"): synth_image("cat", np.random.default_rng(0), 64)


KB = dict(n_train=2, n_test_good=2, n_test_bad=16, size=64, preset="benchmark")


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    return make_synthetic(tmp_path_factory.mktemp("bench") / "b", **KB)


def test_benchmark_tree(bench):
    man = json.loads((bench / "synthetic.json").read_text())
    assert man["preset"] == "benchmark" and man["classes"] == list(BENCH_CLASSES)
    for c in BENCH_CLASSES:
        for k in BENCH_DEFECTS[c]:
            imgs = sorted((bench / c / "test" / k).glob("*.png"))
            assert [p.name for p in imgs] == ["000.png", "001.png"]  # 16 defective images cycle through the 8 kinds
            for p in imgs:
                m = np.asarray(Image.open(bench / c / "ground_truth" / k / f"{p.stem}_mask.png"))
                assert set(np.unique(m)) == {0, 255}
    # the kind of every test record, from the data reader and from the path, is the folder name
    recs = scan_mvtec(bench, "test", None)
    assert all(r.defect == defect_kind(r.path) for r in recs)
    assert {r.defect for r in recs if r.cls_name == "pill"} == {"good", *BENCH_DEFECTS["pill"]}


def test_benchmark_seeded(bench, tmp_path):
    assert _digest(make_synthetic(tmp_path / "again", **KB)) == _digest(bench)
    assert _digest(make_synthetic(tmp_path / "seed1", seed=1, **KB)) != _digest(bench)
    with pytest.raises(ValueError, match="different synthetic build"): make_synthetic(bench, **{**KB, "preset": "default"})


def test_benchmark_defaults():
    p = SYNTH_PRESETS["benchmark"]
    assert (p["n_train"], p["n_test_good"], p["n_test_bad"]) == (28, 12, 24)
    assert len(p["classes"]) * p["n_train"] // 8 == 35  # optimiser steps per epoch at batch 8


def test_cross_class_donors_are_classes_of_the_build(tmp_path):
    "A two-class build takes its cross-class regions from the other class of the build."
    r = make_synthetic(tmp_path / "two", classes=["tile", "chip"], n_train=0, n_test_good=1, n_test_bad=8, size=64,
                       preset="benchmark")
    i = BENCH_DEFECTS["tile"].index("cross_class")
    rng = np.random.default_rng([0, BENCH_CLASSES.index("tile"), 2, i, 1])
    x, m = synth_image("tile", rng, 64, "cross_class", donors=("chip",), imaging=True)
    assert (np.asarray(Image.open(r / "tile/test/cross_class/000.png")) == x).all()
    assert (np.asarray(Image.open(r / "tile/ground_truth/cross_class/000_mask.png")) > 0).tolist() == m.tolist()


@pytest.mark.parametrize("layout", ["visa_mvtec", "visa_csv"])
def test_benchmark_visa_layouts(tmp_path, layout):
    r = make_synthetic(tmp_path / layout, layout=layout, classes=["grid", "nut"], n_train=2, n_test_good=2, n_test_bad=8,
                       size=64, preset="benchmark")
    ds = AnomalyDataset(r, "test", image_size=64, verbose=False)
    assert len(ds) == 2 * 10 and {r_.defect for r_ in ds.records} == {"good", "bad"}
    s = [ds[i] for i in range(len(ds))]
    assert all(x.mask.sum() > 0 for x in s if x.label) and all(x.mask.sum() == 0 for x in s if not x.label)


def test_presets_check_classes(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"): make_synthetic(tmp_path / "a", preset="hard")
    with pytest.raises(ValueError, match="unknown synthetic classes"): make_synthetic(tmp_path / "b", classes=["pill"])
    with pytest.raises(ValueError, match="preset 'benchmark'"): make_synthetic(tmp_path / "c", classes=["cat"], preset="benchmark")


# sha1 of small benchmark builds, recorded before 01a_synthetic's cells were split (issue 12): the committed synthetic
# results were trained on the benchmark, so a refactoring of the generator must leave every byte as it was
FROZEN_BENCH = {"mvtec": "af84deb8a08a27dd399208998bc90fac8383fcc3", "visa_mvtec": "210042721a094fa27f23672e9acf0972474be6ce",
                "visa_csv": "c6812dcf08025f533ca4132363e74b4c168c3b4a"}


@pytest.mark.parametrize("layout", list(FROZEN_BENCH))
def test_benchmark_small_build_is_frozen(tmp_path, layout):
    r = make_synthetic(tmp_path / layout, preset="benchmark", layout=layout, n_train=1, n_test_good=1, n_test_bad=8, size=64)
    assert _digest(r) == FROZEN_BENCH[layout]
