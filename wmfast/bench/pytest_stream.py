"""A pytest plugin that writes every test report to a JSON-lines file the moment pytest has it.

    python -m pytest -p wmfast.bench.pytest_stream --stream-report tests.jsonl ...

pytest's own reports (the failure section, --junitxml) are written when the session ends; a session that is
killed at a time limit (a GPU lease) leaves neither. This file survives: one line per collected test list and
per report, flushed at once. Under pytest-xdist only the controller writes (the workers' reports reach it).
`junit_xml(records)` turns the lines into a JUnit XML document afterwards, marking the tests that never ran.
"""
from __future__ import annotations

import json
import time
import xml.etree.ElementTree as ET

import pytest


def pytest_addoption(parser):
    parser.addoption("--stream-report", default=None, metavar="PATH",
                     help="append one JSON line per test report to PATH as soon as it arrives")


class _Stream:
    def __init__(self, path: str):
        self.f = open(path, "a", buffering=1)  # noqa: SIM115 - open for the session, closed at its end

    def write(self, record: dict) -> None:
        self.f.write(json.dumps(record) + "\n")
        self.f.flush()

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session):
        if session.items:  # under pytest-xdist the controller collects nothing: the hook below reports instead
            self.write({"event": "collected", "nodeids": [item.nodeid for item in session.items],
                        "time": time.time()})

    @pytest.hookimpl(optionalhook=True)
    def pytest_xdist_node_collection_finished(self, node, ids):
        """Each xdist worker's collection (the same list on every worker: tally() de-duplicates)."""
        self.write({"event": "collected", "nodeids": list(ids), "time": time.time()})

    def pytest_runtest_logreport(self, report):
        failed_setup = report.when != "call" and report.outcome != "passed"
        if report.when != "call" and not failed_setup:
            return
        longrepr = ""
        if report.outcome != "passed":
            longrepr = (report.longreprtext or "")[-6000:]  # the end of a traceback says the most
        self.write({"event": "report", "nodeid": report.nodeid, "when": report.when, "outcome": report.outcome,
                    "duration": round(report.duration, 3), "longrepr": longrepr,
                    "worker": getattr(getattr(getattr(report, "node", None), "gateway", None), "id", None),
                    "time": time.time()})

    def pytest_sessionfinish(self, session, exitstatus):
        self.write({"event": "finished", "exitstatus": int(exitstatus), "time": time.time()})
        self.f.close()


def pytest_configure(config):
    path = config.getoption("stream_report", None)
    if path and not hasattr(config, "workerinput"):  # the xdist controller, or a run without xdist
        config.pluginmanager.register(_Stream(path), "wmfast-stream-report")


def read_records(path) -> list[dict]:
    records = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except ValueError:  # a line cut by a kill mid-write
                    continue
    except OSError:
        pass
    return records


def tally(records: list[dict]) -> dict:
    """Counts (collected, passed, failed, skipped, not run) and the failures [(nodeid, longrepr)]."""
    collected: dict[str, None] = {}  # ordered set
    outcome: dict[str, str] = {}
    failures = []
    for r in records:
        if r.get("event") == "collected":
            collected.update(dict.fromkeys(r["nodeids"]))
        elif r.get("event") == "report":
            if r["outcome"] == "failed" and outcome.get(r["nodeid"]) != "failed":
                failures.append((r["nodeid"], r.get("longrepr", "")))
            if outcome.get(r["nodeid"]) != "failed":
                outcome[r["nodeid"]] = r["outcome"]
    counts = {k: sum(1 for o in outcome.values() if o == k) for k in ("passed", "failed", "skipped")}
    counts["collected"] = len(collected)
    counts["not run"] = len([n for n in collected if n not in outcome])
    finished = any(r.get("event") == "finished" for r in records)
    return {**counts, "failures": failures, "finished": finished}


def junit_xml(suites: dict[str, list[dict]]) -> str:
    """One <testsuite> per name; tests that were collected but never reported get a <skipped> "not run"."""
    root = ET.Element("testsuites")
    for name, records in suites.items():
        t = tally(records)
        suite = ET.SubElement(root, "testsuite", name=name, tests=str(t["collected"]), failures=str(t["failed"]),
                              skipped=str(t["skipped"] + t["not run"]), errors="0")
        if not t["finished"]:
            props = ET.SubElement(suite, "properties")
            ET.SubElement(props, "property", name="cut_off", value="the session was stopped at its time budget")
        seen: dict[str, dict] = {}
        for r in records:
            if r.get("event") == "report" and seen.get(r["nodeid"], {}).get("outcome") != "failed":
                seen[r["nodeid"]] = r
        collected = [n for r in records if r.get("event") == "collected" for n in r["nodeids"]]
        for nodeid in dict.fromkeys(collected + list(seen)):  # xdist: every worker reports the same list
            path, _, test = nodeid.partition("::")
            case = ET.SubElement(suite, "testcase", classname=path.removesuffix(".py").replace("/", "."), name=test,
                                 time=str(seen.get(nodeid, {}).get("duration", 0)))
            r = seen.get(nodeid)
            if r is None:
                ET.SubElement(case, "skipped", message="not run: the session was stopped at its time budget")
            elif r["outcome"] == "failed":
                ET.SubElement(case, "failure", message=f"failed in {r['when']}").text = r.get("longrepr", "")
            elif r["outcome"] == "skipped":
                ET.SubElement(case, "skipped", message=(r.get("longrepr") or "skipped")[-300:])
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
