"""A pytest plugin that writes every test report to a JSON-lines file the moment pytest has it.

    python -m pytest -p wmfast.bench.pytest_stream --stream-report tests.jsonl ...

pytest's own reports (the failure section, --junitxml) are written when the session ends; a session that is
killed at a time limit (a GPU lease) leaves neither. This file survives: one line per collected test list and
per report, flushed at once. Under pytest-xdist only the controller writes (the workers' reports reach it).
Reading the lines back (`read_records`, `tally`, `junit_xml`) is `wmfast.bench.stream_records`, which needs no
pytest: reports are written on machines that run no tests.
"""
from __future__ import annotations

import json
import time

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
