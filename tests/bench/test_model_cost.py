"""The model-cost suite (wmfast.bench.model_cost, model_cost_report, benchmarks/bench_model_cost.py): the held-bytes
measure on cases counted by hand, the batch-2 minus batch-1 difference, the memory model, the op counter, the
compiled-kernel count, and the quick suite end to end on the CPU (about 40 s for the file on 2 cores, 12 of them
compiling a Linear + GELU)."""
import csv
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from wmfast.bench import model_cost as mc
from wmfast.bench.discovery import load_bench_script

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
N, DIN, DH = 7, 24, 40  # tokens a sample, Linear(DIN, DH)


def _linear_gelu():
    return nn.Sequential(nn.Linear(DIN, DH), nn.GELU(approximate="tanh"))


def _measure(module, autocast=True):
    def measure(b):
        x0 = torch.randn(b, N, DIN, requires_grad=True)
        return mc.held_bytes(module, x0, params=list(module.parameters()), autocast=autocast)

    return measure


@pytest.mark.parametrize("autocast", [pytest.param(True, id="bf16-autocast"), pytest.param(False, id="fp32")])
def test_held_bytes_of_linear_gelu_counted_by_hand(autocast):
    """Linear + GELU keeps: the Linear's input (bf16 cast under autocast; the fp32 input itself without it), the
    Linear's output (GELU's input) and, under autocast, the bf16 weight copy (once). The GELU output is the
    output (excluded) and the bias copy is not saved."""
    module = _linear_gelu()
    elem = 2 if autocast else 4
    weight_copy = 2 * DIN * DH if autocast else 0
    for b in (1, 3):
        got = _measure(module, autocast)(b)
        assert got.held == b * N * elem * (DIN + DH) + weight_copy
        assert got.hooked == got.held  # nothing is checkpointed: both methods see the same tensors
        assert got.output == b * N * DH * elem
    per = mc.per_token(_measure(module, autocast), N)
    assert per.held == per.hooked == elem * (DIN + DH)
    assert per.held_per_sample == N * elem * (DIN + DH)


def test_input_counts_only_when_the_graph_keeps_it():
    """x -> x * 2 saves nothing of x (a constant factor); x -> x * x saves x: the input's bytes appear only then."""
    x0 = torch.randn(4, 8, requires_grad=True)
    assert mc.held_bytes(lambda x: x * 2, x0, autocast=False).held == 0
    assert mc.held_bytes(lambda x: x * x, x0, autocast=False).held == x0.nbytes


