"""`wmfast reproduce`, sampling track: reference points for the PSNR of frame 76 (the generator's Bayes-optimal
prediction, the VAE's reconstruction of the true frames, copying the newest context frame), the eval-psnr table
read back, and the plots (PSNR and sharpness against N, PSNR against the denoising steps)."""
from __future__ import annotations

import csv

REFERENCES = {
    "bayes": "the generator's ceiling (Bayes-optimal prediction)",
    "vae": "VAE ceiling (true future encoded, decoded)",
    "copy": "copy the newest context frame",
}


def references(raw_root: str, split: str, model, limit: int) -> dict[str, dict[str, float]]:
    """Mean PSNR and sharpness of each reference of REFERENCES over the first `limit` samples of the split (the
    samples eval-psnr scores): {name: {"psnr", "sharpness"}}."""
    import torch

    from wmfast.cli._sampling import TARGET_FRAME
    from wmfast.data.raw import RawVideoDataset
    from wmfast.data.raw_synthetic import bayes_prediction
    from wmfast.metrics.psnr import psnr, sharpness, to_uint8

    offsets = list(model.schedule.frame_indices)  # the frames the VAE sees; the newest context frame is 16
    size = (model.preset.height, model.preset.width)
    ds = RawVideoDataset(raw_root, split, frame_offsets=offsets, size=size)
    count = min(limit, len(ds))
    sums = {name: {"psnr": 0.0, "sharpness": 0.0} for name in REFERENCES}
    for i in range(count):
        item = ds[i]
        frames = item["frames"]  # [25, 3, H, W] uint8, the last is frame 76
        target = frames[-1]
        with torch.no_grad():
            latents = model.encode_frames(frames[None])
            vae_frame = model.decode_latents(latents)[0, -1]
        bayes = torch.from_numpy(bayes_prediction(ds.dir, item["shard"], item["start"] + TARGET_FRAME))
        if bayes.shape[:2] != target.shape[1:]:
            raise ValueError(f"{ds.dir}: frames are {tuple(bayes.shape[:2])} pixels, the model's {tuple(size)}: write "
                             "the data at the model's resolution")
        predictions = {"bayes": to_uint8(bayes.permute(2, 0, 1) / 255.0), "vae": to_uint8(vae_frame),
                       "copy": frames[offsets.index(16)]}
        for name, frame in predictions.items():
            sums[name]["psnr"] += psnr(frame, target) / count
            sums[name]["sharpness"] += sharpness(frame) / count
    return sums


def read_rows(path: str) -> list[dict]:
    """psnr.csv of `wmfast eval-psnr`, numbers parsed."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        for key, value in r.items():
            if key != "solver":
                r[key] = float(value)
    return rows


def plot_ensemble(rows: list[dict], refs: dict, steps: int, path: str, subtitle: str) -> str:
    """PSNR (left) and sharpness (right) against N at `steps` denoising steps, first solver; references dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    solver = rows[0]["solver"]
    sel = sorted((r for r in rows if r["steps"] == steps and r["solver"] == solver), key=lambda r: r["ensemble"])
    ns = [r["ensemble"] for r in sel]
    fig, (ax_p, ax_s) = plt.subplots(1, 2, figsize=(12, 4.2))
    series = (("pixel", "ensemble mean (pixel averaging)", "o-"), ("latent", "ensemble mean (latent averaging)", "s--"),
              ("member", "one member (mean over members)", "^:"))
    for key, label, style in series:
        ax_p.plot(ns, [r[f"psnr_{key}"] for r in sel], style, label=label)
        ax_s.plot(ns, [r[f"sharpness_{key}"] for r in sel], style, label=label)
    ax_s.axhline(sel[0]["sharpness_target"], color="k", lw=1, label="the true frames")
    for i, (name, label) in enumerate(REFERENCES.items()):
        ax_p.axhline(refs[name]["psnr"], color=f"C{i + 3}", ls=":", label=label)
        ax_s.axhline(refs[name]["sharpness"], color=f"C{i + 3}", ls=":", label=label)
    for ax, ylabel in ((ax_p, "PSNR of frame 76 (dB)"), (ax_s, "sharpness: RMS gradient magnitude (grey levels/px)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns, [str(int(n)) for n in ns])
        ax.set_xlabel("ensemble size N")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Wan2.2-architecture world model (tiny, LoRA + state AdaLN-Zero), {solver}, {int(steps)} steps\n"
                 + subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_steps(rows: list[dict], refs: dict, path: str, subtitle: str) -> str:
    """PSNR against the denoising steps, one colour per solver: one member (dotted) and the largest ensemble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_max = max(r["ensemble"] for r in rows)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, solver in enumerate(dict.fromkeys(r["solver"] for r in rows)):
        sel = sorted((r for r in rows if r["solver"] == solver and r["ensemble"] == n_max), key=lambda r: r["steps"])
        steps = [r["steps"] for r in sel]
        ax.plot(steps, [r["psnr_pixel"] for r in sel], "o-", color=f"C{i}",
                label=f"{solver}: ensemble mean, N={n_max:g}")
        ax.plot(steps, [r["psnr_member"] for r in sel], "^:", color=f"C{i}", label=f"{solver}: one member")
    ax.axhline(refs["bayes"]["psnr"], color="C3", ls=":", label=REFERENCES["bayes"])
    ax.axhline(refs["vae"]["psnr"], color="C4", ls=":", label=REFERENCES["vae"])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("denoising steps")
    ax.set_ylabel("PSNR of frame 76 (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("PSNR against denoising steps\n" + subtitle, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
