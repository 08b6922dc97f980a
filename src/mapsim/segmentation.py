"""Segmentation quality: pixel confusion counts, overlap metrics and clDice.

Masks are boolean (H, W) arrays (or (N, H, W) batches; numpy arrays or torch tensors), True =
vessel. With TP, FP, FN, TN counted on pixels:

- accuracy (TP + TN) / all, precision TP / (TP + FP), recall TP / (TP + FN),
  F1 = Dice = 2 TP / (2 TP + FP + FN), IoU TP / (TP + FP + FN);
- clDice (Shit et al., CVPR 2021): the prediction V_P and the label V_L are skeletonised
  (``skimage.morphology.skeletonize``) into S_P and S_L; topology precision
  Tprec = |S_P ∩ V_L| / |S_P|, topology sensitivity Tsens = |S_L ∩ V_P| / |S_L|,
  clDice = 2 Tprec Tsens / (Tprec + Tsens).

**Empty masks.** A ratio whose denominator is zero is 1.0 when the prediction and the label
are both empty (nothing to find and nothing found: perfect agreement) and 0.0 otherwise (for
example precision when nothing is predicted but the label has vessels, or recall when the label
is empty but something is predicted). A harmonic mean (F1, clDice) of two zeros is 0.0. No
metric is ever NaN.

**Pooled and mean.** :class:`SegmentationAccumulator` gives both the metrics of each image, their
mean over images, and the *pooled* metrics computed from the counts summed over all images
(for clDice: from the summed skeleton counts |S_P ∩ V_L|, |S_P|, |S_L ∩ V_P|, |S_L|). The
empty rule then applies to the whole set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from mapsim.errors import MapsimError, ShapeMismatchError

#: Names of the metrics :func:`segmentation_metrics` returns, in table order.
METRICS = ("accuracy", "precision", "recall", "f1", "dice", "iou", "tprec", "tsens", "cldice")

#: Overlap metrics only (no skeletons).
PIXEL_METRICS = METRICS[:6]


class MaskError(MapsimError):
    """A prediction or label that is not a binary mask."""


# --------------------------------------------------------------------------- inputs
def as_mask(x: Any, what: str = "mask") -> np.ndarray:
    """A boolean numpy view of ``x`` (numpy array, torch tensor or nested lists).

    Booleans are kept; integers and reals must hold only 0 and 1 (an integer class map from
    ``argmax`` qualifies). Probabilities or scores must be thresholded first.

    :raises MaskError: for values other than 0 and 1.
    """
    if hasattr(x, "detach"):  # a torch tensor, on any device
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.dtype == bool:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise MaskError(f"the {what} has the type {arr.dtype}; give a boolean mask.")
    binary = (arr == 0) | (arr == 1)
    if not binary.all():
        bad = np.unique(arr[~binary])[:5]
        raise MaskError(
            f"the {what} is not binary: it holds values such as "
            f"{', '.join(f'{v:g}' for v in bad)} besides 0 and 1. Threshold scores first "
            "(e.g. probability > 0.5, or the argmax over classes)."
        )
    return arr == 1


def _pair(pred: Any, label: Any) -> tuple[np.ndarray, np.ndarray]:
    p, l = as_mask(pred, "prediction"), as_mask(label, "label")
    if p.shape != l.shape:
        raise ShapeMismatchError(
            f"the prediction has the shape {p.shape} but the label {l.shape}; they must match "
            "(the same image size, and the same number of images in a batch)."
        )
    if p.ndim not in (2, 3):
        raise MaskError(
            f"masks must be (height, width) or (images, height, width), not of shape {p.shape}."
        )
    return p, l


# --------------------------------------------------------------------------- counts
@dataclass(frozen=True)
class Counts:
    """Pixel confusion counts and clDice skeleton counts of one image or of a set.

    ``sp_in_vl`` = |S_P ∩ V_L|, ``sp`` = |S_P|, ``sl_in_vp`` = |S_L ∩ V_P|, ``sl`` = |S_L|;
    ``pred_any``/``label_any``: whether the prediction/label has any vessel pixel. The skeleton
    counts are -1 when they were not computed.
    """

    tp: int
    fp: int
    fn: int
    tn: int
    sp_in_vl: int = -1
    sp: int = -1
    sl_in_vp: int = -1
    sl: int = -1

    @property
    def pred_any(self) -> bool:
        """The prediction has at least one vessel pixel."""
        return self.tp + self.fp > 0

    @property
    def label_any(self) -> bool:
        """The label has at least one vessel pixel."""
        return self.tp + self.fn > 0

    @property
    def has_skeleton(self) -> bool:
        """The clDice skeleton counts were computed."""
        return self.sp >= 0

    def __add__(self, other: Counts) -> Counts:
        if not isinstance(other, Counts):
            raise TypeError(f"cannot add {type(other).__name__} to Counts")
        skel = self.has_skeleton and other.has_skeleton
        values = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name in ("sp_in_vl", "sp", "sl_in_vp", "sl"):
                values[f.name] = a + b if skel else -1
            else:
                values[f.name] = a + b
        return Counts(**values)

    def metrics(self) -> dict[str, float]:
        """The metrics from these counts (see the module's rule for empty masks)."""
        both_empty = not self.pred_any and not self.label_any
        tp, fp, fn, tn = self.tp, self.fp, self.fn, self.tn
        total = tp + fp + fn + tn
        out = {
            "accuracy": _ratio(tp + tn, total, both_empty),
            "precision": _ratio(tp, tp + fp, both_empty),
            "recall": _ratio(tp, tp + fn, both_empty),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn, both_empty),
            "iou": _ratio(tp, tp + fp + fn, both_empty),
        }
        out["dice"] = out["f1"]
        if self.has_skeleton:
            tprec = _ratio(self.sp_in_vl, self.sp, both_empty)
            tsens = _ratio(self.sl_in_vp, self.sl, both_empty)
            out["tprec"], out["tsens"] = tprec, tsens
            out["cldice"] = 2 * tprec * tsens / (tprec + tsens) if tprec + tsens > 0 else 0.0
        return {k: out[k] for k in METRICS if k in out}

    def as_dict(self) -> dict[str, int]:
        """The counts as a plain dict."""
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}


