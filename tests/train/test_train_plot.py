"""`wmfast plot RUN_DIR`: PNG curves from metrics.jsonl (a resumed run's replayed steps counted once), numeric
series only, titled with the run's preset, the loss axis named after the task's loss."""
import json

import pytest

from wmfast.cli import main
from wmfast.cli.plot import draw_run, last_per_step


def write_run(path, records, train_config=None, tail=""):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n" + tail)
    if train_config is not None:
        (path / "config.json").write_text(json.dumps({"train": train_config, "model": {}, "world_size": 1}))
    return path


def compression_records():
    recs = [{"kind": "train", "step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3, "samples_per_s": 10.0 + s,
             "mfu": 0.1 if s > 2 else None} for s in range(1, 8)]
    recs += [{"kind": "train", "step": 5, "loss": 1.0, "lr": 1e-3, "samples_per_s": 9.0, "mfu": 0.2},  # resumed
             {"kind": "val", "step": 4, "val_ce": 4.0, "val_top500_ce": 3.9, "val_precision": "fp32", "time": 1.0},
             {"kind": "val", "step": 7, "val_ce": 3.5, "val_top500_ce": 3.4, "val_precision": "fp32", "time": 2.0}]
    return recs


@pytest.fixture
def figures():
    import matplotlib.pyplot as plt

    made = []
    yield made
    for fig in made:
        plt.close(fig)


def lines_by_label(ax):
    return {line.get_label(): line for line in ax.get_lines()}


def test_plot_writes_png(tmp_path, capsys):
    write_run(tmp_path, compression_records(), tail="{\"kind\": \"tra")
    assert main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "curves.png" in capsys.readouterr().out
    train = last_per_step([json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()[:-1]],
                          "train")
    assert [r["step"] for r in train] == list(range(1, 8)) and train[4]["loss"] == 1.0


def test_loss_panel_draws_numeric_val_series_apart_with_the_preset_in_the_title(tmp_path, figures):
    run = write_run(tmp_path / "my-run", compression_records(),
                    {"name": "1x-compression", "task": "compression", "model": "136m"})
    fig = draw_run(str(run))
    figures.append(fig)
    ax_loss, ax_lr, ax_speed = fig.axes[:3]
    lines = lines_by_label(ax_loss)
    assert set(lines) == {"train loss", "val_ce", "val_top500_ce"}  # val_precision ("fp32") and time are not series
    assert list(lines["train loss"].get_ydata()) == pytest.approx([4.9, 4.8, 4.7, 4.6, 1.0, 4.4, 4.3])
    assert list(lines["val_ce"].get_xdata()) == [4, 7] and list(lines["val_ce"].get_ydata()) == [4.0, 3.5]
    assert list(lines["val_top500_ce"].get_ydata()) == [3.9, 3.4]
    ce, top = lines["val_ce"], lines["val_top500_ce"]
    assert (ce.get_marker(), ce.get_linestyle()) != (top.get_marker(), top.get_linestyle())
    assert ce.get_color() != top.get_color()
    assert [t.get_text() for t in ax_loss.get_legend().get_texts()] == ["train loss", "val_ce", "val_top500_ce"]
    assert "cross-entropy" in ax_loss.get_ylabel()
    assert all(isinstance(y, float) for line in ax_loss.get_lines() for y in line.get_ydata())
    title = fig.get_suptitle()
    assert "my-run" in title and "1x-compression" in title and "compression" in title
    assert ax_lr.get_ylabel() == "learning rate" and len(ax_lr.get_lines()) == 1
    # MFU on a twin axis, in percent, only where recorded (steps 1-2 have None)
    twin = fig.axes[3]
    assert list(twin.get_lines()[0].get_xdata()) == [3, 4, 5, 6, 7]
    assert twin.get_lines()[0].get_ydata()[2] == pytest.approx(20.0)  # the resumed step 5 (mfu 0.2)
    assert [t.get_text() for t in ax_speed.get_legend().get_texts()] == ["samples/s", "MFU %"]


def test_sampling_run_says_mse_not_ce(tmp_path, figures):
    recs = [{"kind": "train", "step": s, "loss": 1.0 / s, "lr": 1e-4, "samples_per_s": 2.0, "mfu": None}
            for s in range(1, 5)]
    recs.append({"kind": "val", "step": 4, "val_loss": 0.3, "val_precision": "fp32"})
    run = write_run(tmp_path / "sampling-run", recs, {"name": "tiny-sampling", "task": "sampling", "model": "tiny"})
    fig = draw_run(str(run))
    figures.append(fig)
    ax_loss = fig.axes[0]
    assert "MSE" in ax_loss.get_ylabel() and "CE" not in ax_loss.get_ylabel().replace("MSE", "")
    assert "entropy" not in ax_loss.get_ylabel()
    assert set(lines_by_label(ax_loss)) == {"train loss", "val_loss"}
    assert "tiny-sampling" in fig.get_suptitle() and "sampling-run" in fig.get_suptitle()
    assert len(fig.axes) == 3  # no MFU recorded: no twin axis


def test_records_missing_keys_and_no_config(tmp_path, figures):
    """A resumed run whose records lack keys, no val records, no MFU, no config.json: drawn, not an error."""
    recs = [{"kind": "train", "step": 1, "loss": 2.0, "lr": 1e-3},
            {"kind": "train", "step": 2, "lr": 1e-3, "samples_per_s": 5.0},
            {"kind": "train", "step": 3, "loss": float("nan"), "samples_per_s": 6.0, "mfu": True},
            {"kind": "train", "step": 4, "loss": 1.5, "lr": "1e-3"}]
    run = write_run(tmp_path / "resumed", recs)
    fig = draw_run(str(run))
    figures.append(fig)
    ax_loss, ax_lr, ax_speed = fig.axes
    train = lines_by_label(ax_loss)["train loss"]
    assert list(train.get_xdata()) == [1, 4] and list(train.get_ydata()) == [2.0, 1.5]
    assert list(ax_lr.get_lines()[0].get_xdata()) == [1, 2]
    assert list(ax_speed.get_lines()[0].get_xdata()) == [2, 3]
    assert ax_loss.get_ylabel() == "loss"
    assert "resumed" in fig.get_suptitle() and "no readable config.json" in fig.get_suptitle()


def test_panel_without_any_value_says_so(tmp_path, figures):
    run = write_run(tmp_path / "r", [{"kind": "train", "step": 1, "loss": 2.0}], {"name": "tiny", "task": "toy"})
    fig = draw_run(str(run))
    figures.append(fig)
    assert [t.get_text() for t in fig.axes[1].texts] == ["no learning rate recorded"]
    assert [t.get_text() for t in fig.axes[2].texts] == ["no throughput recorded"]
    assert "cross-entropy" in fig.axes[0].get_ylabel()


def test_plot_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    write_run(tmp_path, [{"kind": "val", "step": 1, "val_ce": 1.0}])
    assert main(["plot", str(tmp_path)]) == 2
    assert "no training records" in capsys.readouterr().err
