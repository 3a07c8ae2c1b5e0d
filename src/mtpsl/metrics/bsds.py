"""The BSDS boundary benchmark's per-image counts: thinning and one-to-one pixel matching.

The multi-task PASCAL-Context benchmark scores edges with the BSDS protocol (Martin et al.,
Arbelaez et al., TPAMI 2011; run through SEISM by Vandenhende et al.). For each threshold the
prediction ``pb >= t`` is thinned to one-pixel-wide lines (MATLAB's ``bwmorph(.., 'thin',
inf)``), then ``correspondPixels`` matches predicted and ground-truth edge pixels one to one
within ``max_dist`` times the image diagonal. The image's counts at the threshold are
``matched, n_gt, matched, n_pred`` (recall's numerator and denominator, then precision's).

Why not a package: ``pyEdgeEval`` (PyPI) carries the BSDS C++ matcher, but as an sdist with a
GPL-2 C++ core that needs a compiler at install time; scikit-image's ``thin`` is the same
algorithm but visits the whole image in every pass, i.e. ``O(area x thickness)`` per threshold.
Here both steps batch all thresholds of an image:

* :func:`thin` is Guo & Hall's two-subiteration algorithm as MATLAB implements it (Lam, Lee &
  Suen 1992, conditions G1, G2, G3 / G3'), visiting only pixels whose neighbourhood changed
  since they were last examined; the result is the same as re-examining every pixel. Tests:
  equal to ``skimage.morphology.thin`` and ``pyEdgeEval``'s port on random shapes.
* :func:`match_counts` counts a maximum-cardinality bipartite matching (scipy's sparse LAPJV)
  over the pairs within the radius (``dx^2 + dy^2 <= r^2`` as in ``match.cc``). BSDS solves a
  minimum-cost assignment in which every unmatched pixel costs ``100 r`` against at most ``r``
  per matched pair, so its matching has maximum cardinality too, short of augmenting paths of
  more than 100 pairs, and only the cardinality enters the counts. Test: equal to
  ``pyEdgeEval``'s ``correspond_pixels`` (the BSDS C++ code) on random edge maps.
"""

from __future__ import annotations

import math
from functools import cache

import numpy as np

# Neighbours x1..x8 of Lam, Lee & Suen: east, then counter-clockwise (row offset, col offset).
_NEIGHBOURS = ((0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1), (1, 0), (1, 1))


@cache
def _thinning_tables() -> tuple[np.ndarray, np.ndarray]:
    """Deletion look-up tables of the two subiterations, indexed by ``sum x_k << (k - 1)``."""
    code = np.arange(256)
    bits = [(code >> k) & 1 for k in range(8)]

    def nb(k: int) -> np.ndarray:
        """x_k of the paper, k = 1..8 (and 9 = 1)."""
        return bits[(k - 1) % 8]

    crossings = sum(((1 - nb(2 * i - 1)) & (nb(2 * i) | nb(2 * i + 1))) for i in range(1, 5))
    n1 = sum(nb(2 * k - 1) | nb(2 * k) for k in range(1, 5))
    n2 = sum(nb(2 * k) | nb(2 * k + 1) for k in range(1, 5))
    g1 = crossings == 1
    g2 = (np.minimum(n1, n2) >= 2) & (np.minimum(n1, n2) <= 3)
    g3 = ((nb(2) | nb(3) | (1 - nb(8))) & nb(1)) == 0
    g3_prime = ((nb(6) | nb(7) | (1 - nb(4))) & nb(5)) == 0
    return g1 & g2 & g3, g1 & g2 & g3_prime


def thin(masks: np.ndarray) -> np.ndarray:
    """Thin binary ``[N, H, W]`` masks to one-pixel-wide lines (``bwmorph(.., 'thin', inf)``).

    The masks are independent (each is padded with zeros). A pixel's deletion test reads only
    its 3x3 neighbourhood, so after the first two subiterations only the neighbours of pixels
    deleted in the previous two need examining again.
    """
    n, h, w = masks.shape
    stride = w + 2
    grid = np.zeros((n, h + 2, stride), dtype=np.uint8)
    grid[:, 1:-1, 1:-1] = masks != 0
    flat = grid.reshape(-1)
    offsets = np.array([dy * stride + dx for dy, dx in _NEIGHBOURS], dtype=np.int64)
    around = np.concatenate([[0], offsets])
    tables = _thinning_tables()
    candidates = np.flatnonzero(flat)
    slot = np.zeros(flat.size, dtype=np.int64)  # for de-duplication without sorting
    recent: list[np.ndarray] = []
    step = 0
    while True:
        if step >= 2:
            if all(d.size == 0 for d in recent):
                break
            touched = (np.concatenate(recent)[:, None] + around).reshape(-1)
            slot[touched] = np.arange(touched.size)  # the last write of each index wins
            first = slot[touched] == np.arange(touched.size)
            candidates = touched[first & (flat[touched] != 0)]
        codes = np.zeros(candidates.size, dtype=np.uint8)
        for k, off in enumerate(offsets):
            codes |= flat[candidates + off] << k
        deleted = candidates[tables[step % 2][codes]]
        flat[deleted] = 0
        recent = [*recent, deleted][-2:]
        step += 1
    return grid[:, 1:-1, 1:-1].astype(bool)


