"""Balanced assignment and balanced k-means: the exact-size clustering every balanced construction method needs.

`balanced_assign(cost, capacity)` solves the transportation problem

    minimise  sum_i cost[i, label_i]   subject to   #{i : label_i = k} <= capacity[k]   (and >= min_size[k])

*exactly* (an optimal integral solution, not a heuristic), by successive shortest paths on the small graph whose nodes
are the K clusters:

- points are inserted one at a time; a point whose cheapest cluster has room goes there (that is provably the
  shortest path: in an optimal partial assignment no chain of moves into a cluster with room has negative cost);
- otherwise the point enters some cluster a and a chain of points moves a -> b -> ... -> a cluster with room.
  The cost of the edge a -> b is the cheapest move of one member of a into b, `min_{j in a} cost[j,b] - cost[j,a]`;
  Bellman-Ford over the K nodes finds the cheapest chain (no negative cycles exist, because the partial assignment
  is optimal, and a shortest-path augmentation keeps it so -- the classic successive-shortest-path argument).

Minimum sizes are handled by splitting every cluster into a "must" slot (capacity min_size, cost lowered by a constant
M larger than any saving a chain can make) and an "optional" slot: the optimum then fills every must slot first.

Cost is O(N K) memory and about O(N K^2) numpy work in the worst case; a 11008 x 16 problem (a LLaMA-2-7B FFN split
into 16 experts) takes about a second. `balanced_kmeans` alternates this exact assignment with centroid updates
(Lloyd), which is what k-means-constrained (used by llama-moe v1/v2) does with a min-cost-flow solver.
"""

from __future__ import annotations

import numpy as np

__all__ = ["balanced_assign", "balanced_kmeans", "kmeans_pp_init"]


def balanced_assign(cost: np.ndarray, capacity, min_size=None, order: np.ndarray | None = None) -> np.ndarray:
    """Optimal assignment of N points to K clusters with at most `capacity[k]` (and at least `min_size[k]`) points.

    cost: [N, K] float array; capacity, min_size: int or length-K ints. Returns labels int64 [N].
    `order` is the insertion order (any order gives an optimal solution; ties may resolve differently).
    """
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2:
        raise ValueError(f"cost: expected a [N, K] matrix, got shape {cost.shape}")
    n, k = cost.shape
    if not np.all(np.isfinite(cost)):
        raise ValueError("cost: contains NaN or infinite values")
    cap = np.broadcast_to(np.asarray(capacity, dtype=np.int64), (k,)).copy()
    lo = np.zeros(k, np.int64) if min_size is None else np.broadcast_to(np.asarray(min_size, np.int64), (k,)).copy()
    if np.any(cap < 0) or np.any(lo < 0) or np.any(lo > cap):
        raise ValueError(f"capacity/min_size: need 0 <= min_size <= capacity, got min {lo.tolist()} cap {cap.tolist()}")
    if cap.sum() < n:
        raise ValueError(f"capacity: total {int(cap.sum())} is smaller than the number of points {n}")
    if lo.sum() > n:
        raise ValueError(f"min_size: total {int(lo.sum())} exceeds the number of points {n}")
    if np.any(lo > 0):
        # split each cluster into a must slot (cost - M) and an optional slot
        span = float(cost.max() - cost.min()) if n else 0.0
        big = 4.0 * (2 * k + 1) * (span + 1.0)
        cost2 = np.concatenate([cost - big, cost], axis=1)
        labels = _ssp(cost2, np.concatenate([lo, cap - lo]), order)
        return labels % k
    return _ssp(cost, cap, order)


def _ssp(cost: np.ndarray, cap: np.ndarray, order) -> np.ndarray:
    n, k = cost.shape
    labels = np.full(n, -1, np.int64)
    count = np.zeros(k, np.int64)
    # W[a, b] = min over members j of a of cost[j, b] - cost[j, a]; arg[a, b] = that j
    W = np.full((k, k), np.inf)
    arg = np.full((k, k), -1, np.int64)
    members = [[] for _ in range(k)]  # lists, rebuilt lazily
    stale = np.zeros(k, bool)

    def refresh(a):
        idx = np.flatnonzero(labels == a)
        members[a] = idx
        stale[a] = False
        if len(idx) == 0:
            W[a] = np.inf
            arg[a] = -1
        else:
            d = cost[idx] - cost[idx, a][:, None]
            j = d.argmin(0)
            W[a] = d[j, np.arange(k)]
            arg[a] = idx[j]
        W[a, a] = np.inf

    def add(j, a):
        labels[j] = a
        count[a] += 1
        d = cost[j] - cost[j, a]
        better = d < W[a]
        better[a] = False
        W[a, better] = d[better]
        arg[a, better] = j

    order = np.arange(n) if order is None else np.asarray(order)
    nearest = cost.argmin(1)
    tol = 1e-9 * (float(np.abs(cost).max()) + 1.0) if n else 0.0   # rounding noise must not look like a gain
    # Bulk start: for each cluster, the first cap[a] points (in `order`) whose cheapest cluster is a go straight there.
    # Every point then sits in its cheapest cluster, which is trivially optimal, so the successive-shortest-path
    # invariant holds for the remaining (overflow) points, inserted one at a time below.
    near_o = nearest[order]
    rank = np.empty(n, np.int64)
    for a in range(k):
        pos = np.flatnonzero(near_o == a)
        rank[pos] = np.arange(len(pos))
    direct = rank < cap[near_o]
    labels[order[direct]] = near_o[direct]
    count[:] = np.bincount(labels[labels >= 0], minlength=k)
    for a in range(k):
        refresh(a)
    for i in order[~direct]:
        a0 = nearest[i]
        if count[a0] < cap[a0]:
            add(i, a0)
            continue
        for a in np.flatnonzero(stale):
            refresh(a)
        # Bellman-Ford from the new point over the cluster graph
        dist = cost[i].copy()
        pred = np.full(k, -1, np.int64)
        for _ in range(k):
            cand = dist[:, None] + W          # via a -> b
            best_a = cand.argmin(0)
            best = cand[best_a, np.arange(k)]
            upd = best < dist - tol
            if not upd.any():
                break
            dist[upd] = best[upd]
            pred[upd] = best_a[upd]
        free = count < cap
        dfree = np.where(free, dist, np.inf)
        b = int(dfree.argmin())
        # walk back: chain of moves ending in b
        path = [b]
        while pred[path[-1]] >= 0:
            path.append(int(pred[path[-1]]))
            if len(path) > k + 1:
                raise RuntimeError("balanced_assign: negative cycle (numerical trouble in cost)")
        path.reverse()                      # path[0] = cluster the new point enters
        moves = [(int(arg[path[t], path[t + 1]]), path[t], path[t + 1]) for t in range(len(path) - 1)]
        for j, a, bb in moves:
            count[a] -= 1
            stale[a] = True
            add(j, bb)
        add(i, path[0])
        for j, a, bb in moves:
            stale[a] = True
    return labels


