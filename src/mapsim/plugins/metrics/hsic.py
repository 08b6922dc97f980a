"""HSIC and CKA arithmetic shared by the ``cka`` variants (float64 throughout).

Notation: n samples; a layer's features are an (n, D) matrix X; its Gram matrix K = k(X, X).

* biased HSIC (Gretton et al. 2005): tr(K~ L~) / (n - 1)^2 with K~ = H K H, H = I - 11^T/n;
* unbiased HSIC (Song et al. 2012):
  [tr(K0 L0) + (1^T K0 1)(1^T L0 1) / ((n-1)(n-2)) - 2/(n-2) 1^T K0 L0 1] / (n (n-3)),
  K0 = K with a zero diagonal; needs n >= 4;
* CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) (Kornblith et al. 2019).

All functions take a stack of Gram matrices (L, n, n) and return every layer pair (L, L) in
one einsum, with no (n x n) x (n x n) matrix products.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

from mapsim import Undefined

#: the documented reasons for undefined CKA values ({side}: layer_a or layer_b)
ZERO_VARIANCE = "zero variance: every map of {side} is constant over the samples"
TOO_FEW = "too few samples: n={n} < 4 for the unbiased HSIC estimator"
NOT_POSITIVE = "the unbiased HSIC of {side} with itself is {value:.3g} <= 0"
ZERO_BANDWIDTH = "zero RBF bandwidth: the median pairwise distance of {side} is 0"

Median = Literal["all", "off_diagonal"]


def linear_gram(x: torch.Tensor) -> torch.Tensor:
    """(n, n) Gram matrix of the rows of ``x`` (n, D), centred first for precision."""
    x = x.to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


#: float64 elements of one column chunk of a batch in :func:`batch_gram` (256 MB)
GRAM_CHUNK_ELEMENTS = 1 << 25


def batch_gram(rows: Sequence[torch.Tensor], chunk_elements: int = GRAM_CHUNK_ELEMENTS,
               split_products: bool | None = None) -> tuple[torch.Tensor, bool]:
    """The (n, n) float64 Gram matrix of ``n`` feature vectors of one length, each centred
    over the n vectors first (as :func:`linear_gram` of their stack), and whether all n are
    equal.

    Computed where the vectors are, in chunks of features, so that at most
    ``chunk_elements`` float64 values of the batch exist at once beside the vectors
    themselves (a batch of whole layer outputs is never stacked or copied to float64 whole).
    The products of the float32 values are exact in float64 and summed in float64, and the
    sum is centred afterwards (H G H, H = I - 11^T/n, which equals the Gram matrix of the
    centred vectors): one pass over the features instead of three, at a relative error of
    about 1e-16 x (mean^2 / variance) of the features. ``split_products`` (default: on CUDA
    devices) multiplies each chunk as a batch of short pieces (:func:`_split_products`).
    """
    n = len(rows)
    length = rows[0].numel()
    device = rows[0].device
    step = max(1, chunk_elements // n)
    split = device.type == "cuda" if split_products is None else split_products
    gram = torch.zeros(n, n, dtype=torch.float64, device=device)
    same = torch.ones((), dtype=torch.bool, device=device)
    for start in range(0, length, step):
        x = torch.stack([r.reshape(-1)[start:start + step] for r in rows])
        same &= (x == x[:1]).all()
        x = x.to(torch.float64)
        gram += _split_products(x) if split else x @ x.T
    gram -= gram.mean(dim=0, keepdim=True)
    gram -= gram.mean(dim=1, keepdim=True)
    return gram, bool(same)  # one wait for the device per layer and batch


#: features per piece of :func:`_split_products`
PIECE = 4096


def _split_products(x: torch.Tensor) -> torch.Tensor:
    """``x @ x.T`` (float64) as a sum of the products of pieces of ``PIECE`` columns, taken in
    one batched product: an (n x D) x (D x n) product with n ~ 10 and D in the millions is
    one long dot product per entry, which a GPU's library runs on a handful of its cores
    (on an H100 it made minibatch CKA 30x slower than a peer's code); a batch of pieces keeps
    every core busy. Same float64 products, summed in another order."""
    whole = (x.shape[1] // PIECE) * PIECE
    out = torch.zeros(x.shape[0], x.shape[0], dtype=torch.float64, device=x.device)
    if whole:
        pieces = x[:, :whole].unflatten(1, (whole // PIECE, PIECE)).transpose(0, 1)
        out += torch.bmm(pieces, pieces.transpose(1, 2)).sum(dim=0)
    if whole < x.shape[1]:
        rest = x[:, whole:]
        out += rest @ rest.T
    return out


def rbf_from_gram(gram: torch.Tensor, fraction: float, convention: Median) -> torch.Tensor | None:
    """:func:`rbf_gram` from the centred linear Gram matrix of the samples (squared distances
    d2_ij = G_ii + G_jj - 2 G_ij); None for a zero bandwidth."""
    sq = torch.diagonal(gram)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * gram).clamp(min=0.0)  # rounding only
    d2.fill_diagonal_(0.0)
    median = median_squared_distance(d2, convention)
    if median <= 0:
        return None
    return torch.exp(-d2 / (2.0 * fraction**2 * median))


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """(n, n) squared Euclidean distances between the rows of ``x`` (float64, zero diagonal)."""
    x = x.to(torch.float64)
    x = x - x.mean(dim=0, keepdim=True)
    sq = (x * x).sum(dim=1)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)).clamp(min=0.0)  # rounding only
    d2.fill_diagonal_(0.0)
    return d2


def median_squared_distance(d2: torch.Tensor, convention: Median) -> float:
    """The median of the squared distances: over all n^2 entries (``all``, zero diagonal
    included, as Kornblith et al.'s demo code does) or over the n(n-1) off-diagonal ones.

    numpy's median (mean of the two middle values for an even count) is used, so the
    ``all`` convention reproduces the published reference values exactly.
    """
    if convention == "all":
        values = d2.reshape(-1)
    else:
        n = d2.shape[0]
        values = d2[~torch.eye(n, dtype=torch.bool, device=d2.device)]
    count = values.numel()
    upper = float(torch.kthvalue(values, count // 2 + 1).values)  # selection, not a full sort
    if count % 2:
        return upper
    return (float(torch.kthvalue(values, count // 2).values) + upper) / 2


def rbf_gram(x: torch.Tensor, fraction: float, convention: Median) -> torch.Tensor | None:
    """RBF Gram matrix exp(-d^2 / (2 sigma^2)), sigma = ``fraction`` x the median distance.

    sigma^2 = fraction^2 x median(d^2), the median taken by :func:`median_squared_distance`.
    None when that median is 0 (the bandwidth would be 0).
    """
    d2 = squared_distances(x)
    median = median_squared_distance(d2, convention)
    if median <= 0:
        return None
    return torch.exp(-d2 / (2.0 * fraction**2 * median))


def hsic_biased(grams: torch.Tensor) -> torch.Tensor:
    """(L, L) biased HSIC between every pair of the Gram matrices ``grams`` (L, n, n)."""
    n = grams.shape[-1]
    centred = grams - grams.mean(dim=1, keepdim=True)
    centred = centred - centred.mean(dim=2, keepdim=True)
    return torch.einsum("lij,kij->lk", centred, centred) / (n - 1) ** 2


def hsic_unbiased(grams: torch.Tensor) -> torch.Tensor:
    """(L, L) unbiased HSIC between every pair of the Gram matrices ``grams`` (L, n, n).

    Needs n >= 4 (a ValueError otherwise).
    """
    n = grams.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs n >= 4 samples, got {n}")
    k0 = grams.clone()
    k0.diagonal(dim1=1, dim2=2).zero_()
    trace = torch.einsum("lij,kij->lk", k0, k0)
    rows = k0.sum(dim=2)  # (L, n): K0 1
    totals = rows.sum(dim=1)  # (L,): 1^T K0 1
    value = (trace + torch.outer(totals, totals) / ((n - 1) * (n - 2))
             - 2.0 / (n - 2) * rows @ rows.T)
    return value / (n * (n - 3))


#: float64 elements of the permuted Gram matrices held at once by hsic_unbiased_permuted (128 MB)
PERMUTED_CHUNK_ELEMENTS = 1 << 24


def hsic_unbiased_permuted(grams: torch.Tensor, perms: torch.Tensor,
                           chunk: int | None = None) -> torch.Tensor:
    """(R, L, L) unbiased HSIC of every layer's Gram matrix against every layer's Gram matrix
    with the samples permuted: entry ``[r, l, k]`` is HSIC(K_l, P_r K_k P_r^T), with
    ``perms`` (R, n) the R permutations (row r: sample i of the permuted side is sample
    ``perms[r, i]``).

    Only the cross terms change under a permutation (the zero-diagonal sums 1^T K0 1 do not),
    so this costs R x L^2 n^2 multiply-adds, in chunks of ``chunk`` permutations (default:
    as many as keep :data:`PERMUTED_CHUNK_ELEMENTS` permuted values at once).
    """
    n = grams.shape[-1]
    if n < 4:
        raise ValueError(f"the unbiased HSIC estimator needs n >= 4 samples, got {n}")
    k0 = grams.clone()
    k0.diagonal(dim1=1, dim2=2).zero_()
    rows = k0.sum(dim=2)  # (L, n)
    totals = rows.sum(dim=1)
    constant = torch.outer(totals, totals) / ((n - 1) * (n - 2))
    flat = k0.reshape(k0.shape[0], -1)
    if chunk is None:
        chunk = max(1, PERMUTED_CHUNK_ELEMENTS // max(1, k0.numel()))
    out = []
    perms = perms.to(device=grams.device, dtype=torch.long)
    for start in range(0, perms.shape[0], chunk):
        p = perms[start:start + chunk]  # (r, n)
        permuted = k0[:, p[:, :, None], p[:, None, :]]  # (L, r, n, n)
        trace = torch.einsum("li,kri->rlk", flat, permuted.reshape(k0.shape[0], len(p), -1))
        cross = torch.einsum("li,kri->rlk", rows, rows[:, p])  # sum_i K0_l 1 (i) P(L0_k 1)(i)
        out.append((trace + constant - 2.0 / (n - 2) * cross) / (n * (n - 3)))
    return torch.cat(out) if out else grams.new_zeros(0, grams.shape[0], grams.shape[0])


def cka_value(hsic: torch.Tensor, a: int, b: int, reasons: list[str | None],
              unbiased: bool) -> float | Undefined:
    """CKA of layers ``a`` and ``b`` from an HSIC matrix, or why it is undefined.

    ``reasons[l]`` is a template (with ``{side}``) when layer l is undefined on its own.
    """
    for index, side in ((a, "layer_a"), (b, "layer_b")):
        if reasons[index] is not None:
            return Undefined(reasons[index].format(side=side))
    for index, side in ((a, "layer_a"), (b, "layer_b")):
        own = float(hsic[index, index])
        if own <= 0:
            if unbiased:
                return Undefined(NOT_POSITIVE.format(side=side, value=own))
            return Undefined(ZERO_VARIANCE.format(side=side))
    return float(hsic[a, b]) / math.sqrt(float(hsic[a, a]) * float(hsic[b, b]))


def is_constant(x: torch.Tensor) -> bool:
    """True when every row (sample) of ``x`` is the same."""
    return bool((x == x[:1]).all())
