"""Data in the 1X formats, one file format a module: format (the tokenized v2.0 constants), layout (where a
split's files sit, flat or nested; the field checks every reader runs when it opens a split; how the writers
replace a split whole), tokenized (reader), synthetic (tokenized writer), raw (mp4 video + states of the
sampling track: reader and synthetic writer), check (every split of a dataset checked, problems collected:
`wmfast data check`), latents (precomputed VAE latents of a raw set), checkpoints (the layout of a training
run's checkpoints). The compression-track names are exported here; import the others from their modules."""
from wmfast.data.format import GRID_OF_FRAME, SAMPLE_FRAMES, SAMPLE_GRIDS, VOCAB_SIZE, WINDOW
from wmfast.data.synthetic import write_split, write_synthetic_dataset
from wmfast.data.tokenized import DataFormatError, TokenizedDataset, make_dataloader, resolve_split_dir

__all__ = [
    "GRID_OF_FRAME",
    "SAMPLE_FRAMES",
    "SAMPLE_GRIDS",
    "VOCAB_SIZE",
    "WINDOW",
    "DataFormatError",
    "TokenizedDataset",
    "make_dataloader",
    "resolve_split_dir",
    "write_split",
    "write_synthetic_dataset",
]
