"""What a training cell reads, handed from the sweep to a job that shares no disk with it.

The sweep publishes each input of a cell to storage (content-addressed,
`pipelines.cluster.storage`): the params file, the dataset (`run.data.root`), the cell's split
lists, the encoder weights and a validation list kept outside the dataset. The cell's flow run gets
`inputs` = {path: digest} and fetches them to the same paths in its own folder, so every relative
path in the params file means what it meant to the sweep. A params file given as s3://... is fetched
the same way.
"""

from __future__ import annotations

from pathlib import Path

from gtaseg.errors import GtasegError
from pipelines.cells import split_dir
from pipelines.cluster.storage import STORAGE_ENV, Storage, download_uri, parse_s3_uri
from pipelines.params import PipelineParams

CONFIG_DIR = Path(".gtaseg/config")  # where a params file given as s3://... is fetched to


class NoStorage(GtasegError, RuntimeError):
    """Cells launched on a work pool need the storage root, and none is set."""


def require_storage(why: str) -> Storage:
    storage = Storage.from_env()
    if storage is None:
        raise NoStorage(
            f"{why}: expected the storage root in {STORAGE_ENV} (e.g. s3://gtaseg-runs/gtaseg), "
            f"found it unset. A job on a work pool starts in an empty folder and gets its inputs "
            f"from there: set {STORAGE_ENV} (and the AWS_* credentials) where the sweep and the "
            f"workers run (infra/README.md), or run the sweep without train_deployment."
        )
    return storage


def local_config(config_path: str) -> str:
    """A local path to the params file: itself, or an s3://... one fetched to CONFIG_DIR."""
    if not config_path.startswith("s3://"):
        return config_path
    target = CONFIG_DIR / Path(parse_s3_uri(config_path)[1]).name
    download_uri(config_path, target)
    return target.as_posix()


def cell_input_paths(params: PipelineParams, config_path: str, ratio: str, seed: int) -> list[Path]:
    """What a training cell reads: the params file, the dataset, its split, the encoder weights,
    a validation list outside the dataset (paths as the params file writes them)."""
    data, root = params.run.data, Path(params.run.data.root)
    paths = [Path(config_path), root, split_dir(ratio, seed)]
    for extra in (data.val_list, params.run.model.encoder_weights):
        if extra and not Path(extra).is_relative_to(root):
            paths.append(Path(extra))
    return paths


def publish_inputs(
    storage: Storage,
    params: PipelineParams,
    config_path: str,
    cells: list[tuple[str, str, int]],
) -> dict[str, dict[str, str]]:
    """Publish every input of `cells`; returns {"<ratio>/<seed>": {path: digest}} (one entry per
    split: the methods of a ratio and seed read the same inputs). Each path is hashed once."""
    digests: dict[Path, str] = {}
    inputs: dict[str, dict[str, str]] = {}
    for ratio, _, seed in cells:
        entry = inputs.setdefault(f"{ratio}/{seed}", {})
        for path in cell_input_paths(params, config_path, ratio, seed):
            if path not in digests:
                digests[path] = storage.publish(path)
            entry[path.as_posix()] = digests[path]
    return inputs


def fetch_inputs(storage: Storage, inputs: dict[str, str]) -> None:
    """Write each published input at its path (files already there and equal are kept)."""
    for path, digest in inputs.items():
        storage.fetch(digest, Path(path))
