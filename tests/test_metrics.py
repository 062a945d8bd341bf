"Fast tests of the installed `vqflow_nb.metrics` and `vqflow_nb.viz`."
import numpy as np
import pytest
from scipy import ndimage
from skimage import measure
from sklearn.metrics import roc_auc_score, average_precision_score

from vqflow_nb.metrics import (METRIC_KEYS, aupro, pixel_metrics, image_metrics, class_metrics, evaluate_classes,
                               MetricAccumulator, f1_max, _aupro_approx_loop)


def _case(seed, n=4, h=24, w=24, levels=None):
    rng = np.random.default_rng(seed)
    masks = ndimage.binary_dilation(rng.random((n, h, w)) < 0.03, structure=np.ones((1, 3, 3)))
    masks[0, 0, 0] = True
    maps = rng.random((n, h, w)) + 0.6 * masks
    if levels: maps = np.round(maps * levels) / levels
    return masks, maps


def _brute_aupro(masks, maps, lim=0.3):
    "Every distinct threshold, binarise >= t, 8-connected regions, trapezoid with interpolation at lim."
    regs = []
    for i, m in enumerate(masks):
        lab, k = ndimage.label(m, structure=np.ones((3, 3)))
        regs += [(i, lab == j) for j in range(1, k + 1)]
    pts = [(0., 0.)]
    for t in np.unique(maps)[::-1]:
        b = maps >= t
        pts.append(((b & ~masks).sum() / (~masks).sum(), np.mean([(b[i] & r).sum() / r.sum() for i, r in regs])))
    pts.append((1., 1.))
    area = 0.
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 >= lim: break
        if x1 > lim: y1, x1 = y0 + (y1 - y0) * (lim - x0) / (x1 - x0), lim
        area += (x1 - x0) * (y0 + y1) / 2
    return area / lim


@pytest.mark.parametrize("seed,levels,lim", [(0, None, 0.3), (1, 6, 0.3), (2, 25, 0.1), (3, None, 1.0)])
def test_exact_matches_brute_force(seed, levels, lim):
    mk, mp = _case(seed, levels=levels)
    assert aupro(mk, mp, fpr_limit=lim) == pytest.approx(_brute_aupro(mk, mp, lim), abs=1e-10)
    assert aupro(mk, mp.astype(np.float32), fpr_limit=lim) == pytest.approx(_brute_aupro(mk, mp.astype(np.float32).astype(float), lim), abs=1e-10)


def test_ramp_stripes_analytic():
    ramp = (np.arange(2800) / 2800.).reshape(1, 400, 7)
    one = np.zeros((1, 400, 7), bool); one[..., 3] = True
    three = np.zeros((1, 400, 7), bool); three[..., [1, 3, 5]] = True
    assert aupro(one, ramp, fpr_limit=1/3) == pytest.approx(1/6 - 1/960_000, abs=1e-12)
    assert aupro(three, ramp, fpr_limit=1/3) == pytest.approx(1/6, abs=1e-5)


def test_degenerate_and_connectivity():
    mk, _ = _case(4)
    assert aupro(mk, mk + 0.1 * np.random.default_rng(0).random(mk.shape)) == pytest.approx(1.0, abs=1e-12)
    assert aupro(mk, np.zeros(mk.shape)) == pytest.approx(0.15, abs=1e-12)
    with pytest.raises(ValueError, match="constant"): aupro(mk, np.zeros(mk.shape), variant="approx")
    m8 = np.zeros((1, 6, 6), bool); m8[0, 1, 1] = m8[0, 2, 2] = m8[0, 2, 3] = True
    s8 = np.zeros((1, 6, 6)); s8[0, 1, 1] = 1.0
    # one 8-connected region of 3 pixels, 1 detected at FPR 0: area = 1/3 * 0.3 + triangle to (1,1) part
    from vqflow_nb.metrics import pro_curve_exact
    fpr, pro = pro_curve_exact(m8, s8)
    assert fpr[1] == 0 and pro[1] == pytest.approx(1/3)


