"""Summarise a bench/gpu_check.sh output folder into report.md and report.json."""
from __future__ import annotations

import glob
import json
import os
import sys
import xml.etree.ElementTree as ET


def _tests(path: str) -> dict:
    if not os.path.exists(path):
        return {"ran": False}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(name)
        sk = case.find("skipped")
        if sk is not None:
            reason = (sk.get("message") or "").strip()
            skipped[reason] = skipped.get(reason, 0) + 1
    counts.update(ran=True, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                  failed=failed, skipped_reasons=skipped)
    return counts


def _benchmarks(out: str) -> dict:
    result = {}
    for path in sorted(glob.glob(os.path.join(out, "bench_*.json"))):
        with open(path) as f:
            data = json.load(f)
        rows = []
        for b in data.get("benchmarks", []):
            rows.append({"name": b["name"], "median_ms": b["stats"]["median"] * 1e3,
                         "iqr_ms": b["stats"]["iqr"] * 1e3, "extra": b.get("extra_info", {})})
        result[os.path.basename(path)[:-5]] = rows
    return result


def main(out: str, mode: str) -> None:
    stages = {}
    if os.path.exists(os.path.join(out, "stages.txt")):
        for line in open(os.path.join(out, "stages.txt")):
            if "=" in line:
                k, v = line.strip().split("=", 1)
                stages[k] = int(v)
    machine = open(os.path.join(out, "machine.txt")).read().strip() if os.path.exists(
        os.path.join(out, "machine.txt")) else "unknown"
    tests = _tests(os.path.join(out, "tests.xml"))
    benches = _benchmarks(out)
    report = {"machine": machine, "mode": "dry" if mode == "--dry" else "full", "stages": stages,
              "tests": tests, "benchmarks": benches}
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    lines = [f"# rim_fast GPU check ({report['mode']})", "", machine, "",
             "| stage | exit code |", "| --- | --- |"]
    notes = {0: "ok", 124: "ran out of its time: interrupted, the cases that finished are reported",
             137: "killed at its time limit (nothing written after the kill)"}
    lines[-2:] = ["| stage | exit code | meaning |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v} | {notes.get(v, 'failed')} |" for k, v in stages.items()]
    if tests.get("ran"):
        lines += ["", f"Tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
                      f"{tests['skipped']} skipped (of {tests['tests']})."]
        lines += [f"- FAILED {name}" for name in tests["failed"]]
        lines += [f"- skipped x{n}: {reason}" for reason, n in tests["skipped_reasons"].items()]
    for name, rows in benches.items():
        lines += ["", f"## {name}", "", "| case | median ms | IQR ms | extra |", "| --- | --- | --- | --- |"]
        for r in rows:
            extra = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r["extra"].items()
                              if k != "machine")
            lines.append(f"| {r['name']} | {r['median_ms']:.3f} | {r['iqr_ms']:.3f} | {extra} |")
    rim_md = os.path.join(out, "rim", "report.md")
    if os.path.exists(rim_md):
        lines += ["", "## End to end (bench/bench_rim.py)", "", open(rim_md).read()]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines[:40]))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "full")
