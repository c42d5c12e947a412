"""The model-cost suite (`wmfast bench --suite model-cost`, benchmarks/bench_model_cost.py): per model preset, the
matmul FLOPs of a training sample, the activation bytes a token keeps in a layer and a sample keeps in the model,
the peak memory, largest tensor and kernel count of a training step, and a model of the largest micro-batch that
fits an H100, H200 and B200, with and without activation checkpointing. The methods are wmfast.bench.model_cost's.

It reports the new fused block ("1x-compression") beside the old one ("1x-compression-reference"); quick: "tiny"
and "tiny-reference". Outputs: model_cost.csv (preset, metric, value, unit, note), model_cost.md (a table a
person reads, also logged), and one row a preset in the harness CSV (op "model-cost", mode "train-step": the
instrumented step's time and its absolute peak, parameters and AdamW state included).

Profiles: quick (tiny presets, CPU, seconds; torch.compile skipped), lease (the real presets, ~60 s on a GPU;
compile skipped), full (compile included). On the CPU outside quick, the whole-model parts (sample bytes, the
step, compile) run at `depth` layers (default 2) of the real widths, and the bytes a sample keeps in the full
model are the measured ones plus the missing layers x the per-layer bytes; the report says so. On the CPU the
ops run on the pure-torch backend by default (`wmfast.ops.use_backend("torch")`): the interpreted Triton kernels
take minutes at the real shape. Under selective recomputation (the default) both backends hold the same tensors;
`--backend none` (the automatic choice: the interpreted kernels, what a GPU runs) checks it.
"""
from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from wmfast.bench import model_cost as mc
from wmfast.bench.timing import Measurement
from wmfast.bench.workloads import compression_batch

PARTS = ("layer", "sample", "step", "compile")
PRESETS = {"quick": ("tiny-reference", "tiny"), "lease": ("1x-compression-reference", "1x-compression"),
           "full": ("1x-compression-reference", "1x-compression")}
CSV_NAME, MD_NAME = "model_cost.csv", "model_cost.md"
CSV_COLUMNS = ("preset", "metric", "value", "unit", "note")


@dataclass
class Options:
    presets: tuple[str, ...]
    micro_batch: int
    depth: int | None  # layers of the whole-model parts (None: the preset's own)
    parts: tuple[str, ...]
    backend: str | None  # forced wmfast.ops backend (None: automatic)

    @classmethod
    def for_context(cls, ctx, *, presets=None, micro_batch=None, depth=None, parts=None, compile=None,
                    backend="auto") -> Options:
        """The profile's defaults, overridden by what is given (compile True/False adds/removes "compile")."""
        cpu = ctx.device.type != "cuda"
        given, parts = parts is not None, tuple(parts or PARTS)
        if compile is False or (compile is None and not given and ctx.profile != "full"):
            parts = tuple(p for p in parts if p != "compile")
        elif compile and "compile" not in parts:
            parts += ("compile",)
        if backend == "auto":
            backend = "torch" if cpu else None
        if micro_batch is None:  # GPU: bench_train's 8, which the old block fits on an 80 GB GPU (model: 16)
            micro_batch = 2 if ctx.quick else (1 if cpu else 8)
        if depth is None and cpu and not ctx.quick:  # 2 real-width layers + head: ~80 s a preset on 2 cores
            depth = 2
        return cls(tuple(presets or PRESETS[ctx.profile]), micro_batch, depth, parts, backend)


def _backend(name: str | None):
    if name is None:
        return contextlib.nullcontext()
    from wmfast.ops import use_backend

    return use_backend(name)


def _check_budget(ctx, what: str) -> None:
    if ctx.time_left() <= 0:
        from wmfast.bench.context import BudgetExhausted

        raise BudgetExhausted(f"the budget ran out before model-cost {what}")