def _approx_reference(masks, maps, steps, fpr_limit=0.3):
    """The papers' approximate AU-PRO written from its definition (VQ-Flow `evaluations.py::eval_seg_pro`), one threshold
    at a time, sharing no code with vqflow_nb: thresholds np.arange(min, max, (max-min)/steps); at each, binarise
    map > t, label the GT masks (skimage, default = 8-connected), PRO = mean over regions of the covered fraction,
    FPR = FP / normal pixels; keep FPR < limit, min-max rescale the kept FPRs, trapezoid area. Returns (auc, fprs, pros)."""
    masks, maps = np.asarray(masks, bool), np.asarray(maps)
    lo, hi = float(maps.min()), float(maps.max())
    normal = ~masks
    fprs, pros = [], []
    for t in np.arange(lo, hi, (hi - lo) / steps):
        binary = maps > t
        overlaps = []
        for i in range(len(masks)):
            for region in measure.regionprops(measure.label(masks[i])):
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(binary[i, rows, cols].sum() / region.area)
        pros.append(np.mean(overlaps))
        fprs.append(np.logical_and(binary, normal).sum() / normal.sum())
    fprs, pros = np.array(fprs), np.array(pros)
    f, p = fprs[fprs < fpr_limit], pros[fprs < fpr_limit]
    f = (f - f.min()) / (f.max() - f.min())
    area = 0.0
    for k in range(len(f) - 1):   # f is monotone (non-increasing in t): |sum of trapezoids|
        area += (f[k + 1] - f[k]) * (p[k + 1] + p[k]) / 2
    return abs(area), fprs, pros


@pytest.mark.parametrize("seed,levels,dtype", [(5, None, np.float64), (6, 8, np.float64), (7, None, np.float32), (8, 16, np.float32)])
def test_approx_equals_independent_reference_at_800_thresholds(seed, levels, dtype):
    "The vectorised approximate AU-PRO equals a per-threshold loop written from the definition, at the papers' 800 steps."
    from vqflow_nb.metrics import pro_curve_approx
    mk, mp = _case(seed, n=3, h=20, w=20, levels=levels)
    mp = mp.astype(dtype)
    ref, fprs, pros = _approx_reference(mk, mp, steps=800)
    _, fpr, pro = pro_curve_approx(mk, mp, steps=800)
    assert len(fpr) == len(fprs) >= 800 and np.array_equal(fpr, fprs)   # same thresholds, same FP counts
    np.testing.assert_allclose(pro, pros, rtol=0, atol=1e-15)
    assert aupro(mk, mp, variant="approx", steps=800) == pytest.approx(ref, abs=1e-12)
    if levels is None: assert abs(aupro(mk, mp, variant="approx", steps=800) - aupro(mk, mp)) < 0.05
    # the authors'-style loop kept for the benchmark agrees too
    assert _aupro_approx_loop(mk, mp, steps=800) == pytest.approx(ref, abs=1e-12)


def test_pixel_fast_backend_equals_sklearn():
    mk, mp = _case(6, levels=9)
    fast, ref = pixel_metrics(mk, mp), pixel_metrics(mk, mp, backend="sklearn")
    for k in fast: assert fast[k] == pytest.approx(ref[k], abs=1e-12)
    assert fast["p_auroc"] == pytest.approx(roc_auc_score(mk.ravel(), mp.ravel()))
    assert fast["p_ap"] == pytest.approx(average_precision_score(mk.ravel(), mp.ravel()))


def test_image_metrics_and_single_label():
    m = image_metrics([0, 0, 1, 1], [.1, .4, .35, .8])
    assert m == pytest.approx(dict(i_auroc=0.75, i_ap=(1 + 2/3) / 2, i_f1max=0.8))
    assert f1_max([0, 1], [0.2, 0.9]) == 1.0
    with pytest.raises(ValueError, match="only one label value"): image_metrics([1, 1], [.1, .2])
    with pytest.warns(RuntimeWarning): assert np.isnan(image_metrics([1, 1], [.1, .2], on_single_label="nan")["i_auroc"])


