"""LoRA post-training of the tiny Wan world model: targets, save/load round trips (fresh model, plain diffusers),
the ZeRO-3 save (partitioned parameters gathered), two-rank ZeRO-2 training through `wmfast train` where the
loss falls, and the adapter exported from its checkpoint."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("diffusers", reason="the Wan world model is built on diffusers, which cannot be imported here")

from diffusers import WanTransformer3DModel

from wmfast.models.wan import build_world_model, get_preset
from wmfast.models.wan.lora import (
    adapter_state_dicts,
    add_lora,
    export_adapter,
    is_state_parameter,
    load_lora,
    save_lora,
)


def _world(seed=0, alpha=16.0):
    torch.manual_seed(seed)
    m = build_world_model("tiny", vae=False)
    add_lora(m.transformer, rank=32, alpha=alpha)
    return m


def _perturb_adapter(m, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (p for p in m.parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _inputs(m, B=2):
    g = torch.Generator().manual_seed(0)
    n = m.schedule.num_latents
    t = torch.rand(B, n, generator=g) * 1000
    t[:, : m.num_context_latents] = 0
    return torch.randn(B, 48, n, 4, 4, generator=g), t, torch.randn(B, 77, 25, generator=g)


def test_targets_and_trainable_set():
    m = _world()
    trainable = [n for n, p in m.named_parameters() if p.requires_grad]
    lora = [n for n in trainable if "lora_" in n]
    # per block: attn1 and attn2 q, k, v, out + two FFN layers = 10 adapted linears, A and B each
    assert len(lora) == 2 * 10 * 2
    assert all(("lora_" in n) or is_state_parameter(n.removeprefix("transformer.")) for n in trainable)
    assert any("state_embedder" in n for n in trainable) and any("state_proj" in n for n in trainable)
    assert not any("modules_to_save" in n or "original_module" in n for n, _ in m.named_parameters())
    assert m.transformer.peft_config["default"].lora_alpha == 16.0


def test_round_trip_into_fresh_model(tmp_path):
    m = _world(alpha=16.0)
    _perturb_adapter(m)
    lat, t, states = _inputs(m)
    with torch.no_grad():
        ref = m.velocity(lat, t, m.prepare_conditioning(states))
    save_lora(m.transformer, str(tmp_path))
    torch.manual_seed(0)  # same base weights (a real run loads the same pretrained base)
    fresh = build_world_model("tiny", vae=False)
    load_lora(fresh.transformer, str(tmp_path))
    cfg = fresh.transformer.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha) == (32, 16.0)  # alpha survived (no silent alpha = r)
    with torch.no_grad():
        out = fresh.velocity(lat, t, fresh.prepare_conditioning(states))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.manual_seed(0)
    untouched = build_world_model("tiny", vae=False)
    with torch.no_grad():
        base = untouched.velocity(lat, t, untouched.prepare_conditioning(states))
    assert (base - ref).abs().max() > 1e-3  # the adapter (LoRA + state modules) really changes the model


def test_round_trip_into_plain_diffusers_transformer(tmp_path):
    m = _world(alpha=16.0)
    _perturb_adapter(m)
    save_lora(m.transformer, str(tmp_path))
    plain = WanTransformer3DModel(**get_preset("tiny").transformer)
    sd = {k: v for k, v in m.transformer.state_dict().items() if "lora_" not in k and "state_" not in k}
    plain.load_state_dict({k.replace(".base_layer", ""): v for k, v in sd.items()})
    load_lora(plain, str(tmp_path))
    lat, t, _ = _inputs(m)
    args = (lat, t.repeat_interleave(4, 1), m.empty_text.expand(2, -1, -1))
    with torch.no_grad():  # diffusers' own forward (no state path there): LoRA layers identical
        a = plain(*args, return_dict=False)[0]
        b = m.transformer(*args, return_dict=False)[0]
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert plain.peft_config["default"].lora_alpha == 16.0


def test_every_stock_loader_takes_the_directory_with_default_arguments_and_keeps_the_scale(tmp_path, caplog):
    """diffusers' transformer.load_lora_adapter(dir), WanPipeline.load_lora_weights(dir) and peft's
    PeftModel.from_pretrained(model, dir) each load the LoRA with alpha != r and match wmfast's world model with the
    state path off (diffusers' forward of the same transformer); the state modules stay wmfast's."""
    from diffusers import WanPipeline
    from peft import PeftModel

    m = _world(alpha=16.0)
    _perturb_adapter(m)
    save_lora(m.transformer, str(tmp_path))

    def plain():
        t = WanTransformer3DModel(**get_preset("tiny").transformer)
        sd = {k: v for k, v in m.transformer.state_dict().items() if "lora_" not in k and "state_" not in k}
        t.load_state_dict({k.replace(".base_layer", ""): v for k, v in sd.items()})
        return t

    lat, t, _ = _inputs(m)
    args = (lat, t.repeat_interleave(4, 1), m.empty_text.expand(2, -1, -1))
    by_adapter = plain()
    by_adapter.load_lora_adapter(str(tmp_path))
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=plain())
    pipe.load_lora_weights(str(tmp_path))
    by_peft = PeftModel.from_pretrained(plain(), str(tmp_path))
    with torch.no_grad():
        ref = m.transformer(*args, return_dict=False)[0]
        base = plain()(*args, return_dict=False)[0]
        assert (ref - base).abs().max() > 1e-2
        for loaded in (by_adapter, pipe.transformer, by_peft):
            torch.testing.assert_close(loaded(*args, return_dict=False)[0], ref, rtol=1e-5, atol=1e-6)
    assert pipe.transformer.peft_config["default_0"].lora_alpha == 16.0  # the metadata came along
    (tmp_path / "wmfast_state.safetensors").unlink()
    torch.manual_seed(0)
    fresh = build_world_model("tiny", vae=False)
    with caplog.at_level("WARNING"):
        load_lora(fresh.transformer, str(tmp_path))
    assert any("do not condition the model" in r.getMessage() for r in caplog.records)


ZERO3_SCRIPT = r"""
import sys, torch, deepspeed
from peft import get_peft_model_state_dict
sys.path.insert(0, sys.argv[2])
from test_wan_lora import _world, _perturb_adapter
from wmfast.models.wan.lora import adapter_state_dicts, save_lora, load_lora
from wmfast.models.wan import build_world_model
from wmfast.train.distributed import setup_distributed
setup_distributed()  # gloo group; and DeepSpeed's shm comm op is never JIT-built (~26 s)
m = _world(); _perturb_adapter(m)
ref = {k: v for sd in adapter_state_dicts(m.transformer) for k, v in sd.items()}  # LoRA + state modules
params = [p for p in m.parameters() if p.requires_grad]
cfg = {"train_batch_size": 1, "zero_allow_untested_optimizer": True,
       "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
engine, *_ = deepspeed.initialize(model=m, optimizer=torch.optim.AdamW(params, lr=1e-3), config=cfg)
raw = get_peft_model_state_dict(engine.module.transformer)
assert any(v.numel() == 0 for v in raw.values()), "parameters were not partitioned: the test would prove nothing"
save_lora(engine.module.transformer, sys.argv[1])
torch.manual_seed(0)
fresh = build_world_model("tiny", vae=False)
load_lora(fresh.transformer, sys.argv[1])
got = {k: v for sd in adapter_state_dicts(fresh.transformer) for k, v in sd.items()}
assert got.keys() == ref.keys(), (sorted(got)[:3], sorted(ref)[:3])
for k in ref:
    assert got[k].numel() > 0 and torch.equal(got[k], ref[k]), k
print("ZERO3-OK", len(ref))
"""


@pytest.mark.slow
@pytest.mark.requires("deepspeed")
def test_zero3_save_gathers_partitioned_adapter(tmp_path):
    script = tmp_path / "z3.py"
    script.write_text(ZERO3_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "lora"), os.path.dirname(__file__)],
                       check=False, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0 and "ZERO3-OK" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    assert "built successfully" not in r.stdout + r.stderr  # no DeepSpeed op was JIT-compiled


@pytest.mark.slow
@pytest.mark.requires("deepspeed", "av")
def test_two_rank_zero3_training_loss_falls_and_writes_a_whole_adapter(tmp_path):
    """ZeRO-3 with every parameter partitioned (persistence threshold 0): the adapter written inside the checkpoint
    was gathered (no empty tensor) and equals the one consolidated from the ZeRO checkpoint's fp32 shards."""
    from wmfast.data.raw_synthetic import write_synthetic_raw_dataset
    from wmfast.tasks.sampling import encode_dataset
    from wmfast.train.runlog import read_jsonl

    write_synthetic_raw_dataset(str(tmp_path / "raw"), shards=1, frames=240, size=64, val_frames=231)
    encode_dataset(str(tmp_path / "raw"), str(tmp_path / "lat"), splits=("train",), max_samples=2, progress=False)
    run = tmp_path / "run"
    override = tmp_path / "ds.json"
    override.write_text(json.dumps({"zero_optimization": {"stage3_param_persistence_threshold": 0}}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           "-m", "wmfast.train", "--config", "tiny-sampling", "--data", str(tmp_path / "lat"), "--out", str(run),
           "--steps", "10", "--ckpt-every", "10", "--zero", "3", "--deepspeed-config", str(override)]
    env = {**os.environ, "WMFAST_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "built successfully" not in r.stdout + r.stderr
    losses = [x["loss"] for x in read_jsonl(str(run / "metrics.jsonl")) if x["kind"] == "train"]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < 0.95 * sum(losses[:3]) / 3, losses
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["deepspeed"]["zero_optimization"]["stage"] == 3
    ckpt = max((run / "checkpoints").glob("step_*"))
    export_adapter(str(ckpt), str(tmp_path / "exported"))
    written, exported = ({k: v for sd in adapter_state_dicts(_loaded(d)) for k, v in sd.items()}
                         for d in (ckpt / "adapter", tmp_path / "exported"))
    assert written.keys() == exported.keys() and len(written) > 40
    for k, v in written.items():
        assert v.numel() > 0 and torch.equal(v, exported[k]), k
    assert written["blocks.0.state_proj.weight"].abs().max() > 0  # trained away from its zero init
    info = json.loads((tmp_path / "exported" / "wmfast_adapter.json").read_text())
    assert (info["preset"], info["step"], info["rank"]) == ("tiny", 10, get_preset("tiny").lora_rank)


def _loaded(directory):
    torch.manual_seed(0)
    fresh = build_world_model("tiny", vae=False)
    load_lora(fresh.transformer, str(directory))
    return fresh.transformer
