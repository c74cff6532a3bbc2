"""Data layer: dataset formats, split files, weak augmentation and paired loaders.

`formats` reads VOC / Cityscapes / folder layouts into id -> (image, mask) samples with input
checks; `splits` makes, imports and loads labelled / unlabelled id lists; `transforms` builds weak
training views and evaluation views; `loaders` pairs labelled and unlabelled batches with exact
resume; `embedded` writes the deterministic demo dataset.

The names below are imported on first use (PEP 562), so that `gtaseg.data.formats`, `splits` or
`embedded` can be imported without loading torch through `loaders`.
"""

from __future__ import annotations

import importlib
from typing import Any

_SOURCES = {
    "gtaseg.data.formats": (
        "DataError",
        "Sample",
        "class_names",
        "color_palette",
        "list_samples",
        "read_image",
        "read_mask",
    ),
    "gtaseg.data.loaders": (
        "Batch",
        "TrainData",
        "ValBatch",
        "make_predict_images",
        "make_train_data",
        "make_val_data",
    ),
    "gtaseg.data.splits": (
        "import_split",
        "load_split",
        "make_split",
        "parse_amount",
        "parse_id_list",
        "write_split",
    ),
}
_MODULE_OF = {name: module for module, names in _SOURCES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_MODULE_OF[name]), name)
