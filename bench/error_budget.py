"""The error budget of the fast paths on a whole RIM, as numbers: for every configuration of
tests/test_error_budget.py (and the case where the lost digit was first seen: 2D 16x16, B=1, RMSProp), the use of
the budget by ``RIM_FAST_BACKEND=auto`` and ``kernels``, i.e. for the worst tensor (trajectory, loss, every
parameter gradient) err(fast) / (2 err(float32 reference) + 1e-6), errors against a float64 run relative to the
tensor's largest magnitude; at most 1 is within budget (tests/conftest.py holds the table).

    python -m bench.error_budget                     # this tree
    PYTHONPATH=/path/to/other/tree python bench/error_budget.py    # another revision's rim_fast, same cases

Prints one row per case and the worst use per backend.
"""
from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from conftest import BUDGET_FACTOR, BUDGET_SLACK, relative_error  # noqa: E402  (sets TRITON_INTERPRET first)
from test_error_budget import CONFIGS, _run, score_fn  # noqa: E402

import torch  # noqa: E402

import rim_fast  # noqa: E402

CASES = [(p.id, p.values[0], p.values[1], {}) for p in CONFIGS]
CASES.append(("2D-16x16-B1-RMSPROP", 2, dict(score_fn=score_fn, score_preprocessing_method="RMSPROP"),
              dict(size=(16, 16), batch=1)))


def budget_use(fast, reference, exact, names):
    """(use, tensor name, its error) of the tensor that uses most of the float32 budget."""
    slack = BUDGET_SLACK[torch.float32]
    return max((relative_error(a, e) / (BUDGET_FACTOR * relative_error(r, e) + slack), n, relative_error(a, e))
               for n, a, r, e in zip(names, fast, reference, exact))


def main() -> None:
    print(f"rim_fast from {os.path.dirname(rim_fast.__file__)}")
    worst = {}
    for case_id, dims, kw, extra in CASES:
        names, exact = _run(dims, kw, torch.float64, "reference", **extra)
        _, reference = _run(dims, kw, torch.float32, "reference", **extra)
        row = [f"{case_id:24s}", f"reference {max(relative_error(r, e) for r, e in zip(reference, exact)):.1e}"]
        for backend in ("auto", "kernels"):
            _, fast = _run(dims, kw, torch.float32, backend, **extra)
            use = budget_use(fast, reference, exact, names)
            worst[backend] = max(worst.get(backend, (0.0, "", 0.0)), use + (case_id,))
            row.append(f"{backend} {use[0]:7.2f} (err {use[2]:.1e}, {use[1]})")
        print(" | ".join(row), flush=True)
    for backend, (use, name, err, case_id) in worst.items():
        print(f"worst {backend}: {use:.2f} of the budget ({case_id}, {name}, error {err:.1e})")


if __name__ == "__main__":
    main()
