"""Bjøntegaard deltas on rate–accuracy curves.

G. Bjøntegaard, "Calculation of average PSNR differences between RD-curves", VCEG-M33, 2001, with the
piecewise-cubic Hermite (PCHIP) fit that replaced the original cubic polynomial (VCEG-AL22 and later
common test conditions): PCHIP follows the measured points exactly and cannot overshoot between them.
Here a task metric (top-1, box AP, mIoU: higher is better; an error such as MAE: lower is better,
``higher_is_better=False``) takes the place of PSNR.

Each curve is first reduced to its *upper envelope*: points are sorted by rate and a point is kept
only if its metric is strictly better than that of every cheaper point (a point that spends more bits
for no gain is dominated and dropped). Along the envelope the rate rises and the metric strictly
improves, so log-rate is a function of the metric and vice versa, and PCHIP keeps each fit monotone.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["bd_rate", "bd_metric", "rate_at_metric", "upper_envelope"]


def upper_envelope(rate: Sequence[float], metric: Sequence[float],
                   higher_is_better: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Sort by rate and keep the points whose metric beats every cheaper point (ties: cheapest wins)."""
    r = np.asarray(rate, dtype=np.float64).reshape(-1)
    m = np.asarray(metric, dtype=np.float64).reshape(-1)
    if r.shape != m.shape:
        raise ValueError(f"rate and metric differ in length: {r.size} vs {m.size}")
    if not (np.isfinite(r).all() and np.isfinite(m).all()):
        raise ValueError(f"rate and metric must be finite; got rate={r.tolist()}, metric={m.tolist()}")
    if (r <= 0).any():
        raise ValueError(f"rates must be positive (the fit uses log-rate); got {r.tolist()}")
    score = m if higher_is_better else -m
    order = np.lexsort((-score, r))  # by rate, and at equal rate the best metric first
    keep, best = [], -np.inf
    for i in order:
        if score[i] > best:
            keep.append(i)
            best = score[i]
    return r[keep], m[keep]


