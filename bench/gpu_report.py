"""The report of a bench/gpu_check.sh run: WORK (its work folder) -> OUT/report.md, report.json, logs.tgz and, when
the benchmarks drew one, speedups.png. At most these four files, whatever happened: every stage may have failed,
been cut or not run.

    python -m bench.gpu_report WORK OUT [--mode full|dry] [--budget 420] [--elapsed SECONDS]

report.md starts with the output of ``python -m rim_fast.info`` (or its error line) and the machine line
(bench.common.machine_line), then the preflight's verdict, the stage table (time box, seconds used, exit code: 124 =
cut by its time box), the tests, the end-to-end benchmarks (bench.report) and the prewarm. report.json holds the
same facts. logs.tgz packs the work folder (logs, junit XML, raw results), without the saved reference tensors.
Needs no torch.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tarfile
import xml.etree.ElementTree as ET

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("preflight", "build", "tests", "conv_ab", "bench", "bench_compiled")
#: a log bigger than this travels as its last MAX_LOG bytes (logs.tgz must stay far below 16 MiB)
MAX_LOG = 4 * 2 ** 20


def _read(path: str, default: str = "") -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return default


def meaning(code, note: str = "") -> str:
    if code is None:
        return f"not run ({note})" if note else "not run"
    if note:
        return note
    return {0: "ok", 124: "cut by its time box (SIGINT): what finished is reported",
            137: "killed (SIGKILL) after its time box: nothing written after the kill",
            130: "interrupted", 5: "no tests collected"}.get(code, "failed")


def stages(work: str) -> list:
    """The stage table: stages.tsv (name, exit code or "-", seconds, box, note) in order; stages missing from it
    (the script died first) are listed as not run."""
    rows = []
    for line in _read(os.path.join(work, "stages.tsv")).splitlines():
        parts = line.split("\t")
        if len(parts) < 4:
            continue
        name, code, seconds, box = parts[:4]
        note = parts[4] if len(parts) > 4 else ""
        code = None if code == "-" else int(code)
        rows.append({"name": name, "box_s": int(box), "seconds": int(seconds), "exit_code": code,
                     "meaning": meaning(code, note)})
    seen = {r["name"] for r in rows}
    rows += [{"name": s, "box_s": None, "seconds": None, "exit_code": None, "meaning": "not run (no record)"}
             for s in STAGES if s not in seen]
    return rows


def info(work: str) -> dict:
    """rim_fast.info's output, or the error line that replaces it."""
    text, err = _read(os.path.join(work, "info.txt")).rstrip(), _read(os.path.join(work, "info.err")).strip()
    rc = _read(os.path.join(work, "info.rc")).strip()
    if rc == "0" and text:
        return {"ok": True, "text": text}
    if not rc:
        line = "python -m rim_fast.info did not run"
    else:
        last = (err.splitlines() or text.splitlines() or ["no output"])[-1].strip()
        why = "timed out" if rc in ("124", "137") else f"exit {rc}"
        line = f"python -m rim_fast.info failed ({why}): {last}"
    return {"ok": False, "text": line[:500]}


def tests(work: str) -> dict:
    path = os.path.join(work, "tests.xml")
    if not os.path.exists(path):
        return {"ran": False}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        return {"ran": False, "error": f"tests.xml unreadable: {err}"}
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed, skipped = [], {}
    for case in root.iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        problem = case.find("failure")
        if problem is None:
            problem = case.find("error")
        if problem is not None:
            failed.append({"name": name, "message": (problem.get("message") or "").strip()[:300]})
        sk = case.find("skipped")
        if sk is not None:
            reason = (sk.get("message") or "").strip()
            skipped[reason] = skipped.get(reason, 0) + 1
    log = _read(os.path.join(work, "tests.log"))
    durations = []
    if "slowest" in log:
        block = log[log.index("slowest"):].splitlines()[1:]
        durations = [line.strip() for line in block if re.match(r"\s*\d+\.\d+s ", line)][:15]
    counts.update(ran=True, passed=counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
                  failed=failed, skipped_reasons=skipped, slowest=durations)
    return counts


def prewarm(work: str) -> list:
    jobs = []
    for line in _read(os.path.join(work, "prewarm", "prewarm.jsonl")).splitlines():
        try:
            jobs.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return jobs


