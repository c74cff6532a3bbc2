"""What the pipeline makes itself instead of reading it from disk: the embedded demo dataset
(`data_prep.<name>` -> data/<name>) and the specs of the demo's pretrained encoder
(`pretrain.<name>` -> models/<name>/encoder.pth; trained by `pipelines.pretraining`). Both exist
only as entries of params.yaml; another dataset has none.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from gtaseg.config import Config, ConfigError
from pipelines.params import PipelineParams, embedded_dir

PRETRAIN_DATA = Path("data/pretrain")  # data/pretrain/<name>/: the scenes (embedded/), split/


def params_entry(params: PipelineParams, section: str, name: str) -> Any:
    entries = getattr(params, section)
    if name not in entries:
        raise ConfigError(
            f"{section} has no entry {name!r}; expected one of {sorted(entries)} (params.yaml)."
        )
    return entries[name]


def prepare(params: PipelineParams, name: str) -> Path:
    """Write the embedded dataset `data_prep.<name>` to data/<name> when run.data reads it."""
    p, out, data = params_entry(params, "data_prep", name), embedded_dir(name), params.run.data
    if params.dataset_entry() != name:
        out.mkdir(parents=True, exist_ok=True)  # the stage's output, empty
        print(
            f"data_prep.{name}: run.data reads {data.format} data from {data.root}, not {out}: "
            f"nothing generated. Remove the entry (data_prep: {{}}) to drop the stage."
        )
        return out
    if data.num_classes != len(p.digits) + 1:
        raise ConfigError(
            f"run.data.num_classes is {data.num_classes} but data_prep.{name}.digits draws "
            f"{len(p.digits)} digit classes {list(p.digits)}: expected num_classes = "
            f"{len(p.digits) + 1} (background + digits). Fix one of the two in params.yaml."
        )
    from gtaseg.data.embedded import make_embedded

    return make_embedded(
        out,
        n_train=p.n_train,
        n_val=p.n_val,
        size=p.size,
        seed=p.seed,
        overwrite=True,
        style=p.style(),
    )


def style_entry(params: PipelineParams, name: str) -> str:
    """The data_prep entry the pretraining scenes take their style from: the run's dataset."""
    used = params.dataset_entry()
    if used is None:
        raise ConfigError(
            f"pretrain.{name} draws its scenes in the style of the embedded dataset the runs read, "
            f"but run.data reads {params.run.data.format} data from {params.run.data.root}, which "
            f"no data_prep entry generates. Point run.model.encoder_weights at your own weights "
            f"(and set pretrain: {{}}), or generate the dataset with a data_prep entry."
        )
    return used


def pretrain_spec(params: PipelineParams, name: str) -> dict[str, Any]:
    """Everything the pretrained encoder depends on (a flow reuses the file when this matches)."""
    run = params.run
    spec = {
        "pretrain": dataclasses.asdict(params_entry(params, "pretrain", name)),
        "data_prep": dataclasses.asdict(params.data_prep[style_entry(params, name)]),
        "model": dataclasses.asdict(run.model) | {"encoder_weights": None},
        "optim": dataclasses.asdict(run.optim),
        "crop_size": run.data.crop_size,
        "scale_range": list(run.data.scale_range),
        "flip": run.data.flip,
        "batch_size": run.train.batch_size_labeled,
    }
    return json.loads(json.dumps(spec))  # tuples as lists, as pretrain.json reads back


def generated_inputs(params: PipelineParams) -> dict[str, Any]:
    """The specs of what the runs read that the pipeline generated (part of each cell's key)."""
    dataset, encoder = params.dataset_entry(), params.pretrain_entry()
    return json.loads(
        json.dumps(
            {
                "data_prep": dataclasses.asdict(params.data_prep[dataset]) if dataset else None,
                "pretrain": pretrain_spec(params, encoder) if encoder else None,
            }
        )
    )


def pretrain_config(params: PipelineParams, name: str) -> Config:
    """The `run:` architecture and optimiser, supervised on all pretraining scenes, from scratch."""
    p, run = params_entry(params, "pretrain", name), params.run
    return dataclasses.replace(
        run,
        data=dataclasses.replace(
            run.data,
            format="embedded",
            root=str(PRETRAIN_DATA / name / "embedded"),
            split_dir=str(PRETRAIN_DATA / name / "split"),
            num_classes=len(p.digits) + 1,
            val_list=None,
        ),
        model=dataclasses.replace(run.model, encoder_weights=None),
        train=dataclasses.replace(
            run.train, method="supervised", seed=p.seed, epochs=p.epochs, max_iters=None
        ),
    )