def _ratio(num: int, den: int, both_empty: bool) -> float:
    if den > 0:
        return float(num) / float(den)
    return 1.0 if both_empty else 0.0


def skeleton(mask: Any) -> np.ndarray:
    """The skeleton of a boolean (H, W) mask (``skimage.morphology.skeletonize``)."""
    from skimage.morphology import skeletonize

    m = as_mask(mask)
    if not m.any():
        return np.zeros(m.shape, dtype=bool)
    return skeletonize(m)


def counts(
    pred: Any, label: Any, *, cldice: bool = True, label_skeleton: Any | None = None
) -> Counts:
    """Confusion (and, with ``cldice``, skeleton) counts of one (H, W) prediction and label.

    ``label_skeleton`` may pass a precomputed :func:`skeleton` of ``label`` (the label of a
    validation image does not change between epochs).
    """
    p, l = _pair(pred, label)
    if p.ndim != 2:
        raise MaskError(f"counts() takes one (height, width) mask, not {p.shape}; use "
                        "batch_counts() for a batch.")
    tp = int(np.count_nonzero(p & l))
    n_p, n_l = int(np.count_nonzero(p)), int(np.count_nonzero(l))
    fp, fn = n_p - tp, n_l - tp
    tn = int(p.size) - tp - fp - fn
    if not cldice:
        return Counts(tp, fp, fn, tn)
    sp = skeleton(p)
    sl = skeleton(l) if label_skeleton is None else as_mask(label_skeleton, "label skeleton")
    if sl.shape != l.shape:
        raise ShapeMismatchError(
            f"the label skeleton has the shape {sl.shape} but the label {l.shape}."
        )
    return Counts(
        tp, fp, fn, tn,
        sp_in_vl=int(np.count_nonzero(sp & l)), sp=int(np.count_nonzero(sp)),
        sl_in_vp=int(np.count_nonzero(sl & p)), sl=int(np.count_nonzero(sl)),
    )


def batch_counts(
    pred: Any, label: Any, *, cldice: bool = True,
    label_skeletons: Sequence[Any] | None = None,
) -> list[Counts]:
    """:func:`counts` for each image of an (N, H, W) batch (an (N, 1, H, W) batch is squeezed).

    Pixel counts of torch tensors are taken on the tensors' device; only the skeletons (for
    clDice) need the masks on the CPU.
    """
    pixel = _torch_pixel_counts(pred, label) if not cldice else None
    if pixel is not None:
        return [Counts(*row) for row in pixel]
    p, l = _pair(_squeeze_channel(pred), _squeeze_channel(label))
    if p.ndim == 2:
        p, l = p[None], l[None]
    if label_skeletons is not None and len(label_skeletons) != len(p):
        raise ShapeMismatchError(
            f"{len(label_skeletons)} label skeletons were given for {len(p)} images."
        )
    return [
        counts(p[i], l[i], cldice=cldice,
               label_skeleton=None if label_skeletons is None else label_skeletons[i])
        for i in range(len(p))
    ]