def bench(work: str, out: str, folder: str = "bench") -> dict | None:
    """The results of one benchmark pass (WORK/FOLDER/status.jsonl), None when it wrote none; its chart to OUT for
    the first pass."""
    status = os.path.join(work, folder, "status.jsonl")
    if not os.path.exists(status):
        return None
    sys.path.insert(0, ROOT)
    from bench.report import load, markdown
    summary = load(status)
    summary["markdown"] = markdown(summary)
    if folder != "bench":
        return summary
    chart = os.path.join(work, "bench", "speedups.png")
    if os.path.exists(chart):
        shutil.copy(chart, os.path.join(out, "speedups.png"))
    return summary


def pack_logs(work: str, path: str) -> list:
    """logs.tgz of the work folder: every file but the reference tensors (*.pt); big logs as their tail."""
    names = []
    with tarfile.open(path, "w:gz") as tar:
        for dirpath, dirnames, filenames in os.walk(work):
            dirnames.sort()
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, work)
                if name.endswith((".pt", ".tmp")) or not os.path.isfile(full):
                    continue
                size = os.path.getsize(full)
                tarinfo = tarfile.TarInfo(os.path.join("logs", rel))
                with open(full, "rb") as f:
                    if size > MAX_LOG:
                        f.seek(size - MAX_LOG)
                    data = f.read()
                tarinfo.size = len(data)
                tarinfo.mtime = int(os.path.getmtime(full))
                tar.addfile(tarinfo, io.BytesIO(data))
                names.append(rel + (" (tail)" if size > MAX_LOG else ""))
    return names


