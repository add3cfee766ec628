"""Balanced assignment (n neurons -> R experts of n/R each), three exact solvers: scipy's
Jonker-Volgenant on the column-repeated n x n matrix, the transportation LP (HiGHS) on the n x R
matrix, and moecarve's cycle cancelling on the R-expert graph (`balanced_assignment`), from
scratch and warm-started from the optimum of a slightly different matrix, as in a k-means step.

    python benchmarks/assignment_solvers.py    # writes results/carve/assignment_solvers.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import scipy
from scipy.optimize import linear_sum_assignment, linprog
from scipy.sparse import coo_matrix, vstack

from moecarve.carve.partition import balanced_assignment

RESULTS = Path(__file__).resolve().parents[1] / "results"  # the repository's, from any directory

# (routed neurons, routed experts): SmolLM2-135M S1A2E8, a 1B-class S1A2E8, Llama-2-7B S1A2E8 and S2A2E16.
LP_MAX_NEURONS = 5000
SIZES = [(1344, 7), (4928, 7), (9632, 7), (9632, 14)]


def jonker_volgenant(cost: np.ndarray, size: int) -> np.ndarray:
    _, cols = linear_sum_assignment(np.repeat(cost, size, axis=1))
    return cols // size


def transportation_lp(cost: np.ndarray, size: int) -> np.ndarray:
    n, r = cost.shape
    var = np.arange(n * r)
    rows = coo_matrix((np.ones(n * r), (np.repeat(np.arange(n), r), var)), shape=(n, n * r))
    cols = coo_matrix((np.ones(n * r), (np.tile(np.arange(r), n), var)), shape=(r, n * r))
    b = np.r_[np.ones(n), np.full(r, size)]
    result = linprog(cost.ravel(), A_eq=vstack([rows, cols]), b_eq=b, bounds=(0, 1), method="highs")
    return result.x.reshape(n, r).argmax(1)  # a vertex of this totally unimodular LP is integral


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=str(RESULTS / "carve/assignment_solvers.json"))
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for n, r in SIZES:
        # k-means-like costs: distances of neurons to centroids, correlated across experts.
        cost = rng.standard_normal((n, 1)) + 0.3 * rng.standard_normal((n, r))
        row = {"neurons": n, "experts": r}
        # a k-means step moves the centroids a little: the previous optimum is the warm start
        previous = balanced_assignment(cost + 0.05 * rng.standard_normal((n, r)), n // r)
        for name, solver in (
            ("jonker_volgenant", jonker_volgenant),
            ("transportation_lp", transportation_lp),
            ("cycle_cancelling", balanced_assignment),
            ("cycle_cancelling_warm", lambda c, size, start=previous: balanced_assignment(c, size, start)),
        ):
            if name == "transportation_lp" and n > LP_MAX_NEURONS:
                row[f"{name}_seconds"] = None  # 88 s already at 4,928 neurons: not worth the wait
                continue
            started = time.perf_counter()
            labels = solver(cost, n // r)
            row[f"{name}_seconds"] = round(time.perf_counter() - started, 3)
            row[f"{name}_cost"] = float(cost[np.arange(n), labels].sum())
            assert np.all(np.bincount(labels, minlength=r) == n // r)
            assert np.isclose(row[f"{name}_cost"], row["jonker_volgenant_cost"], rtol=1e-12), row
        rows.append(row)
        print(row, flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"benchmark": "assignment_solvers", "scipy": scipy.__version__, "rows": rows}, indent=2)
        + "\n"
    )


if __name__ == "__main__":
    main()
