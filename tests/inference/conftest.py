"""Fixtures of the greedy-generation tests: the tiny ST-Transformer and its inputs."""
import pytest
import torch

from wmfast.models import STTransformer, STTransformerConfig


@pytest.fixture
def tiny_st():
    """A factory: the tiny preset (with overrides), seeded."""
    def make(**kw):
        torch.manual_seed(0)
        return STTransformer(STTransformerConfig.from_name("tiny", **kw))

    return make


@pytest.fixture
def st_inputs():
    """A factory: (context ids [B, 3, 8, 8], states [B, 34, 25]) from a seeded generator."""
    def make(B=2, seed=1):
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, 512, (B, 3, 8, 8), generator=g), torch.randn(B, 34, 25, generator=g)

    return make