def _squeeze_channel(x: Any) -> Any:
    shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
    if len(shape) == 4 and shape[1] == 1:
        return x[:, 0]
    return x


def _torch_pixel_counts(pred: Any, label: Any) -> list[tuple[int, int, int, int]] | None:
    """Confusion counts of torch bool/integer tensors on their device (None: not torch)."""
    if not (hasattr(pred, "detach") and hasattr(label, "detach")):
        return None
    import torch

    pred, label = _squeeze_channel(pred.detach()), _squeeze_channel(label.detach())
    for t, what in ((pred, "prediction"), (label, "label")):
        if t.is_floating_point() or t.is_complex():
            return None  # let as_mask check the values
        if t.dtype != torch.bool and bool(((t != 0) & (t != 1)).any()):
            as_mask(t, what)  # raises with the values
    if pred.shape != label.shape or pred.dim() not in (2, 3):
        return None  # as _pair reports it
    p, l = pred.bool(), label.to(pred.device).bool()
    if p.dim() == 2:
        p, l = p[None], l[None]
    tp = (p & l).flatten(1).sum(1)
    n_p, n_l = p.flatten(1).sum(1), l.flatten(1).sum(1)
    size = p[0].numel()
    rows = torch.stack([tp, n_p - tp, n_l - tp, size - n_p - n_l + tp], 1).cpu().tolist()
    return [tuple(int(v) for v in row) for row in rows]


# --------------------------------------------------------------------------- metrics
def segmentation_metrics(pred: Any, label: Any, *, cldice: bool = True) -> dict[str, float]:
    """Every metric of one (H, W) prediction against its label.

    Returns ``{"accuracy", "precision", "recall", "f1", "dice", "iou"}`` and, with ``cldice``,
    ``"tprec", "tsens", "cldice"``; values in [0, 1], never NaN (see the module's rule for
    empty masks).
    """
    return counts(pred, label, cldice=cldice).metrics()


class SegmentationAccumulator:
    """Collects the counts of many images; per-image, mean and pooled metrics.

    Call :meth:`update` with one mask pair or a batch (numpy or torch, on any device) as
    often as needed, e.g. once per validation batch::

        acc = SegmentationAccumulator()
        for images, labels in loader:
            acc.update(model(images).argmax(1), labels)
        acc.mean()["iou"], acc.pooled()["cldice"]

    ``cldice=False`` skips the skeletons (cheap pixel counts only).
    """

    def __init__(self, cldice: bool = True) -> None:
        self.cldice = cldice
        self.ids: list[str] = []
        self.counts: list[Counts] = []

    def __len__(self) -> int:
        return len(self.counts)

    def update(
        self, pred: Any, label: Any, ids: Iterable[str] | str | None = None,
        label_skeletons: Sequence[Any] | None = None,
    ) -> list[Counts]:
        """Add one (H, W) pair or an (N, H, W) batch; returns the new images' counts."""
        new = batch_counts(pred, label, cldice=self.cldice, label_skeletons=label_skeletons)
        if isinstance(ids, str):
            ids = [ids]
        names = list(ids) if ids is not None else []
        if ids is not None and len(names) != len(new):
            raise ShapeMismatchError(f"{len(names)} ids were given for {len(new)} images.")
        start = len(self.counts)
        self.ids.extend(names or [str(start + i) for i in range(len(new))])
        self.counts.extend(new)
        return new

    def per_image(self) -> list[dict[str, Any]]:
        """One dict per image: ``id``, the counts and the metrics."""
        return [{"id": i, **c.as_dict(), **c.metrics()} for i, c in zip(self.ids, self.counts)]

    def total(self) -> Counts:
        """The counts summed over all images."""
        if not self.counts:
            raise MapsimError("no images were scored yet; call update() first.")
        out = self.counts[0]
        for c in self.counts[1:]:
            out = out + c
        return out

    def pooled(self) -> dict[str, float]:
        """The metrics of the summed counts (the whole set as one image)."""
        return self.total().metrics()

    def mean(self) -> dict[str, float]:
        """The mean over images of each per-image metric."""
        if not self.counts:
            raise MapsimError("no images were scored yet; call update() first.")
        rows = [c.metrics() for c in self.counts]
        return {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
