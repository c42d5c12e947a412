"""`wmfast plot RUN_DIR`: PNG curves from metrics.jsonl (a resumed run's replayed steps counted once)."""
import json

from wmfast.cli import main
from wmfast.cli.plot import last_per_step


def test_plot_writes_png(tmp_path, capsys):
    recs = [{"kind": "train", "step": s, "loss": 5.0 - 0.1 * s, "lr": 1e-3, "samples_per_s": 10.0 + s,
             "mfu": 0.1 if s > 2 else None} for s in range(1, 8)]
    recs += [{"kind": "train", "step": 5, "loss": 1.0, "lr": 1e-3, "samples_per_s": 9.0, "mfu": 0.2},  # resumed
             {"kind": "val", "step": 4, "val_ce": 4.0, "val_top500_ce": 3.9}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n{\"kind\": \"tra")
    assert main(["plot", str(tmp_path)]) == 0
    png = tmp_path / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert "curves.png" in capsys.readouterr().out
    train = last_per_step([json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()[:-1]],
                          "train")
    assert [r["step"] for r in train] == list(range(1, 8)) and train[4]["loss"] == 1.0


def test_plot_errors(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
