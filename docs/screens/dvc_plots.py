"""Screenshot of `dvc plots show` after the demo: docs/screens/dvc_plots.png.

    bash scripts/run.sh -- python docs/screens/dvc_plots.py [--work DIR] [--full]

Clones the repository's committed state into --work, runs the demo there (`dvc repro`, shrunk to
minutes by SMALL below unless --full; nothing when --work already holds an up-to-date run),
renders
`dvc plots show` as HTML and screenshots it with headless Chromium (Debian's `chromium` package).
DVC's page loads Vega from a CDN; this one loads the same releases of vega, vega-lite and
vega-embed from the npm registry's packages (`npm pack`, kept in --vendor), so it renders
offline. The page's template (dvc_plots_template.html, beside this file) lays the plots out side
by side, so that one 1600x1200 screen holds them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
# The releases DVC's own HTML loads (dvc_render.vega.VegaRenderer.SCRIPTS).
VEGA = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}
MARKER = "<!-- VEGA_SCRIPTS"
# The demo at a scale a busy 2-core machine runs in minutes (--full: the demo as committed): 64
# training and 16 validation scenes, 3 epochs per ratio (one of them the warm-up), batches of
# 4 + 4, one pretraining epoch on 32 scenes. Its scores are far below the demo's.
SMALL = {
    ("data_prep", "embedded", "n_train"): 64,
    ("data_prep", "embedded", "n_val"): 16,
    ("pretrain", "pretrained", "n_train"): 32,
    ("pretrain", "pretrained", "n_val"): 8,
    ("pretrain", "pretrained", "epochs"): 1,
    ("sweep", "epochs"): {"1_16": 3, "1_4": 3, "full": 3},
    ("run", "semi", "sup_only_epochs"): 1,
    ("run", "train", "batch_size_labeled"): 4,
    ("run", "train", "batch_size_unlabeled"): 4,
    ("run", "train", "checkpoint_every_iters"): 0,
    ("run", "loss", "supervised"): "ce",  # written out: the pretrain stage lists run.loss
}
WINDOW = "1600,1200"


def run(cmd: list[str], cwd: Path) -> None:
    print("+", " ".join(cmd), f"(in {cwd})", file=sys.stderr)
    subprocess.run(cmd, cwd=cwd, check=True)


def reproduce(work: Path, full: bool) -> None:
    """The demo in a clone of the committed repository (its own mlflow.db and results/), shrunk
    by SMALL unless `full`."""
    if not (work / "dvc.yaml").is_file():
        run(["git", "clone", "-q", str(ROOT), str(work)], ROOT)
        if not full:
            params = yaml.safe_load((work / "params.yaml").read_text())
            for keys, value in SMALL.items():
                section = params
                for key in keys[:-1]:
                    section = section.setdefault(key, {})
                section[keys[-1]] = value
            (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["dvc", "repro"], work)


def vendor_vega(folder: Path) -> list[Path]:
    """The minified builds of VEGA, unpacked from their npm packages into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    scripts = []
    for name, version in VEGA.items():
        script = folder / f"{name}-{version}.min.js"
        if not script.is_file():
            run(["npm", "pack", "--silent", f"{name}@{version}"], folder)
            with tarfile.open(folder / f"{name}-{version}.tgz") as tar:
                member = tar.extractfile(f"package/build/{name}.min.js")
                script.write_bytes(member.read())
        scripts.append(script)
    return scripts


def render_html(work: Path, scripts: list[Path]) -> Path:
    """`dvc plots show` with the template, the Vega scripts loaded from local files."""
    tags = "\n".join(f'    <script src="{s.as_uri()}"></script>' for s in scripts)
    template = (HERE / "dvc_plots_template.html").read_text()
    start = template.index(MARKER)
    end = template.index("-->", start) + len("-->")
    page = work / "dvc_plots_template.html"
    page.write_text(template[:start] + tags.strip() + template[end:])
    out = work / "dvc_plots"
    run(["dvc", "plots", "show", "--html-template", str(page), "-o", str(out)], work)
    return out / "index.html"


def screenshot(html: Path, png: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        sys.exit("expected Chromium on PATH, found none: apt-get install -y chromium")
    png.parent.mkdir(parents=True, exist_ok=True)
    run(
        [
            chromium,
            "--headless",
            "--no-sandbox",  # root in a container
            "--disable-gpu",
            "--hide-scrollbars",
            "--virtual-time-budget=20000",  # Vega renders after the page loads
            f"--window-size={WINDOW}",
            f"--screenshot={png}",
            html.as_uri(),
        ],
        html.parent,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/gtaseg-screens/demo"))
    parser.add_argument("--vendor", type=Path, default=Path("/tmp/gtaseg-screens/vendor"))
    parser.add_argument("--out", type=Path, default=HERE / "dvc_plots.png")
    parser.add_argument("--full", action="store_true", help="the demo's params.yaml as it is")
    parser.add_argument(
        "--no-repro", action="store_true", help="render --work's results as they are"
    )
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    work = args.work.absolute()
    if not args.no_repro:
        reproduce(work, args.full)
    screenshot(render_html(work, vendor_vega(args.vendor.absolute())), args.out.absolute())
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
