"""What a lease leaves behind, re-runnable from its run directory: junit.xml, launch_configs.json and summary.md
(`summarize`, `write_summary`), the table printed last (`final_table`), and the packed copy (`pack`)."""
from __future__ import annotations

import tarfile
from pathlib import Path


def summarize(out: Path) -> None:
    """junit.xml, launch_configs.json, the plots and summary.md from what the stages wrote (re-runnable)."""
    from wmfast.bench import adopt, report, stream_records
    from wmfast.bench.results import read_rows

    suites = {name: stream_records.read_records(out / f"{name}.jsonl") for name in ("tests", "tests-cuda")
              if (out / f"{name}.jsonl").exists()}
    if suites:
        (out / "junit.xml").write_text(stream_records.junit_xml(suites))
    if (out / "results.csv").exists():
        adopt.write_table(adopt.choose(read_rows(out / "results.csv")), out / "launch_configs.json")
        report.write_report(out)
    else:
        write_summary(out)


def write_summary(out: Path) -> None:
    """summary.md alone (the text, no plots): after the last stage, whose own row summarize() could not see."""
    from wmfast.bench import report

    if (out / "results.csv").exists():
        (out / "summary.md").write_text(report.summary_markdown(out))
    else:  # no bench stage wrote a row: the lease's own section is the whole summary
        (out / "summary.md").write_text("# wmfast lease\n\n" + "\n".join(report.lease_lines(out)))


def final_table(out: Path) -> str:
    from wmfast.bench import report

    return "\n" + "\n".join(report.lease_lines(out)) + "\n"


def pack(out: Path, dest: Path) -> None:
    """dest/<gpu>-<run>.tar.gz of the run directory, and its summary.md and lease.log beside it."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    name = f"{out.parent.name}-{out.name}"
    with tarfile.open(dest / f"{name}.tar.gz", "w:gz") as tar:
        tar.add(out, arcname=name)
    for f in ("summary.md", "lease.log"):
        if (out / f).exists():
            shutil.copy(out / f, dest / f)
    print(f"packed {out} -> {dest / (name + '.tar.gz')}")