def test_evaluate_classes_and_accumulator():
    pc = {}
    for i, c in enumerate("abc"):
        mk, mp = _case(10 + i, n=6)
        lab = mk.reshape(6, -1).any(1).astype(int); lab[0] = 0; mk[0] = False
        pc[c] = dict(labels=lab, scores=mp.reshape(6, -1).max(1), masks=mk, maps=mp)
    pc["c"] = dict(labels=pc["c"]["labels"], scores=pc["c"]["scores"])
    df = evaluate_classes(pc)
    assert list(df.index) == ["a", "b", "c", "mean"]
    assert np.isnan(df.loc["c", "p_auroc"]) and df.attrs["n_averaged"]["p_auroc"] == 2
    assert df.loc["mean", "aupro"] == pytest.approx(df.loc[["a", "b"], "aupro"].mean())
    r = class_metrics(pc["c"]["labels"], pc["c"]["scores"])
    assert set(r) == set(METRIC_KEYS) and r["aupro"] is None
    acc = MetricAccumulator(["a", "b", "c"])
    for c, name in enumerate("ab"):
        d = pc[name]
        for s in (slice(0, 4), slice(4, 6)):
            acc.update(c, d["labels"][s], d["scores"][s], d["masks"][s], d["maps"][s])
    acc.update(2, pc["c"]["labels"], pc["c"]["scores"])
    assert acc._mp[0][0].dtype == np.float32 and acc._mk[0][0].dtype == bool
    df2 = acc.compute()
    np.testing.assert_allclose(df2[list(METRIC_KEYS)].to_numpy(float), df[list(METRIC_KEYS)].to_numpy(float), atol=1e-6)


def test_accumulator_is_evaluate_classes():
    "One path: streamed in mixed-class batches (torch, channel dim) with pro_maps, `compute` equals `evaluate_classes` exactly."
    import pandas as pd, torch
    pc, rows = {}, []
    for i, c in enumerate("ab"):
        mk, mp = _case(30 + i, n=7, levels=20)
        lab = mk.reshape(7, -1).any(1).astype(int); lab[0] = 0; mk[0] = False
        mp = mp.astype(np.float32)
        pc[c] = dict(labels=lab, scores=mp.reshape(7, -1).max(1).astype(np.float64), masks=mk, maps=mp,
                     pro_maps=np.ascontiguousarray(mp[:, ::-1]))
        rows += [(i, j) for j in range(7)]
    order = np.random.default_rng(0).permutation(len(rows))
    acc = MetricAccumulator(["a", "b", "unused"])
    for s in range(0, len(order), 4):   # batches mixing both classes
        sel = [rows[k] for k in order[s:s + 4]]
        get = lambda key: np.stack([pc["ab"[i]][key][j] for i, j in sel])
        acc.update(torch.tensor([i for i, _ in sel]), torch.tensor(get("labels")), torch.tensor(get("scores")),
                   torch.tensor(get("masks"))[:, None], torch.tensor(get("maps"))[:, None], torch.tensor(get("pro_maps")))
    # the accumulator's batches arrive in another order: compare with evaluate_classes of the same order
    want = {c: {k: np.stack([pc[c][k][j] for i, j in (rows[k2] for k2 in order) if "ab"[i] == c]) for k in pc[c]} for c in "ab"}
    pd.testing.assert_frame_equal(acc.compute(), evaluate_classes(want), check_exact=True)
    for variant in ("exact", "approx"):
        pd.testing.assert_frame_equal(acc.compute(aupro_variant=variant, aupro_steps=50),
                                      evaluate_classes(want, aupro_variant=variant, aupro_steps=50), check_exact=True)
    no_pro = evaluate_classes({c: {k: v for k, v in d.items() if k != "pro_maps"} for c, d in want.items()})
    assert (acc.compute()["aupro"] != no_pro["aupro"]).all()   # pro_maps reached AU-PRO
    with pytest.raises(ValueError, match="nothing collected"): MetricAccumulator(["a"]).compute()


def test_one_metric_list():
    "The trainer's metric list is the metrics module's (METRICS vs METRIC_KEYS: one list)."
    from vqflow_nb import train
    assert tuple(train.METRICS) == METRIC_KEYS


def test_viz_returns_figures():
    import matplotlib; matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from vqflow_nb.viz import show_overlays, plot_class_bars, plot_score_hist, plot_codebook_usage
    from vqflow_nb.core import codebook_perplexity
    mk, mp = _case(20, n=3, h=16, w=16)
    imgs = np.random.default_rng(0).random((3, 3, 32, 32))
    assert len(show_overlays(imgs, mp, np.repeat(np.repeat(mk, 2, 1), 2, 2)).axes) == 6
    df = evaluate_classes({"a": dict(labels=[0, 1, 1], scores=mp.reshape(3, -1).max(1), masks=mk, maps=mp)})
    assert len(plot_class_bars(df).axes) == 1
    assert len(plot_score_hist([0, 0, 1, 1], [.1, .2, .8, .9]).axes) == 1
    assert codebook_perplexity([2, 2, 2]) == pytest.approx(3)
    assert len(plot_codebook_usage([5, 0, 3, 1]).axes) == 1
    plt.close("all")


