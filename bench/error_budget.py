"""The error budget of the fast paths on a whole RIM, as numbers: for every configuration of
tests/test_error_budget.py (and the case where the lost digit was first seen: 2D 16x16, B=1, RMSProp), the use of
the budget by ``RIM_FAST_BACKEND=auto`` and ``kernels``, i.e. for the worst tensor (trajectory, loss, every
parameter gradient) err(fast) / (2 err(float32 reference) + 1e-6), errors against a float64 run relative to the
tensor's largest magnitude, each the root mean square over the test's draws of weights and data
(``test_error_budget.DRAWS``), as the test takes them; at most 1 is within budget (tests/conftest.py holds the
table).

    python -m bench.error_budget                     # this tree
    PYTHONPATH=/path/to/other/tree python bench/error_budget.py    # another revision's rim_fast, same cases
    python -m bench.error_budget --seeds 0-39 --cases 1D-score    # a sweep over weights and data

Prints one row per case and the worst use per backend. The sweep takes each of ``--seeds`` as one draw (weights
from the seed, data from seed + 1; the tests' draws are seeds 0-3) for the cases whose id starts with one of
``--cases``, prints each draw's use of a one-draw budget, and adds a control: the float32 reference with oneDNN
off, i.e. the same arithmetic summed in another order, measured against the reference's budget. The control's use
is the metric's own noise: where a tensor's largest element is a small sum of larger terms (a bias gradient), every
order of summation loses digits of it, and one draw's share of the budget is a ratio of two such losses.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

# conftest sets TRITON_INTERPRET first
from conftest import errors_over_draws  # noqa: E402
from test_error_budget import CONFIGS, DRAWS, _draws, _reference_runs, _run, score_fn  # noqa: E402

import torch  # noqa: E402

import rim_fast  # noqa: E402

CASES = [(p.id, p.values[0], p.values[1], {}) for p in CONFIGS]
CASES.append(("2D-16x16-B1-RMSPROP", 2, dict(score_fn=score_fn, score_preprocessing_method="RMSPROP"),
              dict(size=(16, 16), batch=1)))


def budget_use_over_draws(draws, names):
    """(use, tensor name, its rms error) of the tensor that uses most of the float32 budget over ``draws``
    [(fast, reference, exact)] (conftest.errors_over_draws, the test's measure)."""
    return max((f / allowed, name, f) for name, f, _, allowed in errors_over_draws(draws, torch.float32, names))


def _seeds(text: str) -> list:
    """'0-39' or '0,3,23' -> the seeds."""
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def sweep(seeds, patterns) -> None:
    """Budget use per seed of ``auto``, ``kernels`` and the control, then per case its median and maximum, and how
    many seeds went over 1."""
    cases = [c for c in CASES if c[0].startswith(tuple(patterns))] if patterns else CASES
    for case_id, dims, kw, extra in cases:
        uses = {"auto": [], "kernels": [], "control": []}
        for seed in seeds:
            names, exact, reference = _reference_runs(dims, kw, seed, **extra)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # flags() also sets oneDNN's TF32 flag, and torch warns on it
                with torch.backends.mkldnn.flags(enabled=False):
                    _, control = _run(dims, kw, torch.float32, "reference", seed=seed, **extra)
            row = [f"{case_id:24s} seed {seed:3d}"]
            for backend in ("auto", "kernels", "control"):
                fast = control if backend == "control" else _run(dims, kw, torch.float32, backend, seed=seed,
                                                                   **extra)[1]
                use = budget_use_over_draws([(fast, reference, exact)], names)  # one draw
                uses[backend].append(use[0])
                row.append(f"{backend} {use[0]:5.2f} ({use[1]})")
            print(" | ".join(row), flush=True)
        print(f"{case_id}, {len(seeds)} seeds: " + " | ".join(
            f"{b} median {statistics.median(u):.2f} max {max(u):.2f} over 1: {sum(x > 1 for x in u)}"
            for b, u in uses.items()), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", help="sweep these seeds ('0-39', '0,3,23'): see the module's docstring")
    parser.add_argument("--cases", default="", help="with --seeds: comma-separated prefixes of case ids "
                                                    "(default: every case)")
    args = parser.parse_args()
    print(f"rim_fast from {os.path.dirname(rim_fast.__file__)}")
    if args.seeds:
        sweep(_seeds(args.seeds), [p for p in args.cases.split(",") if p])
        return
    worst = {}
    for case_id, dims, kw, extra in CASES:
        row, reference_error = [f"{case_id:24s}"], None
        for backend in ("auto", "kernels"):
            names, draws = _draws(dims, kw, backend, **extra)
            if reference_error is None:
                reference_error = max(r for _, _, r, _ in errors_over_draws(draws, torch.float32, names))
                row.append(f"reference {reference_error:.1e}")
            use = budget_use_over_draws(draws, names)
            worst[backend] = max(worst.get(backend, (0.0, "", 0.0)), use + (case_id,))
            row.append(f"{backend} {use[0]:7.2f} (err {use[2]:.1e}, {use[1]})")
        print(" | ".join(row), flush=True)
    for backend, (use, name, err, case_id) in worst.items():
        print(f"worst {backend}: {use:.2f} of the budget ({case_id}, {name}, error {err:.1e}; rms over draws "
              f"{', '.join(map(str, DRAWS))})")


if __name__ == "__main__":
    main()
