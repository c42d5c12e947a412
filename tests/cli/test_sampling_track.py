"""The sampling track end to end from the command line, as a user runs it: synthetic raw data in the real train
layout, `wmfast train --config tiny-sampling` (which writes the LoRA adapter), `wmfast sample --lora RUN_DIR`, and
the adapter loaded into a stock diffusers WanPipeline with default arguments, whose transformer must match wmfast's
world model with the state path off."""
import json
import os

import pytest
import torch

pytestmark = [pytest.mark.requires("diffusers", "deepspeed", "av")]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from wmfast.cli import main
    from wmfast.data.raw_synthetic import write_synthetic_raw_dataset

    root = tmp_path_factory.mktemp("sampling_track")
    data = root / "raw"
    write_synthetic_raw_dataset(str(data), shards=1, frames=240, size=64, val_frames=77)
    run = root / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WMFAST_PROGRESS", "0")
        mp.setenv("WMFAST_BACKEND", "torch")  # the pipeline is under test here, not the kernels (20x faster)
        code = main(["train", "--config", "tiny-sampling", "--data", str(data), "--out", str(run), "--steps", "4",
                     "--ckpt-every", "2", "--keep", "2", "--global-batch", "2", "--micro-batch", "2"])
    assert code == 0
    return data, run


def test_the_train_split_is_in_the_published_nested_layout(trained_run):
    data, _ = trained_run
    train = data / "train_v2.0_raw"
    assert {"metadata", "videos", "robot_states", "segment_indices", "metadata.json"} <= set(os.listdir(train))
    assert json.loads((train / "metadata.json").read_text())["query"] is None  # as in the real metadata.json


def test_training_writes_the_adapter_at_every_checkpoint_and_at_the_end(trained_run):
    from wmfast.models.wan import get_preset
    from wmfast.models.wan.lora import ADAPTER_DIR, PEFT_CONFIG, STATE_WEIGHTS, WEIGHT_NAME, read_adapter_info
    from wmfast.tasks.sampling import SamplingTask

    _, run = trained_run
    checkpoints = sorted((run / "checkpoints").glob("step_*"))
    assert [c.name for c in checkpoints] == ["step_00000002", "step_00000004"]
    for adapter, step in ((checkpoints[0] / "adapter", 2), (checkpoints[1] / "adapter", 4), (run / "adapter", 4)):
        assert {WEIGHT_NAME, PEFT_CONFIG, STATE_WEIGHTS} <= set(os.listdir(adapter))
        info = read_adapter_info(str(adapter))
        assert (info["preset"], info["step"], info["rank"]) == ("tiny", step, get_preset("tiny").lora_rank)
    newest = (checkpoints[1] / "adapter" / WEIGHT_NAME).read_bytes()
    assert newest == (run / "adapter" / WEIGHT_NAME).read_bytes()
    assert newest != (checkpoints[0] / "adapter" / WEIGHT_NAME).read_bytes()  # trained between the two
    assert SamplingTask.export_dir == ADAPTER_DIR  # where wmfast.models.wan.lora.resolve_adapter_dir looks


def test_resuming_a_finished_run_exits_0_and_republishes_the_adapter(trained_run, tmp_path, monkeypatch):
    import shutil

    from wmfast.cli import main

    data, run = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "adapter")
    monkeypatch.setenv("WMFAST_PROGRESS", "0")
    monkeypatch.setenv("WMFAST_BACKEND", "torch")
    assert main(["train", "--config", "tiny-sampling", "--data", str(data), "--out", str(copy), "--steps", "4",
                 "--global-batch", "2", "--micro-batch", "2", "--resume"]) == 0
    assert (copy / "adapter" / "pytorch_lora_weights.safetensors").read_bytes() == (
        run / "adapter" / "pytorch_lora_weights.safetensors").read_bytes()