def _labelled(mk, mp):
    lab = mk.reshape(len(mk), -1).any(1).astype(int); lab[0] = 0
    return lab, mp.reshape(len(mp), -1).max(1)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_inputs_are_named(bad):
    "NaN/inf in maps, pro_maps or scores: a ValueError naming the input, the count and (via evaluate_classes) the class."
    mk, good = _case(7)
    mp = good.copy(); mp[1, 2, 3] = bad; mp[3, 0, 0] = bad
    msg = r"maps: 2 non-finite values \(.*\) of 2304, in 2 of 4 maps \(first: map 1\)"
    for call in (lambda: aupro(mk, mp), lambda: aupro(mk, mp, variant="approx"), lambda: pixel_metrics(mk, mp),
                 lambda: pixel_metrics(mk, mp, backend="sklearn")):
        with pytest.raises(ValueError, match=msg): call()
    with pytest.raises(ValueError, match=r"pro_maps: 2 non-finite"): pixel_metrics(mk, good, pro_maps=mp)
    with pytest.raises(ValueError, match=r"pro_maps: 2 non-finite"): pixel_metrics(mk, good, pro_maps=mp, aupro_variant="approx")
    lab, sc = _labelled(mk, good)
    with pytest.raises(ValueError, match=r"class 'screw': maps: 2 non-finite"):
        evaluate_classes({"ok": dict(labels=lab, scores=sc, masks=mk, maps=good), "screw": dict(labels=lab, scores=sc, masks=mk, maps=mp)})
    sc_bad = sc.copy(); sc_bad[2] = bad
    with pytest.raises(ValueError, match=r"scores: 1 non-finite value \(.*\) of 4 \(first at index 2\)"): image_metrics(lab, sc_bad)
    with pytest.raises(ValueError, match=r"class 'screw': scores: 1 non-finite"):
        evaluate_classes({"screw": dict(labels=lab, scores=sc_bad)})
    acc = MetricAccumulator(["a", "screw"]).update(1, lab, sc, mk, mp)
    with pytest.raises(ValueError, match=r"class 'screw': maps: 2 non-finite"): acc.compute()
    mk_bad = mk.astype(float); mk_bad[0, 5, 5] = np.nan
    with pytest.raises(ValueError, match=r"masks: 1 non-finite"): pixel_metrics(mk_bad, good)


@pytest.mark.parametrize("steps", [0, 1, -5, 2.5])
def test_approx_steps_validated(steps):
    mk, mp = _case(8)
    with pytest.raises(ValueError, match="steps must be an integer >= 2"): aupro(mk, mp, variant="approx", steps=steps)
    with pytest.raises(ValueError, match="steps must be an integer >= 2"): pixel_metrics(mk, mp, aupro_variant="approx", aupro_steps=steps)
    assert aupro(mk, mp, variant="approx", steps=np.int64(50)) == aupro(mk, mp, variant="approx", steps=50)   # numpy integers are fine


def test_labels_must_be_zero_one():
    "Labels are 0 = normal / 1 = anomalous (or bool); {-1, 1} or {1, 2} is an error, not 'all anomalous'."
    sc = [.1, .4, .35, .8]
    for bad in ([-1, -1, 1, 1], [1, 1, 2, 2], [0, 0.5, 1, 1]):
        with pytest.raises(ValueError, match=r"labels: must be 0 \(normal\) / 1 \(anomalous\) or bool"): image_metrics(bad, sc)
        with pytest.raises(ValueError, match="labels: must be 0"): MetricAccumulator(["a"]).update(0, bad, sc)
    with pytest.raises(ValueError, match="class 'pill': labels: must be 0"): evaluate_classes({"pill": dict(labels=[-1, -1, 1, 1], scores=sc)})
    ref = image_metrics([0, 0, 1, 1], sc)
    for ok in ([False, False, True, True], [0., 0., 1., 1.], np.array([0, 0, 1, 1], np.uint8)):
        assert image_metrics(ok, sc) == ref