def measure_preset(ctx, name: str, opts: Options, out: dict | None = None) -> dict:
    """Every measured part of one preset -> {metric: (value, unit, note)}, filled into `out` part by part (what
    was measured stays there when the budget runs out)."""
    from wmfast.models import STTransformerConfig, flops_per_sample
    from wmfast.models.st_transformer.config import param_count

    config = STTransformerConfig.from_name(name)
    L = config.num_layers
    depth = min(opts.depth or L, L)
    shallow = replace(config, num_layers=depth)
    out = {} if out is None else out
    out.update({"block": (config.block, "", ""), "recompute": (config.recompute, "", _recompute_note(config)),
                "params": (param_count(config), "", ""), "layers": (L, "", ""),
                "flops_per_sample": (flops_per_sample(config, training=True), "FLOP", "matmul FLOPs, fwd + bwd"),
                "backend": (opts.backend or "automatic", "", "wmfast.ops backend the measurements ran on")})
    layer = sample = None
    with _backend(opts.backend):
        if "layer" in opts.parts or "sample" in opts.parts:  # the sample's extrapolation needs the layer
            _check_budget(ctx, f"{name} layer")
            layer = mc.block_cost(_model(replace(config, num_layers=1), ctx.device), ctx.device)
            out.update(_layer_metrics(config, layer))
        if "sample" in opts.parts:
            _check_budget(ctx, f"{name} sample")
            sample = mc.sample_cost(_model(shallow, ctx.device), ctx.device)
            out.update(_sample_metrics(config, depth, layer, sample))
            # the GPU's loss head (Triton: 2 B a logit) whatever backend measured the activations
            # under whole-block checkpointing the trainer turns selective recomputation off: the block being
            # recomputed then holds what a recompute="none" block holds
            recomputed = (None if config.recompute == "none" else
                          mc.block_cost(_model(replace(config, num_layers=1, recompute="none"), ctx.device), ctx.device))
            out.update(_fit_metrics(mc.memory_model(config, param_count(config), layer, out["held_per_sample"][0],
                                                    layer_recomputed=recomputed)))
        if "step" in opts.parts:
            _check_budget(ctx, f"{name} step")
            out.update(_step_metrics(ctx, shallow, depth, L, opts.micro_batch, layer, sample, opts.backend))
        if "compile" in opts.parts and ctx.can_afford(60, f"model-cost {name} torch.compile"):
            out.update(_compile_metrics(ctx, shallow, opts.micro_batch))
        _free(ctx)
    return out


def _model(config, device):
    from wmfast.models import STTransformer

    torch.manual_seed(0)
    model = STTransformer(config).to(device)
    model.train()
    return model


def _free(ctx) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def _recompute_note(config) -> str:
    if config.recompute == "elementwise":
        return ("selective activation checkpointing inside each block (norms, activations, dropout recomputed): "
                "the hook method cannot see what it keeps")
    return "every activation saved"


def _layer_metrics(config, layer: mc.PerToken) -> dict:
    D = config.d_model
    shape = f"[B, {config.num_frames}, {config.seq_len}, {D}]"
    return {"residual_dtype": (str(layer.residual_dtype).removeprefix("torch."), "", "the block's output dtype"),
            "held_per_token_layer": (layer.held, "B", (f"held method, {layer.held / D:.2f} x D; block at {shape}, "
                                     "batch 2 - batch 1")),
            "hooked_per_token_layer": (layer.hooked, "B", f"saved_tensors_hooks method, {layer.hooked / D:.2f} x D"),
            "held_per_layer_sample": (layer.held_per_sample, "B", "held per token x T x S")}


def _sample_metrics(config, depth: int, layer: mc.PerToken, sample: mc.PerToken) -> dict:
    L = config.num_layers
    measured = sample.held_per_sample
    total = measured + (L - depth) * layer.held_per_sample
    where = f"whole model ({depth} of {L} layers), compression_loss forward, batch 2 - batch 1"
    note = ("measured: held_per_sample_measured" if depth == L else
            f"held_per_sample_measured + {L - depth} x held_per_layer_sample (the missing layers)")
    return {"held_per_sample_measured": (measured, "B", f"held method, {where}"),
            "hooked_per_sample_measured": (round(sample.hooked), "B", f"saved_tensors_hooks method, {where}"),
            "held_per_sample": (total, "B", note)}


def _fit_metrics(model: mc.MemoryModel) -> dict:
    parts = model.fixed_parts(model.chunk)  # a micro-batch that fills the loss head's chunk
    out = {"held_per_sample_ckpt": (model.per_sample_ckpt, "B", ("activation checkpointing: block inputs + one "
                                    "block's activations without selective recomputation + the head (model)")),
           "fixed_bytes": (sum(parts.values()), "B", "model: " + ", ".join(f"{k} {_bytes(v)}"
                                                                         for k, v in parts.items()))}
    for gpu, gib in mc.GPU_CAPACITY_GIB.items():
        for ckpt in (False, True):
            mb = model.largest_micro_batch(gib * 2**30, checkpointing=ckpt)
            key = f"max_micro_batch {gpu}{' ckpt' if ckpt else ''}"
            out[key] = (mb, "", f"model, {gib} GiB x (1 - {mc.MARGIN})")
    return out