def _pchip_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Fritsch–Carlson derivatives with the shape-preserving three-point end conditions."""
    h = np.diff(x)
    delta = np.diff(y) / h
    if x.size == 2:
        return np.full(2, delta[0])
    d = np.zeros_like(y)
    w1 = 2 * h[1:] + h[:-1]
    w2 = h[1:] + 2 * h[:-1]
    same_sign = np.sign(delta[:-1]) * np.sign(delta[1:]) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        harmonic = (w1 + w2) / (w1 / delta[:-1] + w2 / delta[1:])
    d[1:-1] = np.where(same_sign, harmonic, 0.0)

    def end(h0: float, h1: float, m0: float, m1: float) -> float:
        s = ((2 * h0 + h1) * m0 - h0 * m1) / (h0 + h1)
        if np.sign(s) != np.sign(m0):
            return 0.0
        if np.sign(m0) != np.sign(m1) and abs(s) > 3 * abs(m0):
            return 3 * m0
        return s

    d[0] = end(h[0], h[1], delta[0], delta[1])
    d[-1] = end(h[-1], h[-2], delta[-1], delta[-2])
    return d


def _pchip_integral(x: np.ndarray, y: np.ndarray, lo: float, hi: float) -> float:
    """Exact integral over ``[lo, hi]`` (within ``[x[0], x[-1]]``) of the PCHIP interpolant of (x, y)."""
    d = _pchip_slopes(x, y)
    h = np.diff(x)
    # integral of each whole interval: h (y0 + y1) / 2 + h² (d0 − d1) / 12
    before = np.concatenate([[0.0], np.cumsum(h * (y[:-1] + y[1:]) / 2 + h**2 * (d[:-1] - d[1:]) / 12)])

    def antiderivative(u: float) -> float:
        k = int(np.clip(np.searchsorted(x, u, side="right") - 1, 0, x.size - 2))
        t = (u - x[k]) / h[k]
        # ∫₀ᵗ of the Hermite basis functions h00, h10, h01, h11
        b00 = t**4 / 2 - t**3 + t
        b10 = t**4 / 4 - 2 * t**3 / 3 + t**2 / 2
        b01 = -(t**4) / 2 + t**3
        b11 = t**4 / 4 - t**3 / 3
        return before[k] + h[k] * (y[k] * b00 + h[k] * d[k] * b10 + y[k + 1] * b01 + h[k] * d[k + 1] * b11)

    return antiderivative(hi) - antiderivative(lo)


def _curves(rate_anchor, metric_anchor, rate_test, metric_test, higher_is_better):
    """Both envelopes as (log-rate, score) with score = the metric, negated when lower is better,
    so that the score rises along each envelope."""
    sign = 1.0 if higher_is_better else -1.0
    curves = []
    for name, r, m in (("anchor", rate_anchor, metric_anchor), ("test", rate_test, metric_test)):
        try:
            r, m = upper_envelope(r, m, higher_is_better)
        except ValueError as e:
            raise ValueError(f"{name} curve: {e}") from None
        if r.size < 2:
            raise ValueError(f"{name} curve needs at least 2 points whose metric improves with the rate "
                             f"(upper envelope); got {r.size}")
        curves.append((np.log(r), sign * m))
    return curves


def _overlap(a: np.ndarray, b: np.ndarray, what: str, sign: float = 1.0) -> tuple[float, float]:
    lo, hi = max(a[0], b[0]), min(a[-1], b[-1])
    if not hi > lo:
        span = [sorted((sign * c[0], sign * c[-1])) for c in (a, b)]
        raise ValueError(f"the curves do not overlap in {what}: anchor spans [{span[0][0]:.6g}, {span[0][1]:.6g}], "
                         f"test spans [{span[1][0]:.6g}, {span[1][1]:.6g}]")
    return lo, hi


def bd_rate(rate_anchor: Sequence[float], metric_anchor: Sequence[float],
            rate_test: Sequence[float], metric_test: Sequence[float], higher_is_better: bool = True) -> float:
    """Average rate difference of *test* against *anchor* at equal metric, in percent.

    Log-rate is fitted as a PCHIP function of the metric on each curve's upper envelope and the
    two fits are averaged over the metric interval both curves cover. Negative = the test method
    needs fewer bits for the same accuracy (−20 means 20 % fewer). Rates in any positive unit
    (bpp, bytes), the same for both curves. Raises ``ValueError`` if a curve has fewer than two
    envelope points, or the metric ranges do not overlap.
    """
    sign = 1.0 if higher_is_better else -1.0
    (la, ma), (lt, mt) = _curves(rate_anchor, metric_anchor, rate_test, metric_test, higher_is_better)
    lo, hi = _overlap(ma, mt, "metric", sign)
    mean_diff = (_pchip_integral(mt, lt, lo, hi) - _pchip_integral(ma, la, lo, hi)) / (hi - lo)
    return float((np.exp(mean_diff) - 1) * 100)


def bd_metric(rate_anchor: Sequence[float], metric_anchor: Sequence[float],
              rate_test: Sequence[float], metric_test: Sequence[float], higher_is_better: bool = True) -> float:
    """Average metric difference *test* − *anchor* at equal rate, in metric units (better = positive
    when higher is better, negative when lower is better).

    The metric is fitted as a PCHIP function of log-rate on each curve's upper envelope and the fits
    are averaged over the log-rate interval both curves cover. Raises ``ValueError`` as :func:`bd_rate`.
    """
    sign = 1.0 if higher_is_better else -1.0
    (la, ma), (lt, mt) = _curves(rate_anchor, metric_anchor, rate_test, metric_test, higher_is_better)
    lo, hi = _overlap(la, lt, "log-rate")
    return float(sign * (_pchip_integral(lt, mt, lo, hi) - _pchip_integral(la, ma, lo, hi)) / (hi - lo))


def rate_at_metric(rate: Sequence[float], metric: Sequence[float], target: float,
                   higher_is_better: bool = True) -> tuple[float | None, str]:
    """The rate a curve needs to reach ``target``: ``(rate, status)``.

    On the curve's upper envelope, log-rate is the PCHIP function of the metric that :func:`bd_rate`
    integrates; it is evaluated at ``target``. ``status`` is ``"interpolated"``; ``"at most"`` when
    the cheapest envelope point already reaches ``target`` (its rate is returned: a lower one was not
    measured); ``"not reached"`` (rate ``None``) when no point does.
    """
    sign = 1.0 if higher_is_better else -1.0
    r, m = upper_envelope(rate, metric, higher_is_better)
    x, y, goal = sign * m, np.log(r), sign * float(target)
    if goal <= x[0]:
        return float(r[0]), "at most"
    if goal > x[-1]:
        return None, "not reached"
    d = _pchip_slopes(x, y)
    k = int(np.searchsorted(x, goal, side="left")) - 1
    h = x[k + 1] - x[k]
    t = (goal - x[k]) / h
    # the cubic Hermite basis h00, h10, h01, h11 at t
    log_rate = (y[k] * (2 * t**3 - 3 * t**2 + 1) + h * d[k] * (t**3 - 2 * t**2 + t)
                + y[k + 1] * (-2 * t**3 + 3 * t**2) + h * d[k + 1] * (t**3 - t**2))
    return float(np.exp(log_rate)), "interpolated"