def test_sample_an_ensemble_with_the_adapter_of_the_run_directory(trained_run, tmp_path, monkeypatch):
    from wmfast.cli import main

    data, run = trained_run
    monkeypatch.setenv("WMFAST_BACKEND", "torch")
    base = ["sample", "--model", "tiny", "--data", str(data), "--ensemble", "2", "--steps", "2", "--no-progress"]
    scores = {}
    for name, lora in (("run", run), ("none", None)):
        out = tmp_path / name
        assert main([*base, "--out", str(out), *(["--lora", str(lora)] if lora else [])]) == 0
        scores[name] = json.loads((out / "sample.json").read_text())["psnr_pixel"]
    assert scores["none"] != pytest.approx(scores["run"], abs=1e-6)  # the trained adapter is applied


def test_lora_accepts_the_run_a_checkpoint_or_the_adapter_directory(trained_run, tmp_path):
    from wmfast.models.wan.lora import resolve_adapter_dir

    _, run = trained_run
    newest = run / "checkpoints" / "step_00000004" / "adapter"
    assert resolve_adapter_dir(str(run)) == str(newest)  # the newest checkpoint's, even if run/adapter is older
    assert resolve_adapter_dir(str(newest.parent)) == str(newest)
    assert resolve_adapter_dir(str(run / "adapter")) == str(run / "adapter")
    for bad, message in ((tmp_path / "missing", "does not exist"), (run / "metrics.jsonl", "is a file"),
                         (tmp_path, "holds no LoRA adapter")):
        with pytest.raises(ValueError, match=message):
            resolve_adapter_dir(str(bad))


def _stock_transformer():
    """diffusers' own WanTransformer3DModel with the base weights wmfast's tiny world model was trained on."""
    from diffusers import WanTransformer3DModel

    from wmfast.models.wan import TINY_BASE_SEED, build_world_model, get_preset

    base = build_world_model("tiny", vae=False, base_seed=TINY_BASE_SEED).transformer.state_dict()
    stock = WanTransformer3DModel(**get_preset("tiny").transformer)
    stock.load_state_dict({k: v for k, v in base.items() if "state_" not in k})
    return stock


def test_stock_diffusers_pipeline_loads_the_adapter_and_matches_wmfast_without_states(trained_run):
    import argparse

    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    from wmfast.cli._sampling import load_model
    from wmfast.models.wan import get_preset

    _, run = trained_run
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=AutoencoderKLWan(**get_preset("tiny").vae),
                       scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                         flow_shift=5.0),
                       transformer=_stock_transformer())
    pipe.load_lora_weights(str(run / "adapter"))  # default arguments, as a diffusers user would
    model = load_model(argparse.Namespace(model="tiny", lora=str(run), device="cpu", fp8=False, compile=False))
    g = torch.Generator().manual_seed(0)
    n, frame_len = model.schedule.num_latents, 4
    latents = torch.randn(2, 48, n, 4, 4, generator=g)
    timestep = torch.rand(2, n, generator=g) * 1000
    timestep[:, : model.num_context_latents] = 0
    with torch.no_grad():
        cond = model.prepare_conditioning(torch.randn(2, 77, 25, generator=g))
        cond.state_temb = [torch.zeros_like(s) for s in cond.state_temb]  # the state path off
        ours = model.velocity(latents, timestep, cond)
        tok = timestep.repeat_interleave(frame_len, dim=1)
        text = model.empty_text.expand(2, -1, -1)
        stock = pipe.transformer(latents, tok, text, return_dict=False)[0]
        untrained = _stock_transformer()(latents, tok, text, return_dict=False)[0]
    lora_effect = (stock - untrained).abs().max()
    assert lora_effect > 1e-3  # the adapter moved the outputs: the comparison below is not base vs base
    torch.testing.assert_close(stock, ours, rtol=1e-4, atol=1e-5)
    assert pipe.transformer.peft_config["default_0"].lora_alpha == get_preset("tiny").lora_rank  # alpha = rank