def _step_metrics(ctx, shallow, depth: int, L: int, mb: int, layer, sample, backend) -> dict:
    step = mc.step_cost(shallow, mb, ctx.device)
    where = "" if depth == L else f" ({depth} of {L} layers)"
    size, op, shape = step.largest_tensor
    out = {"step_micro_batch": (mb, "", f"the step's micro-batch{where}"),
           "step_peak": (step.peak_bytes, "B", step.peak_method + where),
           "largest_tensor": (size, "B", f"{op} -> {list(shape)}"),
           "eager_ops_written": (step.ops_counted, "", "aten ops that write memory (CPU proxy for kernels)" + where)}
    if step.kernels is not None:
        out["eager_kernels"] = (step.kernels, "", "torch.profiler CUDA kernel events of one step" + where)
    if layer is not None and sample is not None:
        logit_bytes = mc.LOGIT_BYTES["torch" if backend == "torch" else "triton"]
        predicted = mc.memory_model(shallow, step.params, layer, sample.held_per_sample,
                                    logit_bytes=logit_bytes).peak(mb)
        out["predicted_step_peak"] = (predicted, "B", (f"memory model at the measured config{where}, loss head "
                                      f"{logit_bytes} B a logit ({backend or 'triton'} backend)"))
        out["predicted_over_measured"] = (predicted / step.peak_bytes, "", "model / measured peak")
    shape_s = (f"{shallow.num_layers}x{shallow.d_model} T={shallow.num_frames} S={shallow.seq_len} mb={mb} "
               f"bf16-autocast instrumented{where}")
    ms = step.seconds * 1e3  # one instrumented step: a record of the run, not a timing to compare
    ctx.writer.add("model-cost", shape_s, provider_name(shallow), "train-step",
                   Measurement(ms, ms, ms, peak_mem_bytes=step.peak_bytes, peak_mem_method="model-cost", reps=1))
    return out


def provider_name(config) -> str:
    """The harness row's provider: the block kind (neither is a "wmfast..." provider: no headline pairs them)."""
    return f"{config.block}-block{'-sac' if config.recompute == 'elementwise' else ''}"


def _compile_metrics(ctx, shallow, mb: int) -> dict:
    model, opt = mc.model_and_optimizer(shallow, ctx.device)
    batch = compression_batch(shallow, mb, ctx.device)
    compiled = torch.compile(model)
    counts = mc.compiled_kernel_counts(lambda: mc.train_step(compiled, opt, batch, ctx.device))
    out = {"compiled_generated_kernels": (counts["generated"], "", (f"Inductor kernels, fwd + bwd, "
                                          f"{counts['graphs']} graph(s), {shallow.num_layers} layers")),
           "compiled_extern_calls": (counts["extern"], "", "extern_kernels.* / torch.ops.* calls in the code")}
    kernels = mc.profiled_kernels(lambda: mc.train_step(compiled, opt, batch, ctx.device))
    if kernels is not None:
        out["compiled_kernels"] = (kernels, "", "torch.profiler CUDA kernel events of one compiled step")
    return out


# --------------------------------------------------------------------------------------------------- outputs
def csv_rows(results: dict[str, dict]) -> list[dict]:
    return [{"preset": p, "metric": k, "value": v, "unit": u, "note": n}
            for p, metrics in results.items() for k, (v, u, n) in metrics.items()]


def write_csv(results: dict[str, dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        for r in csv_rows(results):
            w.writerow({**r, "value": f"{r['value']:.6g}" if isinstance(r["value"], float) else r["value"]})


def read_csv(path: Path) -> dict[str, dict]:
    out: dict[str, dict] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            out.setdefault(r["preset"], {})[r["metric"]] = (r["value"], r["unit"], r["note"])
    return out


def _bytes(value: float) -> str:
    for scale, name in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if abs(value) >= scale:
            return f"{value / scale:.3f} {name}"
    return f"{value:,.0f} B"


def _fmt(value, unit: str) -> str:
    if unit == "B" and isinstance(value, (int, float)):
        return _bytes(value)
    if unit == "FLOP":
        return f"{value / 1e12:.3f} TFLOP" if value >= 1e11 else f"{value / 1e9:.3f} GFLOP"
    if isinstance(value, float):
        return f"{value:.3f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


_NO_RATIO = frozenset({"params", "layers", "flops_per_sample", "step_micro_batch"})  # the same config on both sides


def _ratio(key: str, cells) -> str:
    a, b = (c[0] if c else None for c in cells)
    if key in _NO_RATIO or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)) or not a:
        return ""
    return f"{b / a:.3f}"