class _KeepsAConstant(nn.Module):
    """The module plus a per-step constant kept alive after the forward (like autocast's weight copies)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.keep = None

    def forward(self, x):
        self.keep = torch.ones(1000)
        return self.inner(x)


def test_per_token_is_independent_of_constant_allocations():
    module = _linear_gelu()
    plain = mc.per_token(_measure(module), N)
    keeping = mc.per_token(_measure(_KeepsAConstant(module)), N)
    assert keeping.raw[1].held == plain.raw[1].held + 4000  # the constant is there in each measurement...
    assert keeping.held == plain.held  # ...and gone from the difference
    assert keeping.hooked == plain.hooked


def test_memory_model_by_hand():
    m = mc.MemoryModel(params=1000, vocab=10, d_model=4, rows_per_sample=3, per_sample=100, per_sample_ckpt=40,
                       chunk=6, logit_bytes=2)
    # fixed = 18 B x 1000 params + min(6, 3 mb) rows x 10 x 2 B + 4 B x 10 x 4
    assert sum(m.fixed_parts(1).values()) == 18000 + 3 * 20 + 160
    assert m.peak(1) == 18000 + 60 + 160 + 100
    assert m.peak(5, checkpointing=True) == 18000 + 120 + 160 + 5 * 40
    assert m.largest_micro_batch(20000) == 0  # budget 18000 < the fixed bytes
    assert m.largest_micro_batch(30000) == 87  # (27000 - 18280) / 100 = 87.2
    assert m.largest_micro_batch(30000, checkpointing=True) == 218  # (27000 - 18280) / 40 = 218
    assert m.largest_micro_batch(30000, margin=0.0) == 117  # (30000 - 18280) / 100
    caps = [2e4, 3e4, 5e4, 1e5, 1e6]
    fits = [m.largest_micro_batch(c) for c in caps]
    assert fits == sorted(fits)  # more memory never fits fewer samples
    heavier = replace(m, per_sample=150)
    assert all(heavier.largest_micro_batch(c) <= f for c, f in zip(caps, fits))


def test_memory_model_from_measurements():
    from wmfast.models import STTransformerConfig

    c = STTransformerConfig.from_name("tiny")  # L=2, T=5, S=64, D=64
    layer = mc.PerToken(held=1000.0, hooked=0.0, tokens_per_sample=5 * 64, residual_dtype=torch.bfloat16)
    m = mc.memory_model(c, params=5000, layer=layer, sample_per_sample=700_000)
    stream = 5 * 64 * 64 * 2  # one bf16 block input
    outside = 700_000 - 2 * 320_000
    assert m.per_sample == 700_000 and m.per_sample_ckpt == 2 * stream + 320_000 + outside
    assert m.rows_per_sample == 3 * 64 and m.vocab == 512
    # under whole-block checkpointing the recomputed block saves everything (selective recomputation is off)
    saving_all = replace(layer, held=2500.0)
    m2 = mc.memory_model(c, params=5000, layer=layer, sample_per_sample=700_000, layer_recomputed=saving_all)
    assert m2.per_sample == m.per_sample and m2.per_sample_ckpt == m.per_sample_ckpt + 1500 * 320


def test_op_counter_counts_writes_not_views():
    x = torch.randn(16, 32)
    with mc.OpCounter() as ops:
        y = x + 1  # new storage: 1
        y.add_(1)  # in place: 2
        y.view(-1)
        y.t()
        e = torch.empty(64)  # allocation only
        e.fill_(0)  # 3
    assert ops.count == 3
    assert ops.largest[0] == y.nbytes and ops.largest[2] == (16, 32)


def _tiny(**overrides):
    from wmfast.models import STTransformer, STTransformerConfig

    torch.manual_seed(0)
    model = STTransformer(STTransformerConfig.from_name("tiny", **overrides))
    model.train()
    return model


@pytest.mark.parametrize("block", ["reference", "fused"])
def test_hook_and_held_agree_without_recompute(block):
    from wmfast.ops import use_backend

    with use_backend("torch"):
        none = mc.block_cost(_tiny(block=block, recompute="none"), "cpu")
        sac = mc.block_cost(_tiny(block=block, recompute="elementwise"), "cpu")
    assert none.held > 0 and none.hooked == pytest.approx(none.held, rel=0.03)
    # selective checkpointing's own hooks shadow the outer one: the hook method misses most of what is kept
    assert sac.held > 0 and sac.hooked < 0.5 * sac.held
    assert sac.held < none.held  # and recomputing the elementwise ops keeps less


def test_whole_model_bytes_are_the_layers_plus_the_rest():
    """The CPU's extrapolation: a model of 2 layers keeps what a 1-layer model keeps plus one layer's bytes."""
    from wmfast.ops import use_backend

    with use_backend("torch"):
        layer = mc.block_cost(_tiny(num_layers=1), "cpu")
        one, two = (mc.sample_cost(_tiny(num_layers=n), "cpu") for n in (1, 2))
    assert two.held_per_sample - one.held_per_sample == layer.held_per_sample


def test_compiled_kernel_counts_of_linear_gelu():
    module = nn.Sequential(nn.Linear(16, 32), nn.GELU(approximate="tanh"), nn.Linear(32, 8))
    compiled = torch.compile(module)
    x = torch.randn(4, 16)
    counts = mc.compiled_kernel_counts(lambda: compiled(x).sum().backward())
    assert counts["graphs"] == 2  # forward and backward
    assert counts["generated"] >= 2  # at least the GELU forward and its backward
    assert counts["extern"] >= 4  # the matmuls: 2 forward, at least 2 backward


def test_quick_suite_writes_its_table(tmp_path):
    module = load_bench_script(BENCH_DIR / "bench_model_cost.py")
    assert module.SUITE == "model-cost"
    assert module.main(["--quick", "--out", str(tmp_path), "--device", "cpu"]) == 0
    with open(tmp_path / "model_cost.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["preset"], r["metric"]): r["value"] for r in rows}
    for preset in ("tiny", "tiny-reference"):
        for metric in ("held_per_token_layer", "hooked_per_token_layer", "held_per_sample", "step_peak",
                       "largest_tensor", "eager_ops_written", "max_micro_batch H200 141GB ckpt"):
            assert float(got[(preset, metric)]) > 0, (preset, metric)
        assert 0.5 < float(got[(preset, "predicted_over_measured")]) < 2.0
    for level in ("token_layer", "sample_measured"):  # nothing checkpointed in the old block: the methods agree
        held, hooked = (float(got[("tiny-reference", f"{m}_per_{level}")]) for m in ("held", "hooked"))
        assert hooked == pytest.approx(held, rel=0.03), level
    held = float(got[("tiny-reference", "held_per_token_layer")])
    assert float(got[("tiny", "held_per_token_layer")]) < held  # the new block keeps less than the old
    text = (tmp_path / "model_cost.md").read_text()
    assert "| held_per_token_layer |" in text and "MODEL, not a measurement" in text and "tiny / tiny-reference" in text
    with open(tmp_path / "bench_model_cost.csv", newline="") as f:
        steps = [r for r in csv.DictReader(f) if r["op"] == "model-cost"]
    assert {r["provider"] for r in steps} == {"reference-block", "fused-block-sac"}
    assert all(float(r["peak_mem_mb"]) > 0 and float(r["median_ms"]) > 0 for r in steps)


def test_profile_defaults():
    from types import SimpleNamespace

    from wmfast.bench.model_cost_report import Options

    def ctx(profile, device):
        return SimpleNamespace(profile=profile, quick=profile == "quick", device=torch.device(device))

    quick = Options.for_context(ctx("quick", "cpu"))
    assert quick.presets == ("tiny-reference", "tiny") and "compile" not in quick.parts and quick.depth is None
    assert quick.backend == "torch" and quick.micro_batch == 2
    cpu_full = Options.for_context(ctx("full", "cpu"))
    assert cpu_full.presets == ("1x-compression-reference", "1x-compression") and "compile" in cpu_full.parts
    assert cpu_full.depth == 2 and cpu_full.micro_batch == 1
    lease = Options.for_context(ctx("lease", "cuda"), compile=True, backend=None)
    assert "compile" in lease.parts and lease.depth is None and lease.backend is None and lease.micro_batch == 8
    assert "compile" not in Options.for_context(ctx("full", "cuda"), compile=False).parts


def test_suite_is_registered():
    from wmfast.bench import SUITES
    from wmfast.bench.suite import EXPECTED_SCRIPTS

    assert "model-cost" in SUITES and EXPECTED_SCRIPTS["model-cost"] == ("bench_model_cost.py",)
