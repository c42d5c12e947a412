"""Reports from a results directory (benchmarks/results/<gpu>/): summary.md, PNG plots, the README headline.

Everything here reads the files a run wrote (results.csv, attention_memory.csv, status.json), so a report
can be regenerated from a committed results directory with `wmfast bench --summarize DIR`; no number is
ever typed by hand.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from wmfast.bench import figures
from wmfast.bench.results import read_rows, slug

QUICK_NOTE = ", --quick (CPU smoke test: tiny shapes, not performance numbers)"


def _f(row: dict, key: str) -> float | None:
    v = row.get(key, "")
    return float(v) if v not in ("", None) else None


def is_wmfast(provider: str) -> bool:
    """wmfast's own providers are named "wmfast...", "triton..." or "cuda..." (convention in
    wmfast/bench/context.py); the rest (torch, torch.compile, sdpa, flash-attn, liger, ...) are baselines."""
    return provider.startswith(("wmfast", "triton", "cuda"))


def _op_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r["op"].startswith("ceiling:") and r["op"] != "attention-memory"]


def headline_rows(rows: list[dict]) -> list[dict]:
    """Per (op, mode) at its largest measured shape (largest baseline time): best wmfast provider vs best
    baseline. Ops without a wmfast provider or without a baseline are left out."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in _op_rows(rows):
        groups[(r["op"], r["mode"], r["shape"])].append(r)
    best: dict[tuple, dict] = {}
    for (op, mode, shape), rs in groups.items():
        ours = [r for r in rs if is_wmfast(r["provider"]) and _f(r, "median_ms")]
        base = [r for r in rs if not is_wmfast(r["provider"]) and _f(r, "median_ms")]
        if not ours or not base:
            continue
        o, b = min(ours, key=lambda r: _f(r, "median_ms")), min(base, key=lambda r: _f(r, "median_ms"))
        entry = {"op": op, "mode": mode, "shape": shape, "ours": o, "base": b,
                 "speedup": _f(b, "median_ms") / _f(o, "median_ms")}
        if (op, mode) not in best or _f(b, "median_ms") > _f(best[(op, mode)]["base"], "median_ms"):
            best[(op, mode)] = entry
    return list(best.values())


