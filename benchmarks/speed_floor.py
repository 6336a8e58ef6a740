"""The best any physically consistent speed model can do on a measured grid: `benchmarks/speed_model.py --grid`.

A grid's own noise bounds every model scored on it. `noise_floor` answers, whatever the constants: the
smallest largest error of any prediction that obeys three physical facts (fp16 is never faster than bf16;
a micro-batch never costs less than a smaller one; checkpointing only adds work), and the fewest pairs
measured more than MARGIN apart that every such prediction orders wrongly (a small MILP, needs scipy).
"""

from __future__ import annotations

MARGIN = 0.15  # pairs whose measured times differ by less than this are not counted as ordered wrongly
SCALER_SLACK = 0.05  # how much slower than bf16 fp16 may be in the noise floor's second figure (see noise_floor)


def noise_floor(rows: list[dict], label: list[str]) -> list[str]:
    """What no physically consistent prediction can beat on this grid, whatever its constants.

    Three facts hold for any model of these loops: fp16 does bf16's work plus GradScaler's (an inf check over
    the gradients and a scale update, no host synchronisation with a fused optimizer: `torch.amp.GradScaler
    .step`), so fp16 >= bf16 for the same model, checkpointing and micro-batch; a micro-batch never costs less
    than a smaller one (the same kernels and operators on more tokens), so step(m) <= 2 x step(2m), and
    step(2m) <= step(m) (fewer micro-batches, the same work); checkpointing only adds work. These are
    difference constraints on log step times, so "is there a prediction within +-e of every row that obeys
    them?" is a shortest-path question (Bellman-Ford: feasible iff no negative cycle); bisection on e gives
    the smallest largest error. Each model's fp32 micro-batch = batch row is held exact, so the figure is
    also the floor of the ratio error. Twin rows measured >15% apart with fp16 the faster are ordered
    wrongly by every such prediction."""
    import math

    key = {(r["model"], r["ckpt"], r["prec"], r["micro"]): i for i, r in enumerate(rows)}
    physical: list[tuple[int, int, float]] = []  # (i, j, c): log p_i - log p_j <= c
    for i, r in enumerate(rows):
        bf16 = key.get((r["model"], r["ckpt"], "bf16", r["micro"]))
        if r["prec"] == "fp16" and bf16 is not None:
            physical.append((bf16, i, 0.0))
        double = key.get((r["model"], r["ckpt"], r["prec"], r["micro"] * 2))
        if double is not None:
            physical += [(i, double, math.log(2)), (double, i, 0.0)]
        plain = key.get((r["model"], False, r["prec"], r["micro"]))
        if r["ckpt"] and plain is not None:
            physical.append((plain, i, 0.0))

    def feasible(e: float, slack: float | None) -> bool:
        n = len(rows)
        edges = [(j, i, c) for i, j, c in physical]  # x_i <= x_j + c: an edge j -> i of weight c
        if slack is not None:
            edges += [(j, i, math.log1p(slack)) for j, i, c in physical  # x_fp16 <= x_bf16 + log(1 + slack)
                      if c == 0.0 and rows[i]["prec"] == "fp16" and rows[j]["prec"] == "bf16"]
        for i, r in enumerate(rows):  # node n is the origin: lo_i <= x_i <= hi_i
            exact = r["prec"] == "fp32" and not r["ckpt"] and r["micro"] == r["batch"]
            lo, hi = (math.log(r["step_s"]),) * 2 if exact else (math.log(r["step_s"] * (1 - e)), math.log(r["step_s"] * (1 + e)))
            edges += [(n, i, hi), (i, n, -lo)]
        dist = [0.0] * (n + 1)
        for _ in range(n + 1):
            changed = False
            for u, v, w in edges:
                if dist[u] + w < dist[v] - 1e-12:
                    dist[v], changed = dist[u] + w, True
            if not changed:
                return True
        return False

    def floor(slack: float | None) -> float:
        lo, hi = 0.0, 0.99
        for _ in range(30):
            lo, hi = (lo, (lo + hi) / 2) if feasible((lo + hi) / 2, slack) else ((lo + hi) / 2, hi)
        return hi

    forced = [(label[i], label[j]) for j, i, c in physical if c == 0.0 and rows[i]["prec"] == "fp16"
              and rows[j]["prec"] == "bf16" and rows[i]["step_s"] * (1 + MARGIN) < rows[j]["step_s"]]
    lines = [f"noise floor: no prediction with fp16 >= bf16 (same work plus GradScaler's), step(m) <= 2 x step(2m) and "
             f"checkpointing >= not has a largest error below {floor(None):.1%} ({floor(SCALER_SLACK):.1%} if fp16 is "
             f"also at most {SCALER_SLACK:.0%} slower than bf16); every one orders these {len(forced)} twin pair(s) "
             f"(measured >{MARGIN:.0%} apart, fp16 the faster) wrongly" + "".join(f"\n  {a} < {b}" for a, b in forced)]
    fewest = _fewest_wrong_pairs(rows, label, physical)
    if fewest is not None:
        lines.append(f"noise floor: the fewest wrongly ordered pairs any such prediction can have: {len(fewest)}"
                     + "".join(f"\n  {a} < {b}" for a, b in fewest))
    return lines


def _fewest_wrong_pairs(rows: list[dict], label: list[str], physical: list[tuple[int, int, float]]) -> list | None:
    """The smallest set of pairs (measured >15% apart) that every prediction obeying `physical` orders wrongly
    or ties: a mixed-integer program (one binary per pair, "this pair may be wrong"), solved by scipy's HiGHS.
    None without scipy."""
    try:
        import numpy as np
        from scipy.optimize import Bounds, LinearConstraint, milp
    except ImportError:
        return None
    n = len(rows)
    pairs = [(a, b) for a in range(n) for b in range(n) if rows[a]["step_s"] * (1 + MARGIN) < rows[b]["step_s"]]
    if not pairs:
        return []
    size, big, strict = n + len(pairs), 10.0, 1e-4
    matrix, upper = [], []
    for i, j, c in physical:  # x_i - x_j <= c
        row = np.zeros(size)
        row[i], row[j] = 1, -1
        matrix.append(row)
        upper.append(c)
    for k, (a, b) in enumerate(pairs):  # x_a - x_b <= -strict, unless pair k is given up (z_k = 1)
        row = np.zeros(size)
        row[a], row[b], row[n + k] = 1, -1, -big
        matrix.append(row)
        upper.append(-strict)
    logs = np.log([r["step_s"] for r in rows])
    lower_bound = np.concatenate([logs - 3, np.zeros(len(pairs))])
    upper_bound = np.concatenate([logs + 3, np.ones(len(pairs))])
    cost = np.concatenate([np.zeros(n), np.ones(len(pairs))])
    integrality = np.concatenate([np.zeros(n), np.ones(len(pairs))])
    result = milp(cost, constraints=LinearConstraint(np.array(matrix), -np.inf, np.array(upper)),
                  integrality=integrality, bounds=Bounds(lower_bound, upper_bound), options={"time_limit": 60})
    if result.x is None:
        return None
    return [(label[a], label[b]) for k, (a, b) in enumerate(pairs) if result.x[n + k] > 0.5]

