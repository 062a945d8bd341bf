"Fast tests of the MVTec-sized synthetic preset (`make_synthetic(root, preset='mvtec_sized')`): MVTec AD's table, scaled."
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vqflow_nb.synthetic import make_synthetic, mvtec_sized_plan, MVTEC_SIZED
from vqflow_nb.data import scan_dataset


def test_table_is_mvtec_ad():
    full = mvtec_sized_plan()
    assert sum(p["train"] for p in full.values()) == 3629
    assert sum(p["good"] + sum(p["kinds"].values()) for p in full.values()) == 1725
    assert sum(sum(p["kinds"].values()) for p in full.values()) == 1258
    assert [c for c, p in full.items() if p["grey"]] == ["grid", "screw", "zipper"]
    assert {c: p["side"] for c, p in full.items() if p["side"] != 1024} == dict(bottle=900, capsule=1000, metal_nut=700, pill=800, tile=840)


@pytest.mark.parametrize("workers", [1, 2])
def test_scaled_copy_matches_plan(tmp_path, workers):
    classes = ["screw", "pill", "toothbrush"]
    r = make_synthetic(tmp_path / "m", preset="mvtec_sized", classes=classes, scale=0.04, size_scale=0.06, workers=workers, progress=False)
    plan = mvtec_sized_plan(0.04, 0.06, classes)
    for c, p in plan.items():
        assert len(list((r / c / "train/good").glob("*.png"))) == p["train"]
        assert len(list((r / c / "test/good").glob("*.png"))) == p["good"]
        for k, n in p["kinds"].items():
            imgs = sorted((r / c / "test" / k).glob("*.png"))
            assert len(imgs) == n and all((r / c / "ground_truth" / k / f"{i.stem}_mask.png").exists() for i in imgs)
        for f in [*(r / c / "train/good").glob("*.png"), *(r / c / "test").rglob("*.png")]:
            with Image.open(f) as im: assert im.size == (p["side"], p["side"]) and im.mode == ("L" if p["grey"] else "RGB")
    n_test = sum(p["good"] + sum(p["kinds"].values()) for p in plan.values())
    assert len(scan_dataset(r, "test")) == n_test and sum(x.label for x in scan_dataset(r, "test")) == n_test - sum(p["good"] for p in plan.values())
    man = json.loads((r / "synthetic.json").read_text())
    assert man["preset"] == "mvtec_sized" and man["scale"] == 0.04 and len(man["files"]) == len([f for f in r.rglob("*.png")])