def write(work: str, out: str, mode: str = "full", budget: int = 420, elapsed: int | None = None) -> dict:
    os.makedirs(out, exist_ok=True)
    facts = {"mode": mode, "budget_s": budget, "elapsed_s": elapsed, "work": work}
    facts["info"] = info(work)
    facts["machine"] = (_read(os.path.join(work, "machine.txt")).strip().splitlines() or
                        ["machine: unknown (the preflight did not write it)"])[0]
    try:
        facts["preflight"] = json.loads(_read(os.path.join(work, "preflight.json"), "{}"))
    except json.JSONDecodeError:
        facts["preflight"] = {}
    if not facts["preflight"]:
        last = (_read(os.path.join(work, "preflight.log")).strip().splitlines() or ["no output"])[-1]
        facts["preflight"] = {"ok": False, "reason": f"the preflight wrote no result (cut or crashed): {last}"}
    facts["stages"] = stages(work)
    facts["exit_codes"] = {s["name"]: s["exit_code"] for s in facts["stages"]}
    facts["arch_list"] = _read(os.path.join(work, "arch_list.txt")).strip() or None
    facts["tests"] = tests(work)
    # the logs first: whatever fails below, they come back
    facts["logs"] = pack_logs(work, os.path.join(out, "logs.tgz"))
    passes = {}
    for folder in ("bench", "bench_compiled"):
        try:
            passes[folder] = (bench(work, out, folder), None)
        except Exception as err:  # noqa: BLE001 - a malformed results file must not cost the rest of the report
            passes[folder] = (None, f"{type(err).__name__}: {err}")
    facts["prewarm"] = prewarm(work)

    pre = facts["preflight"]
    lines = [facts["info"]["text"], facts["machine"], "", f"# rim_fast GPU check ({mode} mode)", ""]
    if pre.get("ok"):
        collect = next((c["detail"] for c in pre.get("checks", []) if c["name"] == "collect"), "")
        lines.append(f"Preflight: ok in {pre.get('seconds', 0):.1f} s; {collect}.")
    else:
        lines.append(f"**Preflight FAILED**: {pre.get('reason')}")
    notes = [c for c in pre.get("checks", []) if not c["ok"] and not c["fatal"]]
    lines += [f"- note, {c['name']}: {c['detail']}" for c in notes]
    if facts["arch_list"]:
        lines.append(f"- {facts['arch_list']}")
    lines += ["", "| stage | box s | used s | exit code | meaning |", "| --- | ---: | ---: | ---: | --- |"]
    for s in facts["stages"]:
        fmt = lambda v: "-" if v is None else str(v)  # noqa: E731
        lines.append(f"| {s['name']} | {fmt(s['box_s'])} | {fmt(s['seconds'])} | {fmt(s['exit_code'])} | "
                     f"{s['meaning']} |")
    if elapsed is not None:
        lines += ["", f"{elapsed} s from the start to the report, of a {budget} s budget."]

    t = facts["tests"]
    lines += ["", "## Tests (`pytest -m cuda`)", ""]
    if t.get("ran"):
        lines.append(f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped "
                     f"(of {t['tests']} run).")
        lines += [f"- FAILED {f['name']}: {f['message']}" for f in t["failed"]]
        lines += [f"- skipped x{n}: {reason}" for reason, n in t["skipped_reasons"].items()]
        if t["slowest"]:
            lines += ["", "Slowest:", ""] + [f"    {d}" for d in t["slowest"]]
    elif facts["exit_codes"].get("tests") is None:
        lines.append(next(s["meaning"] for s in facts["stages"] if s["name"] == "tests").capitalize() + ".")
    else:
        lines.append(t.get("error") or "No junit report (pytest was killed before writing it): see tests.log in "
                                        "logs.tgz.")

    lines += ["", "## Convolution A/B: layout, bias fold, stride-2 padding (bench/conv_ab.py)", ""]
    facts["conv_ab"] = None
    try:
        ab = json.loads(_read(os.path.join(work, "conv_ab.json"), "null"))
        if ab:
            sys.path.insert(0, ROOT)
            from bench.conv_ab import markdown as ab_markdown
            lines += ab_markdown(ab)
            facts["conv_ab"] = ab
        else:
            lines.append(next(s["meaning"] for s in facts["stages"] if s["name"] == "conv_ab").capitalize()
                         + ": no results.")
    except Exception as err:  # noqa: BLE001 - a malformed results file must not cost the rest of the report
        lines.append(f"**The results could not be read** ({type(err).__name__}: {err}): conv_ab.json and "
                     "conv_ab.log are in logs.tgz.")

    titles = {"bench": "## End to end (bench/bench_rim.py)",
              "bench_compiled": "## End to end, compiled: rim.compile() and torch.compile of torch_rim, beside both "
                                "eager (bench/bench_rim.py)"}
    for folder, title in titles.items():
        summary, bench_error = passes[folder]
        lines += ["", title, ""]
        if bench_error is not None:
            facts[f"{folder}_error"] = bench_error
            lines.append(f"**The results could not be read** ({bench_error}): {folder}/status.jsonl is in logs.tgz.")
            continue
        if summary is None:
            lines.append("No results (the stage did not run or was cut before its first case).")
            continue
        md = summary.pop("markdown").splitlines()
        # its machine line is already at the top, and this section has its title
        body = [line for line in md[1:] if not line.startswith("# ")]
        while body and not body[0]:
            body.pop(0)
        lines += body
        facts[folder] = summary
        compiled = [r for r in summary["rows"] if r["provider"] == "rim_fast_compiled" and r.get("cudagraph_skips")]
        if compiled and mode == "full":
            lines.insert(lines.index(title) + 2, "**rim_fast_compiled skipped CUDA graphs** in: "
                         + ", ".join(f"{r['workload']} {r['mode']}" for r in compiled) + ".\n")

    jobs = facts["prewarm"]
    lines += ["", "## Prewarm (untimed, beside the build and the tests)", ""]
    if jobs:
        lines += ["| job | workload | mode | provider | status | seconds |", "| --- | --- | --- | --- | --- | ---: |"]
        lines += [f"| {j.get('job')} | {j.get('workload')} | {j.get('mode')} | {j.get('provider') or '-'} | "
                  f"{str(j.get('status'))[:120]} | {j.get('seconds', 0):.1f} |" for j in jobs]
        lines += ["", "Compile seconds here are cold compilations under the build's and the tests' load; the bench's "
                      "first-call times load what they left in Inductor's caches."]
    else:
        lines.append("No job finished.")
    removed = _read(os.path.join(work, "removed_empty_so.txt")).split()
    facts["removed_empty_so"] = removed
    if removed:
        lines += ["", f"Removed {len(removed)} empty .so file(s) from Inductor's cache: C++ compilations cut by a stop "
                      "(a later load of the same kernel would fail on them)."]

    facts["files"] = ["report.md", "report.json", "logs.tgz"] + (
        ["speedups.png"] if os.path.exists(os.path.join(out, "speedups.png")) else [])
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(facts, f, indent=1, default=str)
    return facts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("work")
    parser.add_argument("out")
    parser.add_argument("--mode", choices=("full", "dry"), default="full")
    parser.add_argument("--budget", type=int, default=420)
    parser.add_argument("--elapsed", type=int, default=None)
    args = parser.parse_args(argv)
    facts = write(args.work, args.out, args.mode, args.budget, args.elapsed)
    md = _read(os.path.join(args.out, "report.md")).splitlines()
    print("\n".join(md[:60]))
    print(f"report: {', '.join(facts['files'])} in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
