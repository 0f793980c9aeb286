"""The per-channel arithmetic the core does for every backend, in one place: the general
path (fastbn._api) and the fast path (fastbn._fastpath) both call these, so their
results are the same roundings of the same expressions."""


def invstd(xp, var, eps):
    """``1 / sqrt(var + eps)``, in var's dtype."""
    return 1.0 / xp.sqrt(var + eps)


def running_statistics(xp, running_mean, running_var, eps, stat):
    """(mean, invstd) of inference, in the stat dtype whatever the running statistics'
    dtype; the mean is a copy (a result never aliases the caller's running mean)."""
    mean = xp.array(running_mean, dtype=stat)
    return mean, invstd(xp, running_var.astype(stat, copy=False), eps).astype(stat, copy=False)


def update_running(running_mean, running_var, mean, m2, n, momentum, stat):
    """The momentum update with a batch of ``n`` values per channel (unbiased variance
    ``m2 / (n - 1)``), computed in the stat dtype and stored in the running statistics'
    own dtype; both are written only after both are computed."""
    rm, rv = (r.astype(stat, copy=False) for r in (running_mean, running_var))
    new_mean = (1.0 - momentum) * rm + momentum * mean
    new_var = (1.0 - momentum) * rv + momentum * (m2 / (n - 1))
    running_mean[...] = new_mean
    running_var[...] = new_var