@cache
def disc_pairs(radius: float) -> np.ndarray:
    """Offsets ``(dy, dx)`` with ``dy^2 + dx^2 <= radius^2``, as ``[K, 2]`` int64."""
    r = math.ceil(radius)
    dy, dx = np.mgrid[-r : r + 1, -r : r + 1]
    keep = dy * dy + dx * dx <= radius * radius
    return np.stack([dy[keep], dx[keep]], axis=1).astype(np.int64)


def match_counts(preds: np.ndarray, gt: np.ndarray, radius: float) -> np.ndarray:
    """Matched pixel count per map of ``preds [N, H, W]`` against the one label ``gt [H, W]``
    (both boolean): the size of a maximum one-to-one matching of predicted to ground-truth
    pixels at most ``radius`` apart."""
    n, h, w = preds.shape
    gy, gx = np.nonzero(gt)
    out = np.zeros(n, dtype=np.int64)
    if gy.size == 0 or not preds.any():
        return out
    r = math.ceil(radius)
    gt_id = np.full((h + 2 * r, w + 2 * r), -1, dtype=np.int64)
    gt_id[gy + r, gx + r] = np.arange(gy.size)
    offsets = disc_pairs(radius)
    for i, pred in enumerate(preds):
        py, px = np.nonzero(pred)
        rows, cols = [], []
        for dy, dx in offsets:
            g = gt_id[py + r + dy, px + r + dx]
            hit = np.flatnonzero(g >= 0)
            rows.append(hit)
            cols.append(g[hit])
        out[i] = _max_matching(np.concatenate(rows), np.concatenate(cols), py.size, gy.size)
    return out


def _max_matching(row: np.ndarray, col: np.ndarray, n1: int, n2: int) -> int:
    """Size of a maximum matching of the bipartite graph with edges ``(row[k], col[k])``.

    scipy's Hopcroft-Karp (``maximum_bipartite_matching``) takes seconds on the dense meshes
    that thinning a noisy low-threshold map leaves; its sparse LAPJV solver takes milliseconds
    on the usual reduction: left nodes ``P + G'``, right nodes ``G + P'`` (primes are
    mirror copies), edges ``p-g`` and ``g'-p'`` for every pair (cost ~0) and ``p-p'``,
    ``g'-g`` (cost 1). A full matching always exists (mirror every matched pair, leave the
    rest on their copies) and costs the number of unmatched pixels, so its minimum has the
    most pairs."""
    if row.size == 0:
        return 0
    # imported here: scipy.sparse.csgraph costs every CLI process 0.2 s of start-up otherwise
    from scipy import sparse
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    eps = 1e-9  # zero-cost edges would be read as missing
    left = np.concatenate([row, np.arange(n1), n1 + np.arange(n2), n1 + col])
    right = np.concatenate([col, n2 + np.arange(n1), np.arange(n2), n2 + row])
    cost = np.concatenate([np.full(row.size, eps), np.ones(n1 + n2), np.full(row.size, eps)])
    graph = sparse.csr_matrix((cost, (left, right)), shape=(n1 + n2, n1 + n2))
    matched_left, matched_right = min_weight_full_bipartite_matching(graph)
    return int(((matched_left < n1) & (matched_right < n2)).sum())


def boundary_counts(pred: np.ndarray, gt: np.ndarray, thresholds: np.ndarray,
                    max_dist: float) -> np.ndarray:
    """``[4, T]`` BSDS counts of one image: matched, ground-truth pixels, matched, predicted
    (thinned) pixels, at each threshold ``pred >= t``. ``pred`` is float ``[H, W]``, ``gt``
    boolean; the radius is ``max_dist`` times the image diagonal. Thresholds with no
    prediction value between them give the same map, which is thinned and matched once."""
    h, w = gt.shape
    values = np.unique(pred[np.isfinite(pred)])
    cut = np.searchsorted(values, thresholds)  # the map is values[cut:]: equal cut, equal map
    _, first, which = np.unique(cut, return_index=True, return_inverse=True)
    thinned = thin(pred[None] >= thresholds[first][:, None, None])
    matched = match_counts(thinned, gt, max_dist * math.hypot(h, w))[which]
    n_gt = np.full_like(matched, int(gt.sum()))
    return np.stack([matched, n_gt, matched, thinned.sum(axis=(1, 2))[which]])