def markdown(results: dict[str, dict], header: str) -> str:
    """One column a preset, one row a metric; a last column new / old when there are two presets; then the notes
    (one per metric, or one per preset where they differ)."""
    presets = list(results)
    ratio = len(presets) == 2
    metrics = list(dict.fromkeys(k for m in results.values() for k in m))
    head = "| metric | " + " | ".join(presets) + (f" | {presets[1]} / {presets[0]} |" if ratio else " |")
    lines = [header, "", head, "|" + "---|" * (len(presets) + 1 + ratio)]
    notes = []
    for k in metrics:
        cells = [results[p].get(k) for p in presets]
        row = [_fmt(c[0], c[1]) if c else "-" for c in cells]
        lines.append(f"| {k} | " + " | ".join(row + ([_ratio(k, cells)] if ratio else [])) + " |")
        by_preset = {p: c[2] for p, c in zip(presets, cells) if c and c[2]}
        if len(set(by_preset.values())) == 1:
            notes.append(f"- {k}: {next(iter(by_preset.values()))}")
        else:
            notes += [f"- {k} ({p}): {n}" for p, n in by_preset.items()]
    return "\n".join(lines + ["", "Notes:", ""] + notes) + "\n"


def _header(ctx, opts: Options) -> str:
    caveat = (" The torch backend runs the ops' pure-torch references. Under selective recomputation (recompute="
              "'elementwise', the default) both backends hold the same tensors, the matmul and attention outputs "
              "(30.1 vs 30.2 bytes x D a token and layer at d_model 128); with recompute='none' the references save "
              "more than the kernels. `--backend none` measures the kernels (interpreted on a CPU)."
              if opts.backend == "torch" else "")
    return (f"# Model cost ({ctx.profile} profile, {ctx.device.type}, wmfast.ops backend "
            f"{opts.backend or 'automatic'})\n\n"
            "Bytes under bf16 autocast in train mode (dropout on), batch 2 minus batch 1. held = storages created "
            "in the forward and alive after it, output excluded (primary; sees what torch.utils.checkpoint keeps); "
            "hooked = autograd saved_tensors_hooks, parameters excluded (blind inside checkpointed regions). "
            f"max_micro_batch rows come from a MODEL, not a measurement: fixed (18 B/param + the loss head's "
            f"workspace) + held bytes/sample x micro-batch <= capacity x (1 - {mc.MARGIN}), capacities in GiB "
            f"{mc.GPU_CAPACITY_GIB}. predicted_over_measured checks the model against the measured step." + caveat)


def run(ctx, **kw) -> dict[str, dict]:
    """The suite: measure every preset, write model_cost.csv and model_cost.md, log the table."""
    opts = Options.for_context(ctx, **kw)
    skipped = [p for p in PARTS if p not in opts.parts]
    if skipped:
        why = (" (torch.compile runs in the full profile, with --compile or --parts ...,compile: compiling even one "
               "tiny block takes ~50 s on 2 CPU cores)" if "compile" in skipped else "")
        ctx.log(f"model-cost: parts skipped: {', '.join(skipped)}{why}")
    results: dict[str, dict] = {}
    try:
        for name in opts.presets:
            ctx.log(f"model-cost: {name} (parts {', '.join(opts.parts)}, micro-batch {opts.micro_batch}"
                    + (f", whole-model parts at depth {opts.depth}" if opts.depth else "") + ")")
            measure_preset(ctx, name, opts, results.setdefault(name, {}))
    finally:  # what was measured is written, also when the budget ran out or a part failed
        out = Path(ctx.out_dir)
        write_csv(results, out / CSV_NAME)
        text = markdown(results, _header(ctx, opts))
        (out / MD_NAME).write_text(text)
        for line in text.splitlines():
            ctx.log(line)
    return results