def headline_table(out_dir: str | Path) -> str:
    """The README's headline table (markdown) from a results directory, with the GPU and date it was measured on."""
    out_dir = Path(out_dir)
    rows = read_rows(out_dir / "results.csv")
    if not rows:
        raise ValueError(f"{out_dir / 'results.csv'} holds no rows")
    first = rows[0]
    lines = [(f"Measured on {first['gpu_name']} (driver {first['driver'] or '-'}, torch {first['torch']}, triton "
             f"{first['triton']}, CUDA {first['cuda']}) on {first['timestamp'][:10]}, commit {first['commit']}:"), "",
             ("| op | mode | shape | wmfast | ms | best baseline | ms | speedup | wmfast of roofline "
             "| peak MiB (wmfast / base) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for h in headline_rows(rows):
        o, b = h["ours"], h["base"]
        frac = _f(o, "fraction_of_ceiling")
        lines.append(f"| {h['op']} | {h['mode']} | {h['shape']} | {o['provider']} | {o['median_ms']} | "
                     f"{b['provider']} | {b['median_ms']} | {h['speedup']:.2f}x | "
                     f"{'-' if frac is None else f'{100 * frac:.0f}%'} | "
                     f"{o['peak_mem_mb'] or '-'} / {b['peak_mem_mb'] or '-'} |")
    am = out_dir / "attention_memory.csv"
    if am.exists():
        from wmfast.bench.attention_memory import read_ratio_csv

        key = [r for r in read_ratio_csv(am) if r["T"] == 5 and r["impl"] == "eager" and r["mode"] in ("fwd", "saved")]
        key = [r for r in key if r["S"] == 1024] or key
        for r in key[:2]:
            lines.append(f"\nAttention memory, factorized / full at T=5, S={r['S']} (eager, {r['mode']}): measured "
                         f"{100 * r['measured_ratio']:.2f}% vs formula {100 * r['formula_ratio']:.2f}%.")
    return "\n".join(lines) + "\n"


def _ceiling_lines(rows: list[dict]) -> list[str]:
    lines = ["| ceiling | shape | median ms | GB/s | TFLOP/s |", "|---|---|---|---|---|"]
    for r in rows:
        if r["op"].startswith("ceiling:"):
            lines.append(f"| {r['op'][8:]} ({r['mode']}) | {r['shape']} | {r['median_ms']} | {r['gbps'] or '-'} | "
                         f"{r['tflops'] or '-'} |")
    return lines


def _result_lines(rows: list[dict]) -> list[str]:
    lines = []
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        if not r["op"].startswith("ceiling:"):
            by_op[r["op"]].append(r)
    for op, rs in by_op.items():
        plot = [] if op == "attention-memory" else [f"![{op}]({plot_name(op)})", ""]
        lines += ["", f"### {op}", "", *plot,
                  "| shape | provider | mode | median ms | p20-p80 ms | GB/s | TFLOP/s | of roofline | peak MiB |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in rs:
            frac = _f(r, "fraction_of_ceiling")
            lines.append(f"| {r['shape']} | {r['provider']} | {r['mode']} | {r['median_ms']} | {r['p20_ms']}-"
                         f"{r['p80_ms']} | {r['gbps'] or '-'} | {r['tflops'] or '-'} | "
                         f"{'-' if frac is None else f'{100 * frac:.1f}%'} | {r['peak_mem_mb'] or '-'} |")
    return lines


def summary_markdown(out_dir: str | Path) -> str:
    out_dir = Path(out_dir)
    rows = read_rows(out_dir / "results.csv") if (out_dir / "results.csv").exists() else []
    status = json.loads((out_dir / "status.json").read_text()) if (out_dir / "status.json").exists() else {}
    env = status.get("environment") or (rows[0] if rows else {})
    when = rows[0]["timestamp"] if rows else "?"
    lines = [f"# wmfast benchmarks: {env.get('gpu_name', '?')}", "",
             (f"Measured {when} on {env.get('gpu_name', '?')} (driver {env.get('driver') or '-'}), torch "
             f"{env.get('torch', '?')}, triton {env.get('triton', '?')}, CUDA {env.get('cuda', '?')}, commit "
             f"{env.get('commit', '?')}{QUICK_NOTE if status.get('quick') else ''}."
             " Generated by `wmfast bench`; do not edit by hand."), ""]
    lines += lease_lines(out_dir)
    if status.get("statuses"):
        lines += ["## Suites", "", "| suite | script | status | seconds | note |", "|---|---|---|---|---|"]
        lines += [f"| {s['suite']} | {s['script']} | {s['status']} | {s['seconds']:.1f} | {s['message']} |"
                  for s in status["statuses"]]
        lines.append("")
    lines += ["## Ceilings (measured in this run)", ""] + _ceiling_lines(rows) + [""]
    heads = headline_rows(rows)
    if heads:
        lines += ["## Headline", "", headline_table(out_dir)]
    am = out_dir / "attention_memory.csv"
    if am.exists():
        from wmfast.bench.attention_memory import ratio_table, read_ratio_csv

        ratio_rows = read_ratio_csv(am)
        lines += ["## Attention memory: factorized / full", "",
                  (f"Peak memory above the inputs ({ratio_rows[0]['method'] if ratio_rows else '?'}); "
                  "'saved' = bytes autograd keeps for backward. Formula: (T S^2 + S T^2) / (T S)^2; "
                  "max-of-steps: max(T S^2, S T^2) / (T S)^2, the peak when the two steps run one after the "
                  "other. fwd+bwd peaks also hold the q/k/v gradients (linear in T S D), which the formula "
                  "leaves out. Details: wmfast/bench/attention_memory.py."), "",
                  *ratio_table(ratio_rows), "", "![attention memory](attention_memory.png)", "",
                  "The design card's table (wmfast.bench.attention_memory):", "", _seed_table(), ""]
        fits = [f"{r['provider'].removeprefix('st-transformer-')} attention: {r['shape']}" for r in rows
                if r["op"] == "largest-batch"]
        if fits:
            lines += ["Largest batch that fits a training step: " + "; ".join(fits) + ".", ""]
    tele = status.get("telemetry") or {}
    if tele:
        lines += ["## GPU telemetry during the run (min / median / max)", ""]
        lines += [f"- {k}: {v['min']:.0f} / {v['median']:.0f} / {v['max']:.0f}" for k, v in tele.items()]
        lines.append("")
    lines += ["## All results"] + _result_lines(rows)
    return "\n".join(lines) + "\n"


def _seed_table() -> str:
    from wmfast.bench.attention_memory import attention_memory_table, format_memory_table

    return format_memory_table(attention_memory_table(5, 1024))


def plot_name(op: str) -> str:
    return f"plot_{slug(op)}.png"


def plot_results(rows: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per op: median ms (p20-p80 error bars) per provider, grouped by shape and mode; marked as not GPU
    performance when the rows were measured on a CPU (their gpu_name)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    off_gpu = any(figures.recorded_off_gpu(r.get("gpu_name")) for r in rows)
    by_op: dict[str, list[dict]] = defaultdict(list)
    for r in _op_rows(rows):
        by_op[r["op"]].append(r)
    paths = []
    for op, rs in by_op.items():
        groups = list(dict.fromkeys((r["shape"], r["mode"]) for r in rs))
        provs = list(dict.fromkeys(r["provider"] for r in rs))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(groups) * max(1, len(provs)) / 2), 4))
        width = 0.8 / len(provs)
        for i, p in enumerate(provs):
            pts = [(g, next((r for r in rs if (r["shape"], r["mode"]) == g and r["provider"] == p), None))
                   for g in groups]
            xs = [j + i * width for j, (_, r) in enumerate(pts) if r]
            med = [_f(r, "median_ms") for _, r in pts if r]
            err = [[m - (_f(r, "p20_ms") or m) for (_, r), m in zip([q for q in pts if q[1]], med)],
                   [(_f(r, "p80_ms") or m) - m for (_, r), m in zip([q for q in pts if q[1]], med)]]
            ax.bar(xs, med, width, yerr=err, label=p, capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
        ax.set_xticklabels([f"{s}\n{m}" for s, m in groups], fontsize=7, rotation=20, ha="right")
        meds = [_f(r, "median_ms") for r in rs if _f(r, "median_ms")]
        if meds and max(meds) > 30 * min(meds):  # providers orders of magnitude apart: linear bars hide the fast
            ax.set_yscale("log")
        ax.set_ylabel("median ms (p20-p80)")
        ax.set_title(op)
        ax.legend(fontsize=7)
        path = figures.save_figure(fig, out_dir / plot_name(op), off_gpu=off_gpu, dpi=110)
        paths.append(path)
    return paths


def write_report(out_dir: str | Path) -> Path:
    """(Re)write summary.md and the per-op plots of a results directory; returns summary.md's path."""
    out_dir = Path(out_dir)
    if not (out_dir / "results.csv").exists():
        raise FileNotFoundError(f"{out_dir} has no results.csv: not a `wmfast bench` results directory")
    plot_results(read_rows(out_dir / "results.csv"), out_dir)
    am = out_dir / "attention_memory.csv"
    if am.exists() and not (out_dir / "attention_memory.png").exists():
        from wmfast.bench.attention_memory import plot_ratios, read_ratio_csv

        plot_ratios(read_ratio_csv(am), out_dir / "attention_memory.png")
    path = out_dir / "summary.md"
    path.write_text(summary_markdown(out_dir))
    return path


README_BEGIN, README_END = "<!-- results:begin -->", "<!-- results:end -->"


def readme_block(out_dir: str | Path) -> str:
    """What the README holds between its results markers: where the table comes from, and the table."""
    out_dir = Path(out_dir)
    try:
        shown = out_dir.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        shown = out_dir
    return (f"Generated from `{shown.as_posix()}/` by `wmfast bench --summarize {shown.as_posix()} --readme "
            f"README.md`; its summary.md has every row, the plots and the tests.\n\n{headline_table(out_dir)}")


def update_readme(readme: str | Path, out_dir: str | Path) -> None:
    """Replace the README's text between README_BEGIN and README_END with readme_block(out_dir)."""
    readme = Path(readme)
    text = readme.read_text()
    if text.count(README_BEGIN) != 1 or text.count(README_END) != 1 or text.index(README_BEGIN) > text.index(README_END):
        raise ValueError(f"--readme {readme}: needs exactly one '{README_BEGIN}' line followed by one '{README_END}' line")
    head, rest = text.split(README_BEGIN)
    _, tail = rest.split(README_END)
    readme.write_text(f"{head}{README_BEGIN}\n{readme_block(out_dir)}{README_END}{tail}")


def newest_run(results_root: str | Path) -> Path | None:
    """The results directory under results_root (benchmarks/results/) whose rows were measured last."""
    best = None
    for csv_path in Path(results_root).glob("*/*/results.csv"):
        rows = read_rows(csv_path)
        stamp = max((r["timestamp"] for r in rows if r.get("timestamp")), default="")
        if stamp and (best is None or stamp > best[0]):
            best = (stamp, csv_path.parent)
    return best[1] if best else None


def _last_line(text: str) -> str:
    """What a failure report says in one line: its first and last "E" lines (pytest's error lines), else its
    last line."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    errors = [ln.removeprefix("E").strip() for ln in lines if ln.startswith("E ")]
    if not errors:
        return (lines or [""])[-1][:300]
    said = errors[0] if len(errors) == 1 or errors[0] == errors[-1] else f"{errors[0]} ... {errors[-1]}"
    return said[:300]


def lease_lines(out_dir: str | Path) -> list[str]:
    """The lease's own section (markdown): stages, tests (failures with their last error line), chosen launch
    configurations. Empty without lease.json (a plain `wmfast bench` run)."""
    from wmfast.bench import stream_records

    out_dir = Path(out_dir)
    if not (out_dir / "lease.json").exists():
        return []
    state = json.loads((out_dir / "lease.json").read_text())
    lines = [(f"## Lease ({'dry run, CPU' if state.get('dry_run') else 'GPU'}): {state['elapsed_s']:.0f} s of a "
              f"{state['budget_s']:.0f} s budget; CUDA extension build: {state.get('build') or '-'}"), "",
             "| stage | budget s | seconds | outcome | note |", "|---|---|---|---|---|"]
    lines += [f"| {s['name']} | {s['budget_s']:.0f} | {s['seconds']:.0f} | {s['outcome']} | {s['note']} |"
              for s in state["stages"]]
    for name in ("tests", "tests-cuda"):
        records = stream_records.read_records(out_dir / f"{name}.jsonl")
        if not records:
            continue
        t = stream_records.tally(records)
        collected = (f"{t['collected']} collected" if t["collected"] else "collection not recorded")
        not_run = f", {t['not run']} not run" if t["collected"] else ""
        lines += ["", f"**{name}** (`pytest -m gpu`): {collected}, {t['passed']} passed, {t['failed']} failed, "
                  f"{t['skipped']} skipped{not_run}" + ("" if t["finished"] else " (stopped at its budget)") + "."]
        lines += [f"- FAILED `{nodeid}`: {_last_line(text)}" for nodeid, text in t["failures"]]
    configs = out_dir / "launch_configs.json"
    if configs.exists():
        table = json.loads(configs.read_text())
        if table.get("launch") or table.get("backend") or table.get("kept_defaults"):
            lines += ["", "Launch configurations from the sweeps (`wmfast bench --adopt` installs the adopted ones):",
                      ""]
            for section, verdict in (("launch", "adopted"), ("kept_defaults", "default kept")):
                for kernel, by_key in table.get(section, {}).items():
                    for key, cfg in by_key.items():
                        params = ", ".join(f"{k}={v}" for k, v in cfg.items() if k in ("block_r", "tile", "num_warps"))
                        dflt = (f" vs default {cfg['default']} {cfg['default_median_ms']} ms"
                                if "default_median_ms" in cfg else f" (default {cfg.get('default')})")
                        lines.append(f"- {verdict}: {kernel} [{key}]: {params} {cfg['median_ms']} ms (best of "
                                     f"{cfg['configs_timed']}){dflt}" + (f": {cfg['reason']}" if cfg.get("reason") else ""))
            for op, by_key in table.get("backend", {}).items():
                lines.append(f"- backend of {op}: {by_key.get('*')} (" + ", ".join(
                    f"{k}: {v}" for k, v in by_key.items() if k != "*") + ")")
    return lines + [""]
