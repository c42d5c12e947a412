"""Data for the compression track: the 1X v2.0 tokenized format (reader and synthetic writer)."""
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