# ---- per defect kind -------------------------------------------------------------------------------------------------
from vqflow_nb.metrics import defect_kind, defect_kind_metrics


def _kind_case(seed, n=48, hw=8):
    rng = np.random.default_rng(seed)
    cls = rng.choice(["a", "b"], n); lab = rng.random(n) < 0.6; lab[:2] = False; cls[:2] = ["a", "b"]
    kinds = np.where(lab, rng.choice(["dent", "hole", "crack"], n), "good")
    mk = np.zeros((n, hw, hw), bool); mk[lab, 2:5, 3:6] = True
    mp = (rng.random((n, hw, hw)) + 0.5 * mk).astype(np.float32)
    sc = np.round(rng.random(n) + 0.4 * lab, 2)
    return lab, sc, kinds, mk, mp, cls


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_defect_kind_metrics_equal_sklearn(seed):
    lab, sc, kinds, mk, mp, cls = _kind_case(seed)
    pooled = defect_kind_metrics(lab, sc, kinds, mk, mp)
    per_cls = defect_kind_metrics(lab, sc, kinds, mk, mp, classes=cls)
    for k in sorted(set(kinds[lab])):
        sel = ~lab | (kinds == k)
        assert pooled.loc[k, "i_auroc"] == pytest.approx(roc_auc_score(lab[sel], sc[sel]), abs=1e-12)
        assert pooled.loc[k, "p_auroc"] == pytest.approx(roc_auc_score(mk[sel].ravel(), mp[sel].ravel()), abs=1e-12)
        want_i, want_p = [], []
        for c in ("a", "b"):
            s = sel & (cls == c)
            if not (s & lab).any(): continue
            want_i.append(roc_auc_score(lab[s], sc[s])); want_p.append(roc_auc_score(mk[s].ravel(), mp[s].ravel()))
        assert per_cls.loc[k, "i_auroc"] == pytest.approx(np.mean(want_i), abs=1e-12)
        assert per_cls.loc[k, "p_auroc"] == pytest.approx(np.mean(want_p), abs=1e-12)
        assert per_cls.loc[k, "n_classes"] == len(want_i)
        assert pooled.loc[k, "n_defective"] == ((kinds == k) & lab).sum() and pooled.loc[k, "n_good"] == (~lab).sum()
    # maps as float16 with a channel dim, as MetricAccumulator stores them: same numbers up to the rounding of float16
    half = defect_kind_metrics(lab, sc, kinds, mk[:, None], mp.astype(np.float16)[:, None], classes=cls)
    assert np.allclose(half["p_auroc"], per_cls["p_auroc"], atol=2e-3)


def test_defect_kind_metrics_inputs():
    lab, sc, kinds, mk, mp, cls = _kind_case(3)
    with pytest.raises(ValueError, match="maps: 3 maps"): defect_kind_metrics(lab, sc, kinds, mk[:3], mp[:3])
    with pytest.raises(ValueError, match="non-finite"): defect_kind_metrics(lab, np.where(lab, np.nan, sc), kinds)
    with pytest.raises(ValueError, match="classes: 2 values"): defect_kind_metrics(lab, sc, kinds, classes=["a", "b"])
    empty = mk.copy(); empty[kinds == "dent"] = False   # a kind without pixel ground truth: NaN, the others unchanged
    d = defect_kind_metrics(lab, sc, kinds, empty, mp)
    assert np.isnan(d.loc["dent", "p_auroc"]) and d.loc["hole", "p_auroc"] == defect_kind_metrics(lab, sc, kinds, mk, mp).loc["hole", "p_auroc"]


def test_defect_kind_reads_every_layout(tmp_path):
    from vqflow_nb.synthetic import make_synthetic
    from vqflow_nb.data import scan_dataset
    kw = dict(classes=["bar"], n_train=1, n_test_good=1, n_test_bad=4, size=32)
    for layout in ("mvtec", "visa_mvtec", "visa_csv"):
        root = make_synthetic(tmp_path / layout, layout=layout, **kw)
        recs = scan_dataset(root, "test") + scan_dataset(root, "train")
        assert [defect_kind(r.path) for r in recs] == [r.defect for r in recs], layout
    assert {defect_kind(r.path) for r in scan_dataset(tmp_path / "mvtec", "test")} == {"good", "blob", "scratch", "stain", "missing"}
