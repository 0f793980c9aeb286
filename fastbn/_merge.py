"""Per-channel statistics of disjoint parts of a batch, combined exactly.

A part is ``(count, mean, m2)``: how many values each channel has, their mean, and
``m2 = sum((x - mean)**2)``. Two parts merge with Chan, Golub and LeVeque's
pairwise formula (the one Welford's update is the one-value case of)::

    delta = mean_b - mean_a
    mean  = mean_a + delta * n_b / n
    m2    = m2_a + m2_b + delta**2 * n_a * n_b / n

which never subtracts two large sums of squares, so it keeps the accuracy of the
parts however large the mean is against the spread (E[x^2] - E[x]^2 loses every
digit there: docs/numerics.md). Used by the MPI collectives, the Dask reduction
and :class:`fastbn.PopulationStats`; all math here is array arithmetic in the
parts' own array module and dtype.
"""
from typing import Any, NamedTuple


class Moments(NamedTuple):
    """Per-channel statistics of a part of a batch.

    Attributes
    ----------
    count : int
        Values per channel in the part (the same for every channel).
    mean : array of shape (C,)
        Per-channel mean (any value when ``count`` is 0).
    m2 : array of shape (C,)
        Per-channel sum of squared deviations from ``mean``.
    """

    count: int
    mean: Any
    m2: Any


def merge(a, b):
    """The :class:`Moments` of the union of two disjoint parts.

    An empty side returns the other unchanged (no ``0 * inf`` from a mean that was
    never set).
    """
    na, nb = int(a.count), int(b.count)
    if nb == 0:
        return Moments(na, a.mean, a.m2)
    if na == 0:
        return Moments(nb, b.mean, b.m2)
    n = na + nb
    delta = b.mean - a.mean
    mean = a.mean + delta * (nb / n)
    m2 = a.m2 + b.m2 + delta * delta * (na * nb / n)
    return Moments(n, mean, m2)


def merge_all(parts):
    """Merge a sequence of parts pairwise, as a balanced tree (in order: the result
    does not depend on anything but the order of ``parts``)."""
    parts = [Moments(*p) for p in parts]
    if not parts:
        raise ValueError("parts: expected at least one part")
    while len(parts) > 1:
        paired = [merge(parts[i], parts[i + 1]) for i in range(0, len(parts) - 1, 2)]
        if len(parts) % 2:
            paired.append(parts[-1])
        parts = paired
    return parts[0]
