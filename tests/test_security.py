"""Artifacts that try to attack their loader, and secrets that must never leave the environment.

- A checkpoint, encoder-weights file or exported model folder carrying a pickle payload (it runs
  `touch <marker>` when unpickled by a trusting loader) is refused through the real command line,
  and the marker never appears. The checkpoint unit tests (tests/test_checkpoint.py) prove the same
  for `load_checkpoint` itself.
- A tracked training run with AWS / MLflow credentials in its environment writes none of them to
  anything it produces (MLflow store, artifacts, run folder, stdout/stderr, logs).
- No file of the repository holds something that looks like a real credential.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from gtaseg.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENCODER = "tu-test_resnet"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Exploit:
    """Runs a shell command when unpickled by a loader that trusts the pickle."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_payload(path: Path, marker: Path, writer: str = "torch.save", wrap=None) -> Path:
    """A file whose unpickling creates `marker`, wrapped in a plausible structure."""
    payload = Exploit(f"touch {marker}")
    payload = wrap(payload) if wrap else payload
    with open(path, "wb") as file:
        if writer == "torch.save":
            torch.save(payload, file)
        else:
            pickle.dump(payload, file, protocol=2)
    return path


def add_valid_sidecar(path: Path) -> None:
    # The digest only detects corruption; an attacker who can write the file can write it too.
    path.with_name(path.name + ".sha256").write_text(
        hashlib.sha256(path.read_bytes()).hexdigest() + "\n"
    )


