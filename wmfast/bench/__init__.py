"""The one benchmark home: the harness every benchmark measures through, the `wmfast bench` suites, and reports.

The harness (how to write a bench script, and the measurement conventions: wmfast.bench.context):
    timing        measure(fn) -> Measurement (median, p20, p80 ms; do_bench on CUDA, a perf_counter loop on the
                  CPU), peak_memory, direct_triton_launches (kernel launchers timed as their ops launch them)
    memory        LiveBytesTracker (the CPU peak-memory estimate and attention score bytes), saved_bytes
    ceilings      copy GB/s and matmul TFLOP/s measured in the same run (Ceilings, ceilings())
    results       the CSV schema (COLUMNS), ResultWriter, read_rows, roofline_fraction, environment columns
    context       BenchContext, make_context, script_main, BudgetExhausted, the profiles
    discovery     find_bench_dir, load_bench_script (benchmarks/bench_<x>.py)
    workloads     inputs the scripts share (a random compression-task batch)
GPU telemetry (clocks, power, temperature) comes from wmfast.telemetry.GpuSampler, the one NVML reader.

The suites and their outputs:
    suite              `wmfast bench`: ceilings, then the chosen suites, into results.csv, status.json, bench.log
    report             summary.md, plots and the README results block, regenerated from a results directory
    figures            save_figure: writes every benchmark PNG, marked in red when not measured on a GPU
    attention_memory   the attention-memory suite: the memory-complexity table and its measurement
    largest_batch      the largest batch that fits a training step, full vs factorized attention
    model_cost         the model-cost suite's measurements: activation bytes, a step's peak and kernels, the
                       memory model of the largest micro-batch (model_cost_report: the suite and its tables)
    kernel_profile     one call's kernels by total time (the breakdown bench_train writes beside its numbers)
    lease              one GPU lease, one command (`python -m wmfast.bench.lease`, benchmarks/lease/run.sh)
    lease_summary      what a lease leaves: junit.xml, launch_configs.json, summary.md, the packed copy
    pytest_stream      a pytest plugin streaming every test report to a JSON-lines file as it arrives
    stream_records     those JSON lines read back without pytest: counts, failures, junit.xml

This module imports nothing, so that importing the pytest plugin or a suite name does not import torch.
"""

SUITES = ("ceilings", "ops", "attention-memory", "train", "generate", "ensemble", "model-cost")
PROFILES = ("quick", "lease", "full")
