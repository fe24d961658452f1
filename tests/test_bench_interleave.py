"""bench/bench_rim.py times a group's providers interleaved, round by round (A B C A B C ...), after each one's
warm-up, until a minimum count and a minimum time; bench/report.py marks a case whose IQR exceeds 10% of its
median as noisy, in its row and in one closing line, and reports the providers cut with an interrupted group."""
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("RIM_FAST_BENCH_DEVICE", "cpu")

from bench import bench_rim  # noqa: E402
from bench.report import load, markdown  # noqa: E402


class _Fake(bench_rim._Case):
    """A provider whose call logs its name (and sleeps ``seconds``)."""

    def __init__(self, name, calls, seconds=0.0):
        super().__init__(name)

        def step():
            calls.append(name)
            if seconds:
                import time
                time.sleep(seconds)
        self.step = step


def test_rounds_are_interleaved_with_a_minimum_count_and_time(monkeypatch):
    monkeypatch.setattr(bench_rim, "ROUNDS", 0)
    monkeypatch.setattr(bench_rim, "MIN_ROUNDS", 3)
    monkeypatch.setattr(bench_rim, "MAX_ROUNDS", 50)
    monkeypatch.setattr(bench_rim, "MIN_SECONDS", 0.05)
    monkeypatch.setattr(bench_rim, "BUDGET_S", 10.0)
    calls = []
    cases = [_Fake("A", calls, 0.01), _Fake("B", calls), _Fake("C", calls)]
    bench_rim._interleave(cases)
    rounds = len(calls) // 3
    assert calls == ["A", "B", "C"] * rounds
    # B and C take no time: the minimum time keeps them going past the minimum count, up to the cap
    assert rounds == 50 and all(len(c.times) == 50 for c in cases)
    calls.clear()
    monkeypatch.setattr(bench_rim, "MIN_SECONDS", 0.0)
    cases = [_Fake("A", calls), _Fake("B", calls)]
    bench_rim._interleave(cases)
    assert calls == ["A", "B"] * 3
    # RIM_FAST_BENCH_ROUNDS: exactly that many rounds
    calls.clear()
    monkeypatch.setattr(bench_rim, "ROUNDS", 2)
    bench_rim._interleave([_Fake("A", calls), _Fake("B", calls)])
    assert calls == ["A", "B", "A", "B"]


def test_a_group_warms_every_provider_up_before_the_interleaved_rounds(monkeypatch):
    """_run_group: each provider's setup (build, warm-up calls, check call) runs first, in order; then the timed
    rounds alternate A B C; one that fails its setup is reported and left out of the rounds."""
    monkeypatch.setattr(bench_rim, "ROUNDS", 0)
    monkeypatch.setattr(bench_rim, "MIN_ROUNDS", 4)
    monkeypatch.setattr(bench_rim, "MAX_ROUNDS", 4)
    monkeypatch.setattr(bench_rim, "reference", lambda workload, mode: None)
    calls = []

    def setup(case, workload, mode):
        if case.provider == "rim_fast_compiled":
            raise RuntimeError("cannot compile")
        calls.append(f"warm-up {case.provider}")
        case.step = lambda: calls.append(case.provider)
        case.info["check_ok"] = True
    monkeypatch.setattr(bench_rim, "_setup_case", setup)
    providers = ["torch_rim", "rim_fast_reference", "rim_fast_compiled", "rim_fast"]
    outcomes = bench_rim._run_group("S2", "predict", providers)
    assert calls[:3] == ["warm-up torch_rim", "warm-up rim_fast_reference", "warm-up rim_fast"]
    assert calls[3:] == ["torch_rim", "rim_fast_reference", "rim_fast"] * 4
    status, payload = outcomes["rim_fast_compiled"]
    assert status == "error" and payload["reason"] == "RuntimeError: cannot compile"
    for p in ("torch_rim", "rim_fast_reference", "rim_fast"):
        status, payload = outcomes[p]
        assert status == "ok" and payload["stats"]["rounds"] == 4 and payload["info"]["check_ok"]
    assert bench_rim._IN_FLIGHT == {"outcomes": {}, "cases": []}


def test_a_failing_call_leaves_the_rounds(monkeypatch):
    monkeypatch.setattr(bench_rim, "ROUNDS", 3)
    calls = []
    bad = _Fake("B", calls)

    def boom():
        calls.append("B")
        raise RuntimeError("boom")
    bad.step = boom
    cases = [_Fake("A", calls), bad, _Fake("C", calls)]
    bench_rim._interleave(cases)
    assert calls == ["A", "B", "C", "A", "C", "A", "C"]
    assert len(bad.times) == 0 and [len(c.times) for c in (cases[0], cases[2])] == [3, 3]
    with pytest.raises(RuntimeError, match="boom"):
        bench_rim._finish_case(bad)
    status, payload = bench_rim._failure(bad.error, 0.0)
    assert status == "error" and payload["reason"] == "RuntimeError: boom" and "boom()" not in payload["reason"]
    assert "in boom" in payload["traceback"]  # the failing call's frame, as text