def checkpoint_like(payload: object) -> dict:
    return {"method": {"student": payload}, "config": {}, "loop": {}, "rng": {}}


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_evaluate_refuses_a_malicious_checkpoint(writer, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    add_valid_sidecar(write_payload(tmp_path / "evil.pt", marker, writer, checkpoint_like))
    before = sorted(p.name for p in tmp_path.iterdir())

    code = main(["evaluate", "--checkpoint", "evil.pt", "--device", "cpu"])

    err = capsys.readouterr().err
    assert code == 2, err
    assert "checkpoint evil.pt was refused: it is not a plain weights file" in err
    assert "system" in err  # the refused global is named
    assert not marker.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def tiny_config(tiny_raw: dict, path: Path, **model: object) -> Path:
    raw = {key: dict(value) for key, value in tiny_raw.items()}
    raw["model"].update(encoder=ENCODER, **model)
    raw["train"].update(method="supervised", max_iters=2)
    path.write_text(yaml.safe_dump({"run": raw}, sort_keys=False))
    return path


def test_train_refuses_to_resume_from_a_malicious_checkpoint(
    tiny_raw, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    config = tiny_config(tiny_raw, tmp_path / "cfg.yaml")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    evil = write_payload(tmp_path / "run/checkpoints/last.pt", marker, wrap=checkpoint_like)
    add_valid_sidecar(evil)

    with pytest.warns(UserWarning, match="refused"):
        code = main(["train", "--config", str(config), "--out", "run", "--no-progress"])

    err = capsys.readouterr().err
    assert code == 2, err
    assert "no loadable checkpoint in run/checkpoints" in err and "refused" in err
    assert not marker.exists()
    assert sorted(p.name for p in (tmp_path / "run").rglob("*")) == [
        "checkpoints", "last.pt", "last.pt.sha256"
    ]  # fmt: skip


def test_malicious_encoder_weights_are_refused(tiny_raw, tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    write_payload(tmp_path / "imagenet.pth", marker, wrap=lambda p: {"conv1.weight": p})
    config = tiny_config(tiny_raw, tmp_path / "cfg.yaml", encoder_weights="imagenet.pth")

    code = main(["train", "--config", str(config), "--out", "run", "--no-progress"])

    err = capsys.readouterr().err
    assert code == 2, err
    assert "model.encoder_weights: cannot read imagenet.pth as a torch state dict" in err
    assert "GLOBAL" in err and "system" in err
    assert not marker.exists() and not (tmp_path / "run").exists()


# -- exported model folders (gtaseg predict) ----------------------------------------------------


@pytest.fixture
def exported(tmp_path: Path) -> Path:
    """A genuine export (smp save_pretrained: config.json + model.safetensors, and the run's
    normalization.json) and one image."""
    import segmentation_models_pytorch as smp
    from PIL import Image

    from gtaseg.config import DataConfig
    from gtaseg.evaluation.inference import export_model

    model = smp.DeepLabV3Plus(
        encoder_name=ENCODER, encoder_weights=None, classes=3, encoder_output_stride=16,
        decoder_atrous_rates=(1, 2, 3), decoder_channels=16,
    )  # fmt: skip
    export_model(model, tmp_path / "model", DataConfig())
    (tmp_path / "images").mkdir()
    Image.new("RGB", (32, 32), (90, 120, 30)).save(tmp_path / "images" / "a.png")
    return tmp_path / "model"


def predict(model_dir: Path, capsys) -> tuple[int, str]:
    code = main(["predict", "--model", str(model_dir), "--images", "images", "--out", "pred",
                 "--device", "cpu"])  # fmt: skip
    return code, capsys.readouterr().err


def test_predict_never_unpickles_a_model_folder(exported, tmp_path, monkeypatch, capsys) -> None:
    """A pickle beside config.json (the PyTorch-weights name) is not what an export holds."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    (exported / "model.safetensors").unlink()
    write_payload(exported / "pytorch_model.bin", marker, wrap=lambda p: {"weight": p})

    code, err = predict(exported, capsys)

    assert code == 2, err
    assert "model.safetensors" in err
    assert not marker.exists() and not list(tmp_path.glob("pred/*"))


def test_predict_refuses_a_pickle_disguised_as_safetensors(
    exported, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "pwned"
    write_payload(exported / "model.safetensors", marker, writer="pickle.dump")

    code, err = predict(exported, capsys)

    assert code == 2, err
    assert f"{exported}: cannot load the exported model" in err and "Re-export it" in err
    assert not marker.exists() and not list(tmp_path.glob("pred/*"))


def test_predict_refuses_a_config_naming_a_non_model(
    exported, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    config = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(json.dumps({**config, "_model_class": "encoders"}))

    code, err = predict(exported, capsys)

    assert code == 2, err
    assert "_model_class 'encoders' is not an smp model class" in err


def test_predict_never_downloads_weights_a_config_asks_for(
    exported, tmp_path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)
    import huggingface_hub.constants

    # offline: an attempt to download fails at once instead of retrying for a minute (or working)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(json.dumps({**config, "encoder_weights": "imagenet"}))

    code, err = predict(exported, capsys)

    assert code == 0, err  # the folder's own weights are used; nothing is fetched
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == ["a_mask.png", "a_overlay.png"]


# -- secrets ------------------------------------------------------------------------------------


def find_secrets(data: bytes, values: dict[str, str]) -> list[str]:
    return [name for name, value in values.items() if value.encode() in data]


def test_secret_scan_finds_what_it_looks_for() -> None:
    values = {"AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
    assert find_secrets(f"x={values['AWS_SECRET_ACCESS_KEY']}\n".encode(), values) == [
        "AWS_SECRET_ACCESS_KEY"
    ]
    assert find_secrets(b"nothing here", values) == []


@pytest.mark.slow
def test_a_tracked_run_writes_no_credential_anywhere(
    tiny_dataset, tmp_path, monkeypatch, capfd, caplog
) -> None:
    from pipelines import stages
    from pipelines.params import load_params

    values = {
        "AWS_ACCESS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(),
        "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
        "MLFLOW_TRACKING_USERNAME": "user-" + secrets.token_hex(6),
        "MLFLOW_TRACKING_PASSWORD": secrets.token_urlsafe(24),
        "MLFLOW_TRACKING_TOKEN": secrets.token_urlsafe(24),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # params: sqlite:///mlflow.db here
    monkeypatch.delenv("GTASEG_TRAIN_LAUNCHER", raising=False)
    from mlflow.tracking._tracking_service import utils

    # An earlier in-process tracked run may have pinned mlflow's global URI; unpin it (the
    # autouse conftest fixture restores it after this test).
    monkeypatch.setattr(utils, "_tracking_uri", None)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sweep"].update(ratios=["1_4"], methods=["supervised"], epochs={"1_4": 1, "full": 1})
    run = params["run"]
    run["data"].update(root=str(tiny_dataset), crop_size=32, num_classes=11)
    run["model"].update(encoder=ENCODER, decoder_channels=16, encoder_weights=None)
    run["train"].update(batch_size_labeled=2, batch_size_unlabeled=2, max_iters=3)
    run["eval"]["max_images"] = 2
    params["tracking"]["log_models"] = "every_run"  # the MLflow model's files are scanned too
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    caplog.set_level(logging.DEBUG)
    stages.split(load_params("params.yaml"), "1_4", 0)

    summary = stages.train("params.yaml", "1_4", "supervised", 0, progress=False)

    produced = sorted(p for p in work.rglob("*") if p.is_file())
    assert (work / "mlflow.db").is_file() and summary["run_id"]
    assert b"train.method" in (work / "mlflow.db").read_bytes()  # the store holds the run
    assert any(p.name == "metrics.json" and "runs" not in p.parts for p in produced)  # artifacts
    assert any(p.name == "MLmodel" for p in produced)  # every_run: the stage logged the model
    out, err = capfd.readouterr()
    leaks = {
        str(p.relative_to(work)): found
        for p in produced
        if (found := find_secrets(p.read_bytes(), values))
    }
    for name, text in (("stdout", out), ("stderr", err), ("log records", caplog.text)):
        if found := find_secrets(text.encode(), values):
            leaks[name] = found
    assert leaks == {}


# -- the repository itself ----------------------------------------------------------------------

AWS_KEY_ID = re.compile(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b")
PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
LONG_TOKEN = re.compile(  # 32+ base64 characters mixing upper, lower and digits (not a hex hash)
    r"(?<![\w+/=-])(?=[\w+/]*[a-z])(?=[\w+/]*[A-Z])(?=[\w+/]*\d)[A-Za-z0-9+/]{32,}={0,2}(?![\w+/=-])"
)
FILE_SUFFIX = re.compile(r"\.[A-Za-z0-9]{1,5}\b")
SECRET_NAME = r"[\w.-]*(?:secret|passw(?:or)?d|token|access[_-]?key|api[_-]?key)[\w.-]*"
CONFIG_ASSIGNMENT = re.compile(rf"(?i){SECRET_NAME}['\"]?\s*[:=]\s*['\"]?([^\s'\"#,}})]+)")
# raw strings (r"...") are left out: they hold this file's own patterns, not credentials
CODE_LITERAL = re.compile(rf"(?i){SECRET_NAME}\s*[:=]\s*[bf]?['\"]([^'\"]{{8,}})['\"]")
PLACEHOLDER = re.compile(r"(?i)^\$|example|change-me|never-print-me|unknown|placeholder|dummy|fake")
CREDENTIAL_FILES = re.compile(r"(^|/)(\.env|.*\.pem|id_rsa|id_ed25519|credentials|\.netrc)$")


def repository_files() -> list[str]:
    """What is or would be committed: tracked files plus untracked ones git does not ignore."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout")
    return [name for name in listed.stdout.splitlines() if (ROOT / name).is_file()]


def credential_findings(name: str, text: str) -> list[str]:
    found = [f"AWS key id {m}" for m in AWS_KEY_ID.findall(text) if not PLACEHOLDER.search(m)]
    found += ["a private key"] * bool(PRIVATE_KEY.search(text))
    found += [
        f"long token {m.group()[:12]}..."
        for m in LONG_TOKEN.finditer(text)
        if not FILE_SUFFIX.match(text, m.end())  # a file path such as a/B/c1/train.txt
    ]
    assignment = CODE_LITERAL if name.endswith(".py") else CONFIG_ASSIGNMENT
    found += [
        f"secret-named value {value[:4]}..."
        for value in assignment.findall(text)
        if len(value) >= 8 and not PLACEHOLDER.search(value)
    ]
    return found


def test_scanner_flags_real_looking_credentials() -> None:
    key_id, token = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    assert credential_findings("x.yaml", f"aws_secret_access_key: {token}\nid: {key_id}\n")
    assert credential_findings("x.py", f'PASSWORD = "{token}"')
    assert credential_findings("x.yaml", f"key: {'Zm9vYmFy' * 5}\n")  # no file suffix: a token
    path = "pool: data/VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt\n"
    assert credential_findings("x.yaml", path) == []  # a file path, not a token
    assert credential_findings("infra/.env.example", "S3_SECRET_ACCESS_KEY=change-me-x") == []
    assert (
        credential_findings("x.yaml", "AWS_SECRET_ACCESS_KEY: ${S3_SECRET_ACCESS_KEY:?set}") == []
    )


def test_no_credential_in_the_repository() -> None:
    findings = {}
    for name in repository_files():
        if CREDENTIAL_FILES.search(name):
            findings[name] = ["a credentials file"]
            continue
        data = (ROOT / name).read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary (images, models): not where credentials are typed
        if found := credential_findings(name, data.decode("utf-8", errors="replace")):
            findings[name] = found
    assert findings == {}


def test_env_example_holds_only_placeholders() -> None:
    example = ROOT / "infra" / ".env.example"
    values = [
        line.split("=", 1)[1]
        for line in example.read_text().splitlines()
        if "=" in line and not line.lstrip().startswith("#")
    ]
    assert values and all(PLACEHOLDER.search(v) for v in values), values
    assert shutil.which("git") is None or "infra/.env" not in repository_files()
