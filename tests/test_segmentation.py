"""Segmentation metrics against hand-worked cases and an independent numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.morphology import skeletonize

from mapsim.errors import ShapeMismatchError
from mapsim.segmentation import (
    METRICS,
    Counts,
    MaskError,
    SegmentationAccumulator,
    batch_counts,
    counts,
    segmentation_metrics,
)


def reference(pred: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """Float64 reference written from the definitions (no empty masks here)."""
    codes = np.bincount((2 * label.astype(int) + pred.astype(int)).ravel(), minlength=4)
    tn, fp, fn, tp = (float(c) for c in codes)  # code = 2*label + pred
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    sp, sl = skeletonize(pred), skeletonize(label)
    tprec = float(np.sum(sp & label)) / float(np.sum(sp))
    tsens = float(np.sum(sl & pred)) / float(np.sum(sl))
    return {
        "accuracy": (tp + tn) / (tp + tn + fp + fn),
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall),
        "dice": 2 * tp / (2 * tp + fp + fn),
        "iou": tp / (tp + fp + fn),
        "tprec": tprec,
        "tsens": tsens,
        "cldice": 2 * tprec * tsens / (tprec + tsens),
    }


def vessel_like(rs: np.random.RandomState, shape=(64, 80), n=6) -> np.ndarray:
    """Random thick polylines: a vessel-like mask."""
    from skimage.draw import line
    from skimage.morphology import dilation, disk

    mask = np.zeros(shape, bool)
    for _ in range(n):
        r0, r1 = rs.randint(0, shape[0], 2)
        c0, c1 = rs.randint(0, shape[1], 2)
        rr, cc = line(r0, c0, r1, c1)
        mask[rr, cc] = True
    return dilation(mask, disk(rs.randint(1, 3))).astype(bool)


def test_hand_worked_confusion():
    pred = np.array([[1, 1, 0, 0],
                     [1, 0, 0, 0],
                     [0, 0, 1, 0]], bool)
    label = np.array([[1, 0, 0, 0],
                      [1, 1, 0, 0],
                      [0, 0, 0, 0]], bool)
    c = counts(pred, label, cldice=False)
    assert (c.tp, c.fp, c.fn, c.tn) == (2, 2, 1, 7)
    m = c.metrics()
    assert m["accuracy"] == pytest.approx(9 / 12)
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert m["dice"] == pytest.approx(4 / 7)
    assert m["iou"] == pytest.approx(2 / 5)
    assert "cldice" not in m


@pytest.mark.parametrize("seed", range(6))
def test_random_and_vessel_like_masks_match_reference(seed):
    rs = np.random.RandomState(seed)
    if seed % 2:
        pred, label = rs.rand(40, 50) < 0.3, rs.rand(40, 50) < 0.4
    else:
        label = vessel_like(rs)
        noise = rs.rand(*label.shape)
        pred = (label & (noise > 0.1)) | (~label & (noise < 0.05))
    got, want = segmentation_metrics(pred, label), reference(pred, label)
    assert set(got) == set(METRICS)
    for key in METRICS:
        assert got[key] == pytest.approx(want[key], rel=1e-12), key


def test_cldice_tprec_and_tsens_are_not_swapped():
    # 1-px lines are their own skeletons: the counts can be worked out by hand
    label = np.zeros((12, 20), bool)
    label[5, 0:10] = True  # 10 px
    pred = np.zeros_like(label)
    pred[5, 0:5] = True  # half of the label's line ...
    pred[0:10, 15] = True  # ... and a 10-px line away from it
    assert (skeletonize(label) == label).all() and (skeletonize(pred) == pred).all()
    m = segmentation_metrics(pred, label)
    assert m["tprec"] == pytest.approx(5 / 15)  # |S_P ∩ V_L| / |S_P|
    assert m["tsens"] == pytest.approx(5 / 10)  # |S_L ∩ V_P| / |S_L|
    assert m["cldice"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    swapped = segmentation_metrics(label, pred)
    assert swapped["tprec"] == pytest.approx(0.5) and swapped["tsens"] == pytest.approx(1 / 3)


def test_cldice_ignores_thickness_but_iou_does_not():
    label = np.zeros((15, 30), bool)
    label[6:9, 2:28] = True  # a 3-px-thick bar
    pred = np.zeros_like(label)
    pred[7, :] = True  # its whole centre line
    m = segmentation_metrics(pred, label)
    assert m["tprec"] == pytest.approx(26 / 30)  # the line's ends stick out of the bar
    sl = skeletonize(label)  # the centre row, but for one pixel at an end
    assert m["tsens"] == pytest.approx(np.sum(sl[7]) / np.sum(sl)) and m["tsens"] > 0.9
    assert m["iou"] == pytest.approx(26 / (78 + 4))
    assert m["cldice"] > 0.85 > 0.35 > m["iou"]


def test_perfect_prediction_scores_one():
    label = vessel_like(np.random.RandomState(3))
    m = segmentation_metrics(label, label.copy())
    assert all(m[k] == 1.0 for k in METRICS)


@pytest.mark.parametrize(
    "pred_any, label_any, expect",
    [
        (False, False, dict.fromkeys(METRICS, 1.0)),
        (False, True, {"accuracy": 1 - 3 / 25, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                       "dice": 0.0, "iou": 0.0, "tprec": 0.0, "tsens": 0.0, "cldice": 0.0}),
        (True, False, {"accuracy": 1 - 3 / 25, "precision": 0.0, "recall": 0.0, "f1": 0.0,
                       "dice": 0.0, "iou": 0.0, "tprec": 0.0, "tsens": 0.0, "cldice": 0.0}),
    ],
)
def test_empty_masks_follow_the_documented_rule(pred_any, label_any, expect):
    line = np.zeros((5, 5), bool)
    line[2, 1:4] = True
    pred = line if pred_any else np.zeros_like(line)
    label = line if label_any else np.zeros_like(line)
    m = segmentation_metrics(pred, label)
    assert not any(math.isnan(v) for v in m.values())
    assert m == pytest.approx(expect)


def test_pooled_sums_counts_and_mean_averages_images():
    rs = np.random.RandomState(7)
    labels = np.stack([vessel_like(rs) for _ in range(3)])
    preds = labels ^ (rs.rand(*labels.shape) < 0.05)
    acc = SegmentationAccumulator()
    acc.update(preds[:2], labels[:2], ids=["a", "b"])
    acc.update(preds[2], labels[2], ids="c")
    assert [r["id"] for r in acc.per_image()] == ["a", "b", "c"]
    rows = [reference(p, l) for p, l in zip(preds, labels)]
    for key in METRICS:
        assert acc.mean()[key] == pytest.approx(np.mean([r[key] for r in rows]), rel=1e-12)
    tp = np.sum(preds & labels); fp = np.sum(preds & ~labels); fn = np.sum(~preds & labels)
    sp = [skeletonize(p) for p in preds]
    sl = [skeletonize(l) for l in labels]
    tprec = sum(np.sum(s & l) for s, l in zip(sp, labels)) / sum(np.sum(s) for s in sp)
    tsens = sum(np.sum(s & p) for s, p in zip(sl, preds)) / sum(np.sum(s) for s in sl)
    pooled = acc.pooled()
    assert pooled["iou"] == pytest.approx(tp / (tp + fp + fn), rel=1e-12)
    assert pooled["tprec"] == pytest.approx(tprec, rel=1e-12)
    assert pooled["tsens"] == pytest.approx(tsens, rel=1e-12)
    assert pooled["cldice"] == pytest.approx(2 * tprec * tsens / (tprec + tsens), rel=1e-12)
    # pooling is not the mean: the two differ on these images
    assert pooled["iou"] != pytest.approx(acc.mean()["iou"], rel=1e-9)


def test_torch_tensors_and_channel_batches_give_the_numpy_counts():
    rs = np.random.RandomState(11)
    labels = np.stack([vessel_like(rs) for _ in range(2)])
    preds = labels ^ (rs.rand(*labels.shape) < 0.1)
    want = batch_counts(preds, labels)
    t_pred = torch.from_numpy(preds.astype(np.int64))[:, None]  # (N, 1, H, W) class map
    t_label = torch.from_numpy(labels)[:, None]
    assert batch_counts(t_pred, t_label) == want
    fast = batch_counts(t_pred, t_label, cldice=False)  # pixel counts on the tensors' device
    assert [(c.tp, c.fp, c.fn, c.tn) for c in fast] == [(c.tp, c.fp, c.fn, c.tn) for c in want]
    assert all(not c.has_skeleton for c in fast)


def test_precomputed_label_skeletons_give_the_same_counts():
    rs = np.random.RandomState(5)
    label = vessel_like(rs)
    pred = label ^ (rs.rand(*label.shape) < 0.1)
    assert counts(pred, label, label_skeleton=skeletonize(label)) == counts(pred, label)


def test_bad_masks_are_reported():
    good = np.zeros((4, 4), bool)
    with pytest.raises(MaskError, match=r"not binary: it holds values such as 0\.7 besides 0 "
                                        r"and 1\. Threshold scores first"):
        counts(np.full((4, 4), 0.7), good)
    with pytest.raises(ShapeMismatchError, match=r"prediction has the shape \(4, 5\) but the "
                                                 r"label \(4, 4\)"):
        counts(np.zeros((4, 5), bool), good)
    with pytest.raises(MaskError, match="is not binary"):
        batch_counts(torch.full((1, 4, 4), 2), torch.zeros((1, 4, 4), dtype=torch.bool),
                     cldice=False)


def test_counts_add_up():
    a, b = Counts(1, 2, 3, 4, 1, 2, 3, 4), Counts(10, 20, 30, 40, 5, 6, 7, 8)
    assert a + b == Counts(11, 22, 33, 44, 6, 8, 10, 12)
    assert (a + Counts(1, 1, 1, 1)).has_skeleton is False


def test_synthetic_vessel_labels_match_reference():
    from scipy.ndimage import binary_dilation, binary_erosion

    from mapsim.plugins.vessels import generate

    label = generate(2, 0, (128, 160), image=False).label
    for pred in (binary_dilation(label), binary_erosion(label), label[::-1]):
        got, want = segmentation_metrics(pred, label), reference(pred, label)
        for key in METRICS:
            assert got[key] == pytest.approx(want[key], rel=1e-12), key