def test_summary_spread():
    quiet = bench_rim.summarize([1.0, 1.01, 1.02, 0.99, 1.0])
    assert not quiet["noisy"] and quiet["spread"] < 0.1
    busy = bench_rim.summarize([1.0, 1.5, 0.8, 1.3, 1.0])
    assert busy["noisy"] and busy["spread"] > 0.1


def _record(provider, median, iqr, ok=True):
    return {"workload": "S2", "mode": "predict", "provider": provider, "device": "cpu", "status": "ok", "reason": "",
            "stats": {"median": median, "iqr": iqr, "q1": median - iqr / 2, "q3": median + iqr / 2, "min": median,
                      "max": median, "mean": median, "rounds": 5},
            "info": {"baseline": "torch_rim", "arch": "Hourglass", "dims": 2, "size": [64, 64], "batch": 16,
                     "channels": 1, "T": 10, "check_ok": ok, "check_err": {"predict": 0.0},
                     "check_tol": {"predict": 1e-5}}}


def _status(tmp_path, records, planned=()):
    run = {"kind": "run", "machine": "machine: test", "settings": {"device": "cpu", "T": 10, "order": "interleaved"},
           "planned": [list(c) for c in planned]}
    path = tmp_path / "status.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [run, *records]))
    return str(path)


def test_report_marks_noisy_cases(tmp_path):
    summary = load(_status(tmp_path, [_record("torch_rim", 1.0, 0.02), _record("rim_fast", 0.7, 0.14)]))
    md = markdown(summary)
    noisy = next(line for line in md.splitlines() if line.startswith("| S2 | predict | rim_fast |"))
    quiet = next(line for line in md.splitlines() if line.startswith("| S2 | predict | torch_rim |"))
    assert "**noisy**: IQR 20% of the median" in noisy and "noisy" not in quiet
    assert "1.43x" in noisy  # still computed, with the mark beside it
    closing = [line for line in md.splitlines() if "rerun on a quiet machine" in line]
    assert len(closing) == 1 and "S2 predict rim_fast" in closing[0]
    assert "one call each per round" in md
    md_quiet = markdown(load(_status(tmp_path, [_record("torch_rim", 1.0, 0.02)])))
    assert "rerun on a quiet machine" not in md_quiet


def test_report_of_an_interrupted_group(tmp_path, monkeypatch):
    """A time box cuts S2 predict during its rounds: each provider gets an interrupted line (the one whose setup
    failed keeps its error), the rounds timed so far stay apart from the results, the next group is not reached."""
    planned = [("S2", "predict", p) for p in ("torch_rim", "rim_fast", "rim_fast_compiled")]
    planned.append(("S1", "predict", "torch_rim"))
    path = _status(tmp_path, [], planned)
    monkeypatch.setenv("RIM_FAST_BENCH_STATUS", path)
    calls = []
    timed = _Fake("torch_rim", calls)
    timed.times = [1.0, 1.1]
    monkeypatch.setitem(bench_rim._IN_FLIGHT, "cases", [timed, _Fake("rim_fast", calls)])
    monkeypatch.setitem(bench_rim._IN_FLIGHT, "outcomes",
                        {"rim_fast_compiled": bench_rim._failure(RuntimeError("no compiler"), 3.0)})
    bench_rim._log_interrupted("S2", "predict", [p for _, _, p in planned[:3]])
    with open(path) as f:
        records = [json.loads(line) for line in f][1:]
    assert [r["provider"] for r in records] == ["torch_rim", "rim_fast", "rim_fast_compiled"]
    assert records[0]["partial_stats"]["rounds"] == 2 and "stats" not in records[0]
    rows = {(r["workload"], r["provider"]): r for r in load(path)["rows"]}
    assert rows[("S2", "torch_rim")]["status"] == "interrupted"
    assert "after 2 interleaved round(s)" in rows[("S2", "torch_rim")]["reason"]
    assert rows[("S2", "torch_rim")]["median_ms"] is None
    assert rows[("S2", "rim_fast")]["status"] == "interrupted" and "setup" in rows[("S2", "rim_fast")]["reason"]
    assert rows[("S2", "rim_fast_compiled")]["status"] == "error"
    assert rows[("S2", "rim_fast_compiled")]["reason"] == "RuntimeError: no compiler"
    assert rows[("S1", "torch_rim")]["status"] == "not reached"
