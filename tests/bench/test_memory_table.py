"""The memory-complexity table (wmfast.bench.attention_memory), the model's eager attention it counts
(wmfast.models.st_transformer.eager_attention), and a CPU measurement of eager full vs factorized attention."""
import pytest
import torch

from wmfast.bench.attention_memory import attention_memory_table, format_memory_table, measure_attention_memory
from wmfast.models.st_transformer.eager_attention import eager_factorized_attention, eager_full_attention


def test_seed_table_t5_s1024():
    t = attention_memory_table(5, 1024)
    assert t["full"] == 26_214_400 and t["factorized"] == 5_268_480  # (TS)^2 vs TS^2 + ST^2
    assert round(100 * t["ratio"], 1) == 20.1
    assert [r["relative"] for r in t["rows"]] == [1.0, t["ratio"]]
    assert "20.1%" in format_memory_table(t) and "100.0%" in format_memory_table(t)
    b = attention_memory_table(5, 1024, batch=20, heads=8, bytes_per_element=2)
    assert b["full_bytes"] == 26_214_400 * 20 * 8 * 2


@pytest.mark.parametrize("T,S", [(1, 7), (16, 1), (3, 50)])
def test_table_formula(T, S):
    t = attention_memory_table(T, S)
    assert t["spatial"] + t["temporal"] == t["factorized"] == T * S * S + S * T * T
    assert t["ratio"] == pytest.approx((T * S * S + S * T * T) / (T * S) ** 2)
    with pytest.raises(ValueError, match="T=0"):
        attention_memory_table(0, S)


def test_eager_attention_matches_the_model_paths():
    from wmfast.kernels.temporal_attention import temporal_attention_ref

    from wmfast.models.st_transformer import block_causal_attention
    from wmfast.ops import spatial_attention

    q, k, v = torch.randn(3, 2, 3, 10, 2, 4).unbind(0)
    torch.testing.assert_close(eager_full_attention(q, k, v), block_causal_attention(q, k, v))
    torch.testing.assert_close(eager_factorized_attention(q, k, v),
                               spatial_attention(q, k, v) + temporal_attention_ref(q, k, v), atol=1e-5, rtol=1e-5)


def test_measured_memory_follows_the_formula():
    T, S, B, H = 4, 256, 1, 2
    m = measure_attention_memory(T, S, batch=B, heads=H, head_dim=4)
    t = attention_memory_table(T, S, batch=B, heads=H)
    full, fact = m["full"], m["factorized"]
    # every score element is materialised once, in fp32: exact
    assert full["score_bytes"] == t["full_bytes"] and fact["score_bytes"] == t["factorized_bytes"]
    # retained for the backward: the probabilities plus q/k/v-sized extras (a few % at Dh = 4, S = 256)
    assert fact["retained_bytes"] / full["retained_bytes"] == pytest.approx(t["ratio"], rel=0.10)
    assert full["retained_bytes"] >= t["full_bytes"]
    # peak: scores and probabilities of the largest attention coexist (2x), so the ratio holds too
    assert fact["peak_bytes"] / full["peak_bytes"] == pytest.approx(t["ratio"], rel=0.05)
    assert full["peak_bytes"] >= 2 * t["full_bytes"]