def test_user_errors_are_one_line_and_exit_2(trained_run, tmp_path, capsys):
    from wmfast.cli import main

    data, _ = trained_run
    sample = ["sample", "--data", str(data), "--ensemble", "1", "--steps", "1", "--no-progress", "--out",
              str(tmp_path / "s")]
    cases = [
        (["train", "--config", "1x-sampling", "--data", str(data), "--out", str(tmp_path / "r")],
         "pass --model /path/to/Wan2.2-TI2V-5B-Diffusers"),
        (["train", "--config", "1x-sampling", "--data", str(data), "--model", str(tmp_path / "nowhere"), "--out",
          str(tmp_path / "r")], "no such directory"),
        ([*sample, "--model", "tiny", "--lora", str(tmp_path / "nowhere")], "--lora: "),
        ([*sample, "--model", "tiny", "--lora", str(data)], "holds no LoRA adapter"),
        ([*sample, "--model", str(tmp_path / "nowhere")], "no such directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0] and err[0].startswith(f"wmfast {argv[0]}: error: "), err


def test_a_config_with_image_cross_attention_fields_loads_with_one_warning(tmp_path, caplog):
    """Published TI2V-5B configs may carry image_dim / added_kv_proj_dim (Wan2.1 I2V fields); the world model passes
    no image tokens, so they are dropped with one warning and the rest of the weights load."""
    from diffusers import WanTransformer3DModel

    from wmfast.models.wan import build_transformer, get_preset

    preset = get_preset("tiny")
    source = WanTransformer3DModel(**{**preset.transformer, "image_dim": 16, "added_kv_proj_dim": 24})
    source.save_pretrained(str(tmp_path))
    with caplog.at_level("WARNING"):
        loaded = build_transformer(preset, str(tmp_path))
    lines = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(lines) == 1 and "image_dim=16, added_kv_proj_dim=24" in lines[0], lines
    assert loaded.config.image_dim is None and loaded.blocks[0].attn2.add_k_proj is None
    ours = {k: v for k, v in loaded.state_dict().items() if "state_" not in k}
    theirs = source.state_dict()
    assert ours and all(torch.equal(v, theirs[k]) for k, v in ours.items())


def test_the_demo_resumes_its_earlier_training_runs_instead_of_failing(tmp_path, capsys):
    from wmfast.cli.demo import _resuming

    argv = ["train", "--config", "tiny-sampling", "--out", str(tmp_path)]
    assert _resuming(argv) == argv and "a fresh run" in capsys.readouterr().out
    (tmp_path / "checkpoints" / "step_00000030").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_00000030" / "trainer_state.json").write_text("{}")
    assert _resuming(argv) == [*argv, "--resume"] and "from its step 30" in capsys.readouterr().out
    assert _resuming(["sample", "--out", str(tmp_path)]) == ["sample", "--out", str(tmp_path)]


def test_random_5b_weights_only_when_asked_for():
    from wmfast.tasks.sampling import SamplingTask
    from wmfast.train import TrainConfig

    task = SamplingTask(None, "ti2v-5b")
    with pytest.raises(ValueError, match="--random-weights"):
        task.configure(TrainConfig.from_name("1x-sampling"))
    task.configure(TrainConfig.from_name("1x-sampling", random_weights=True))  # allowed on purpose
    SamplingTask(None, "tiny").configure(TrainConfig.from_name("tiny-sampling"))  # tiny: always seeded random


def test_a_broken_val_split_is_an_error_and_a_missing_one_turns_validation_off(trained_run, tmp_path):
    import shutil

    from wmfast.data.layout import DataFormatError
    from wmfast.tasks.sampling import SamplingTask

    data, _ = trained_run
    shutil.copytree(data / "train_v2.0_raw", tmp_path / "train_v2.0_raw")
    assert SamplingTask(str(tmp_path)).val_dataset() is None  # no val split
    (tmp_path / "val_v2.0_raw").mkdir()
    (tmp_path / "val_v2.0_raw" / "metadata.json").write_text('{"num_shards": 1, "num_images": 77, "query": null}')
    with pytest.raises(DataFormatError, match="states_0.bin"):
        SamplingTask(str(tmp_path)).val_dataset()
