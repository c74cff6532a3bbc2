"""Data layer: dataset formats, split files, weak augmentation and paired loaders.

`formats` reads VOC / Cityscapes / folder layouts into id -> (image, mask) samples with input
checks; `splits` makes, imports and loads labelled / unlabelled id lists; `transforms` builds weak
training views and evaluation views; `loaders` pairs labelled and unlabelled batches with exact
resume; `embedded` writes the deterministic demo dataset.
"""

from gtaseg.data.formats import (
    DataError,
    Sample,
    class_names,
    color_palette,
    list_samples,
    read_image,
    read_mask,
)
from gtaseg.data.loaders import (
    Batch,
    TrainData,
    ValBatch,
    make_predict_images,
    make_train_data,
    make_val_data,
)
from gtaseg.data.splits import (
    import_split,
    load_split,
    make_split,
    parse_amount,
    parse_id_list,
    write_split,
)

__all__ = [
    "Batch",
    "DataError",
    "Sample",
    "TrainData",
    "ValBatch",
    "class_names",
    "color_palette",
    "import_split",
    "list_samples",
    "load_split",
    "make_predict_images",
    "make_split",
    "make_train_data",
    "make_val_data",
    "parse_amount",
    "parse_id_list",
    "read_image",
    "read_mask",
    "write_split",
]
