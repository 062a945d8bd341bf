"""The dataset protocols of `vqflow_nb.dataset_metrics` on fixtures in each data set's own layout: Real-IAD's
sample-level metrics against views grouped by folder, MVTec AD 2's validation split, SegF1 and AU-PRO@0.05."""
import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from vqflow_nb.data import AnomalyDataset
from vqflow_nb.dataset_metrics import dataset_protocol_metrics, realiad_sample_ids, sample_level_metrics, samples_of
from vqflow_nb.metrics import aupro
from vqflow_nb.synthetic import write_fixture

def _per(ds, rng):
    "A `collect_scores`-shaped dict: per class index, the records' labels, scores with ties, masks, noisy maps."
    per = {}
    for i, r in enumerate(ds.records):
        d = per.setdefault(ds.class_index[r.cls_name], dict(labels=[], scores=[], masks=[], maps=[], has_mask=True, pro_maps=None))
        m = ds[i].mask[0].numpy()
        d["labels"].append(r.label); d["scores"].append(np.round(rng.random() + 0.4 * r.label, 1)); d["masks"].append(m)
        d["maps"].append(np.round(rng.random(m.shape) + 0.5 * m, 2).astype(np.float32))
    return {c: {k: (np.array(v) if isinstance(v, list) else v) for k, v in d.items()} for c, d in per.items()}

def test_realiad_sample_level_matches_views_grouped_by_folder(tmp_path):
    ds = AnomalyDataset(write_fixture(tmp_path / "riad", "realiad", n_test_good=3, n_test_bad=3), "test", image_size=None, verbose=False)
    per = _per(ds, np.random.default_rng(0))
    out = dataset_protocol_metrics("realiad", per, ds)
    for c, name in enumerate(ds.classes):
        folders = [r.path.parent for r in ds.records if r.cls_name == name]   # Real-IAD keeps a sample's views in one folder
        y = {f: max(l for g, l in zip(folders, per[c]["labels"]) if g == f) for f in set(folders)}
        s = {f: max(v for g, v in zip(folders, per[c]["scores"]) if g == f) for f in set(folders)}
        assert out["s_auroc"][name] == pytest.approx(roc_auc_score(list(y.values()), [s[f] for f in y]), abs=1e-12)
        assert out["n_samples"][name] == 6
    ids = realiad_sample_ids(ds.records)
    labels, scores = np.concatenate([per[c]["labels"] for c in sorted(per)]), np.concatenate([per[c]["scores"] for c in sorted(per)])
    t = samples_of(labels, scores, ids, [r.cls_name for r in ds.records])   # the records are class-sorted, as `per` is
    folder = {(r.cls_name, i): r.path.parent for r, i in zip(ds.records, ids)}
    for (name, sid), row in t.iterrows():   # label and score of a sample: the max over the images of its folder
        sel = [k for k, r in enumerate(ds.records) if r.cls_name == name and r.path.parent == folder[name, sid]]
        assert (row["label"], row["score"], row["views"]) == (labels[sel].max(), scores[sel].max(), 5)
    with pytest.raises(ValueError, match="its views are in classes"):   # one id in two classes is not a sample
        sample_level_metrics([r.label for r in ds.records], np.zeros(len(ids)), [ids[0]] * len(ids), [r.cls_name for r in ds.records])

def test_mvtec_ad2_validation_threshold_segf1_and_aupro05(tmp_path):
    root = write_fixture(tmp_path / "ad2", "mvtec_ad2")
    te = AnomalyDataset(root, "test", image_size=None, verbose=False)
    va = AnomalyDataset(root, "validation", image_size=None, verbose=False, class_index=te.class_index)
    assert len(va) == 4 and {r.split for r in va.records} == {"validation"} and not any(r.label for r in va.records)
    per, vper = _per(te, np.random.default_rng(1)), _per(va, np.random.default_rng(2))
    out = dataset_protocol_metrics("mvtec_ad2", per, te, vper)
    for c, name in enumerate(te.classes):
        v = vper[c]["maps"].astype(np.float64)
        thr = v.mean() + 3 * v.std()
        assert out["seg_threshold"][name] == pytest.approx(thr, abs=1e-12)
        assert out["seg_f1"][name] == pytest.approx(f1_score(per[c]["masks"].ravel() > 0, per[c]["maps"].ravel() > thr), abs=1e-12)
        assert out["aupro05"][name] == aupro(per[c]["masks"], per[c]["maps"], fpr_limit=0.05)
    assert dataset_protocol_metrics("mvtec_ad", per, type("D", (), dict(fmt="mvtec"))()) == {}
