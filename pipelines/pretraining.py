"""The demo's pretrained encoder (`pretrain.<name>` in params.yaml -> models/<name>/encoder.pth):
a tracked training run on scenes of digit classes the demo never sees (specs: pipelines.generate).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from gtaseg.config import Config
from gtaseg.io import write_atomic
from pipelines.cells import FULL, base_tags
from pipelines.generate import (
    PRETRAIN_DATA,
    params_entry,
    pretrain_config,
    pretrain_spec,
    style_entry,
)
from pipelines.params import MODELS_DIR, PipelineParams, encoder_file


def _pretrain_scenes(params: PipelineParams, name: str) -> Config:
    """Write the pretraining scenes and their all-labelled split; their run config."""
    from gtaseg.data.embedded import make_embedded
    from gtaseg.data.formats import list_samples
    from gtaseg.data.splits import make_split, parse_amount, write_split

    p, style_of = params.pretrain[name], params.data_prep[style_entry(params, name)]
    style = dataclasses.replace(style_of.style(), digits=tuple(p.digits))
    make_embedded(
        PRETRAIN_DATA / name / "embedded",
        n_train=p.n_train,
        n_val=p.n_val,
        size=style_of.size,
        seed=p.seed,
        overwrite=True,
        style=style,
    )
    cfg = pretrain_config(params, name)
    ids = list(list_samples(cfg.data, "train"))
    write_split(Path(cfg.data.split_dir), *make_split(ids, parse_amount(FULL), p.seed))
    return cfg


def pretrain(
    params: PipelineParams, name: str, reuse: bool = False, progress: bool = True
) -> Path | None:
    """Train the demo's pretrained encoder `pretrain.<name>`: the paper starts from ImageNet
    weights, which cannot be downloaded here, so the demo pretrains on scenes of digit classes it
    never trains or evaluates on (`digits`), with all their labels, and keeps the encoder.

    `reuse`: keep an existing encoder whose pretrain.json records the same inputs (the flows; DVC
    decides that itself). Any other start trains from scratch into a cleared run folder. When
    `run.model.encoder_weights` names another file (or none), nothing is trained: pretrain.json
    says so and None is returned.
    """
    p, out = params_entry(params, "pretrain", name), encoder_file(name)
    folder, scenes = MODELS_DIR / name, PRETRAIN_DATA / name
    record = folder / "pretrain.json"
    if params.pretrain_entry() != name:
        folder.mkdir(parents=True, exist_ok=True)
        scenes.mkdir(parents=True, exist_ok=True)
        reason = (
            f"run.model.encoder_weights is {params.run.model.encoder_weights}, not {out}: "
            f"nothing to pretrain"
        )
        write_atomic(record, json.dumps({"skipped": reason}, indent=2) + "\n")
        print(reason)
        return None
    spec = pretrain_spec(params, name)
    if reuse and out.is_file() and record.is_file():
        if json.loads(record.read_text()).get("spec") == spec:
            print(f"pretrained encoder {out} is up to date")
            return out
    from gtaseg.evaluation.inference import export_encoder
    from pipelines.tracking_run import tracked_training

    cfg = _pretrain_scenes(params, name)
    run_folder = folder / "run"
    if run_folder.exists():
        shutil.rmtree(run_folder)  # never resume a pretraining made with other inputs
    tags = base_tags("pretrain", "supervised", p.seed, f"embedded:{cfg.data.root}")
    summary = tracked_training(params, cfg, run_folder, "pretrain", tags, None, progress)
    info = export_encoder(run_folder / "model", out)
    write_atomic(
        record,
        json.dumps(
            {
                "spec": spec,
                "encoder": info,
                "best_val_miou": summary["best_val_miou_student"],
                "wall_time_s": summary["wall_time_s"],
            },
            indent=2,
        )
        + "\n",
    )
    return out
