"""Independent re-implementations of the PASCAL-Context benchmark's saliency and edge measures,
written from the definitions (``eval_sal.py`` + ``jaccard.py`` of Multi-Task-Learning-PyTorch;
BSDS ``evaluation_bdry_image.m`` + ``collect_eval_bdry.m``), per image and with plain loops, as
oracles for ``mtpsl.metrics``. Thinning is scikit-image's; matching a brute-force Hopcroft-Karp
on the full pair matrix."""

from __future__ import annotations

import numpy as np
from scipy import sparse
from scipy.sparse.csgraph import maximum_bipartite_matching


# ----------------------------------------------------------------------------- saliency
def _jaccard(gt: np.ndarray, pred: np.ndarray) -> float:
    if gt.sum() == 0 and pred.sum() == 0:
        return 1.0
    return float((gt & pred).sum() / np.float32((gt | pred).sum()))


def _precision_recall(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    tp = (pred & gt).sum()
    fn = (~pred & gt).sum()
    fp = (pred & ~gt).sum()
    return tp / (tp + fp + 1e-12), tp / (tp + fn + 1e-12)


def eval_sal(images: list[tuple[np.ndarray, np.ndarray]], quantise: bool = True) -> dict:
    """``images``: (probability map, 0/1 label) pairs at the images' own sizes."""
    thresholds = np.linspace(0.2, 0.9, 15)
    jac, prec, rec = (np.zeros((len(images), 15)) for _ in range(3))
    for i, (prob, gt) in enumerate(images):
        mask = (np.floor(prob.astype(np.float32) * 255).astype(np.uint8).astype(np.float32)
                / np.float32(255.0)) if quantise else prob.astype(np.float32)
        for j, thres in enumerate(thresholds):
            cut = np.float32(thres)  # numpy 1.x compared a float32 array with a scalar in float32
            g = gt > cut
            m = mask > cut
            jac[i, j] = _jaccard(g, m)
            prec[i, j], rec[i, j] = _precision_recall(g, m)
    m_prec, m_rec = prec.mean(0), rec.mean(0)
    f = 2 * m_prec * m_rec / (m_prec + m_rec + 1e-12)
    return {"maxf": float(f.max()), "miou": float(jac.mean(0).max())}


# ----------------------------------------------------------------------------- BSDS edges
def max_matching(pred: np.ndarray, gt: np.ndarray, radius: float) -> int:
    """Maximum one-to-one matching of the pixels of two boolean maps within ``radius``."""
    p, g = np.argwhere(pred), np.argwhere(gt)
    if len(p) == 0 or len(g) == 0:
        return 0
    near = ((p[:, None, :] - g[None, :, :]) ** 2).sum(-1) <= radius * radius
    return int((maximum_bipartite_matching(sparse.csr_matrix(near), perm_type="column")
                >= 0).sum())


def image_counts(prob: np.ndarray, gt: np.ndarray, thresholds: np.ndarray,
                 max_dist: float, quantise: bool = True) -> np.ndarray:
    """``[T, 4]``: cntR, sumR, cntP, sumP of one image, as ``evaluation_bdry_image.m``."""
    from skimage.morphology import thin

    pb = np.floor(prob.astype(np.float32) * 255).astype(np.uint8) / 255.0 if quantise else prob
    radius = max_dist * np.hypot(*gt.shape)
    rows = []
    for t in thresholds:
        bmap = thin(pb >= t)
        matched = max_matching(bmap, gt, radius)
        rows.append([matched, gt.sum(), matched, bmap.sum()])
    return np.array(rows, dtype=np.float64)


def _fmeasure(r: float, p: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def _rp(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return c[..., 0] / (c[..., 1] + (c[..., 1] == 0)), c[..., 2] / (c[..., 3] + (c[..., 3] == 0))


def collect(per_image: list[np.ndarray], thresholds: np.ndarray) -> dict:
    """ODS (findBestRPF's interpolation) and OIS from per-image ``[T, 4]`` counts."""
    total = sum(per_image)
    r, p = _rp(total)
    best = -1.0
    if len(thresholds) == 1:
        best = _fmeasure(r[0], p[0])
    for t in range(1, len(thresholds)):
        for a in np.linspace(0, 1, 100):
            best = max(best, _fmeasure(a * r[t] + (1 - a) * r[t - 1],
                                       a * p[t] + (1 - a) * p[t - 1]))
    at_best = np.zeros(4)
    for c in per_image:
        ri, pi = _rp(c)
        f = [_fmeasure(x, y) for x, y in zip(ri, pi, strict=True)]
        at_best += c[int(np.argmax(f))]
    r_b, p_b = _rp(at_best)
    return {"odsf": best, "oisf": _fmeasure(float(r_b), float(p_b))}
