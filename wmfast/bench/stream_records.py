"""The JSON-lines test reports the `wmfast.bench.pytest_stream` plugin writes, read back without pytest: the
records (`read_records`), their counts (`tally`) and a JUnit XML document that marks the tests that never ran
(`junit_xml`)."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET


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