def price_assign(cost: np.ndarray, size_min, size_max, sweeps: int = 50):
    """Fast approximate balanced assignment: labels = argmin_k cost[i,k] + p_k with per-cluster prices p adjusted
    until every size is within [size_min, size_max] (auction-style: an over-full cluster raises its price just enough
    to push out its surplus, an under-full one lowers it just enough to pull in its deficit). Returns labels, or
    None when the prices do not settle within `sweeps` rounds. Used for the intermediate Lloyd steps of
    `balanced_kmeans`; the final assignment is always the exact `balanced_assign`."""
    n, k = cost.shape
    lo = np.broadcast_to(np.asarray(size_min, np.int64), (k,))
    hi = np.broadcast_to(np.asarray(size_max, np.int64), (k,))
    p = np.zeros(k)
    eps = 1e-9 * (float(np.abs(cost).max()) + 1.0)
    rows = np.arange(n)
    for _ in range(sweeps):
        done = True
        for a in range(k):
            c = cost + p
            lab = c.argmin(1)
            cnt = int((lab == a).sum())
            if cnt > hi[a]:
                inside = lab == a
                other = np.where(np.arange(k)[None, :] == a, np.inf, c[inside]).min(1)
                margin = np.sort(other - c[inside, a])
                p[a] += margin[cnt - hi[a] - 1] + eps
                done = False
            elif cnt < lo[a]:
                out = lab != a
                gap = np.sort(c[out, a] - c[rows[out], lab[out]])
                p[a] -= gap[lo[a] - cnt - 1] + eps
                done = False
        if done:
            lab = (cost + p).argmin(1)
            cnt = np.bincount(lab, minlength=k)
            if np.all(cnt >= lo) and np.all(cnt <= hi):
                return lab
    return None


def kmeans_pp_init(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (squared-distance sampling). x: [N, D] -> centroids [k, D]."""
    n = x.shape[0]
    c = [x[rng.integers(n)]]
    d2 = ((x - c[0]) ** 2).sum(1)
    for _ in range(1, k):
        p = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        c.append(x[rng.choice(n, p=p)])
        d2 = np.minimum(d2, ((x - c[-1]) ** 2).sum(1))
    return np.stack(c)


def balanced_kmeans(x, k: int, seed: int = 0, iters: int = 100, size_min=None, size_max=None,
                    metric: str = "l2", n_init: int = 1):
    """k-means whose cluster sizes lie in [size_min, size_max] (exactly N/k each when both are None).

    x: [N, D]. metric "l2" (squared Euclidean) or "cos" (1 - cosine similarity; centroids normalised).
    Returns (labels int64 [N], centroids float64 [k, D], inertia). Deterministic for a seed.
    """
    x = np.asarray(x, dtype=np.float64)
    n = x.shape[0]
    if k < 1:
        raise ValueError(f"num_experts: {k} must be >= 1")
    if size_min is None and size_max is None:
        if n % k:
            raise ValueError(f"num_experts: {k} does not divide the number of points ({n}); "
                             "an exactly balanced split needs it to")
        size_min = size_max = n // k
    size_min = 0 if size_min is None else size_min
    size_max = n if size_max is None else size_max
    if metric not in ("l2", "cos"):
        raise ValueError(f"metric: {metric!r} is not one of 'l2', 'cos'")
    xs = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12) if metric == "cos" else x
    rng = np.random.default_rng(seed)
    best = None
    for _ in range(n_init):
        c = kmeans_pp_init(xs, k, rng)
        labels = None
        for _ in range(iters):
            cost = _cost(xs, c, metric)
            new = price_assign(cost, size_min, size_max) if size_max > size_min else None
            if new is None:
                new = balanced_assign(cost, size_max, size_min)
            if labels is not None and np.array_equal(new, labels):
                break
            labels = new
            for e in range(k):
                m = labels == e
                if m.any():
                    c[e] = xs[m].mean(0)
            if metric == "cos":
                c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        cost = _cost(xs, c, metric)
        labels = balanced_assign(cost, size_max, size_min)     # exact final assignment for the final centroids
        inertia = float(cost[np.arange(n), labels].sum())
        if best is None or inertia < best[2]:
            best = (labels.copy(), c.copy(), inertia)
    return best


def _cost(x, c, metric):
    if metric == "cos":
        return 1.0 - x @ c.T
    return (x * x).sum(1)[:, None] - 2.0 * x @ c.T + (c * c).sum(1)[None, :]
