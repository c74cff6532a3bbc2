"""`gtaseg` command line: make the embedded dataset, make splits, train, evaluate, predict,
export an encoder, bench."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from gtaseg.config import DEVICE, apply_overrides, load_config
from gtaseg.errors import GtasegError
from gtaseg.startup import import_without_gc, run_entry

# Subcommands whose parser lives in a module that imports torch and smp (seconds): registered in
# full only when invoked; otherwise a one-line entry keeps them in `gtaseg --help`.
LAZY_PARSERS = {
    "bench": (
        "gtaseg.bench.step",
        "add_bench_parser",
        "time supervised, GTA-Seg (faithful, efficient) and the original's step",
    ),
    "bench-loop": (
        "gtaseg.bench.loop",
        "add_bench_loop_parser",
        "time the whole training "
        "loop (data included) of supervised and GTA-Seg, beside the step bench",
    ),
}

# What a subcommand imports, loaded with the garbage collector off (gtaseg.startup).
COMMAND_MODULES = {
    "train": ("gtaseg.training.loop",),
    "evaluate": ("gtaseg.evaluation.inference",),
    "predict": ("gtaseg.evaluation.inference",),
    "export-encoder": ("gtaseg.evaluation.inference",),
}

EPILOG = """examples:
  gtaseg make-data --root data/embedded
  gtaseg split --config params.yaml --amount 1/16 --seed 0 --out data/splits/embedded/1_16/seed0
  gtaseg train --config params.yaml --out runs/gta --set train.method=gta train.epochs=2
  gtaseg evaluate --checkpoint runs/gta/checkpoints/best.pt --network teacher
  gtaseg predict --model runs/gta/model --images my_images/ --out predictions/
  gtaseg export-encoder --model runs/gta/model --out weights/encoder.pth
"""


class CommandError(GtasegError, RuntimeError):
    """A failure outside the inputs that the user can fix (e.g. a service that is down); the
    message says how. Printed without a traceback, like a bad input."""


def device_arg(value: str) -> str:
    """argparse type of --device: a wrong one ends in the usage line, not torch's traceback."""
    if DEVICE.fullmatch(value) is None:
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def fraction_arg(value: str) -> float:
    """argparse type of a number in [0, 1]."""
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number from 0 to 1, got {value!r}")
    return number


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--config",
        default="params.yaml",
        help="YAML config; its `run:` section is used when present (default: params.yaml)",
    )
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override config values, e.g. train.method=supervised data.crop_size=64",
    )


def _config(args: argparse.Namespace):
    return apply_overrides(load_config(args.config), args.set)


def cmd_make_data(args: argparse.Namespace) -> None:
    if args.kind == "shapes":
        from gtaseg.data.shapes import make_shapes

        root = make_shapes(
            Path(args.root),
            n_train=args.n_train,
            n_val=args.n_val,
            size=args.size,
            seed=args.seed,
            overwrite=args.overwrite,
        )
        print(f"shapes dataset written to {root} (data.format: folder, data.num_classes: 6)")
        return
    from gtaseg.data.embedded import SceneStyle, make_embedded

    style = SceneStyle(
        tuple(args.digits),
        tuple(args.per_scene),
        tuple(args.digit_size),
        tuple(args.distractors),
        args.vivid_distractors,
    )
    root = make_embedded(
        Path(args.root),
        n_train=args.n_train,
        n_val=args.n_val,
        size=args.size,
        seed=args.seed,
        overwrite=args.overwrite,
        style=style,
    )
    print(f"embedded dataset written to {root}")


def cmd_split(args: argparse.Namespace) -> None:
    from gtaseg.data.formats import list_samples
    from gtaseg.data.splits import draw_split, import_split, parse_amount, write_split

    cfg = _config(args)
    ids = list(list_samples(cfg.data, "train"))
    out = Path(args.out)
    if args.import_from:
        import_split(Path(args.import_from), out, ids)
    else:
        write_split(out, *draw_split(cfg.data, parse_amount(args.amount), args.seed))
    n_l = len((out / "labeled.txt").read_text().split())
    print(f"split written to {out}: {n_l} labelled of {len(ids)} training images")


def cmd_train(args: argparse.Namespace) -> None:
    from gtaseg.training.loop import train

    cfg = _config(args)
    tracker = None
    if args.mlflow_experiment:
        from gtaseg.tracking.mlflow_tracker import MlflowTracker, TrackingUnavailable

        fallback = Path(args.mlflow_fallback) if args.mlflow_fallback else None
        try:
            tracker = MlflowTracker(
                experiment=args.mlflow_experiment,
                run_name=Path(args.out).name,
                fallback_dir=fallback,
            )
        except TrackingUnavailable as exc:  # before any training: nothing written yet
            raise CommandError(f"{exc} (command line: --mlflow-fallback DIR)") from None
    status = "FAILED"
    try:
        summary = train(
            cfg, args.out, tracker=tracker, resume=not args.no_resume, progress=not args.no_progress
        )
        status = "FINISHED"
    finally:
        if tracker is not None:  # also on failure: buffered metrics are delivered, not lost
            tracker.close(status)
    print(json.dumps(summary, indent=2))


def cmd_evaluate(args: argparse.Namespace) -> None:
    from gtaseg.evaluation.inference import evaluate_checkpoint

    result = evaluate_checkpoint(Path(args.checkpoint), args.network, args.set, args.device)
    print(json.dumps(result, indent=2))


def cmd_predict(args: argparse.Namespace) -> None:
    from gtaseg.evaluation.inference import predict_folder

    written = predict_folder(
        Path(args.model), Path(args.images), Path(args.out), args.device, overlay_alpha=args.alpha
    )
    print(f"wrote {len(written)} masks and overlays to {args.out}")


def cmd_export_encoder(args: argparse.Namespace) -> None:
    from gtaseg.evaluation.inference import export_encoder

    info = export_encoder(Path(args.model), Path(args.out))
    print(
        f"wrote the {info['encoder']} encoder (depth {info['encoder_depth']}, "
        f"{info['tensors']} tensors) to {info['path']}; use it with "
        f"--set model.encoder_weights={info['path']}"
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The `gtaseg` parser; `command` (the subcommand about to run) loads its lazy parser."""
    parser = argparse.ArgumentParser(
        prog="gtaseg",
        description="GTA-Seg semi-supervised semantic segmentation (Gentle Teaching Assistant).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "make-data",
        help="write a synthetic dataset (folder format): the "
        "embedded digit scenes, or textured shapes",
    )
    p.add_argument(
        "--kind",
        choices=["digits", "shapes"],
        default="digits",
        help="digits: the embedded demo's handwritten-digit scenes (format embedded); "
        "shapes: 5 textured shape classes over varied backgrounds, 6 classes with "
        "background (format folder); the style flags apply to digits only "
        "(default: digits)",
    )
    p.add_argument("--root", default="data/embedded", help="output folder (default: data/embedded)")
    p.add_argument("--n-train", type=int, default=1024, help="training scenes (default: 1024)")
    p.add_argument("--n-val", type=int, default=256, help="validation scenes (default: 256)")
    p.add_argument("--size", type=int, default=64, help="scene side in pixels (default: 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing different dataset")
    style = p.add_argument_group(
        "scene style (defaults: the hardest variant; params.yaml's data_prep holds the demo's)"
    )
    style.add_argument(
        "--digits",
        type=int,
        nargs="+",
        default=list(range(10)),
        metavar="D",
        help="digit classes drawn; data.num_classes = count + 1 (default: 0-9)",
    )
    style.add_argument(
        "--per-scene",
        type=int,
        nargs=2,
        default=[2, 5],
        metavar=("LO", "HI"),
        help="digits per scene (default: 2 5)",
    )
    style.add_argument(
        "--digit-size",
        type=float,
        nargs=2,
        default=[0.21875, 0.46875],
        metavar=("LO", "HI"),
        help="digit side / scene side (default: 0.21875 0.46875, 14-30 px on 64)",
    )
    style.add_argument(
        "--distractors",
        type=int,
        nargs=2,
        default=[2, 6],
        metavar=("LO", "HI"),
        help="background strokes and blobs per scene (default: 2 6)",
    )
    style.add_argument(
        "--vivid-distractors",
        type=float,
        default=0.25,
        metavar="F",
        help="share of distractors as vivid as digits (default: 0.25)",
    )
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("split", help="write labeled.txt / unlabeled.txt for a label ratio or count")
    _add_config_args(p)
    p.add_argument(
        "--amount",
        default="1/16",
        help="label ratio (1/16, 0.125) or count (92, 183, ...) or 'full' (default: "
        "1/16); labelled ids come from data.labeled_pool when the config sets it",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder for the two lists")
    p.add_argument(
        "--import-from",
        metavar="DIR",
        help="import an existing canonical split (labeled.txt/unlabeled.txt) instead",
    )
    p.set_defaults(func=cmd_split)

    p = sub.add_parser("train", help="train one run (resumes if --out holds a checkpoint)")
    _add_config_args(p)
    p.add_argument("--out", required=True, help="run folder for checkpoints, model and metrics")
    p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--mlflow-experiment", help="also log to MLflow (MLFLOW_TRACKING_URI or ./mlruns)"
    )
    p.add_argument(
        "--mlflow-fallback",
        metavar="DIR",
        help="if the MLflow server is unreachable at start, log to JSONL files in DIR "
        "(replay later with gtaseg.tracking.mlflow_tracker.replay_jsonl) instead of failing",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="evaluate a checkpoint's student or teacher on the val set")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--network", choices=["student", "teacher", "assistant"], default="student")
    p.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="override the checkpoint's config (e.g. eval.mode=sliding data.root=...)",
    )
    p.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="predict masks and colour overlays for a folder of images")
    p.add_argument(
        "--model",
        required=True,
        help="a run's model/ folder (smp save_pretrained; "
        "images are normalised with the run's data.mean/std from normalization.json)",
    )
    p.add_argument("--images", required=True, help="folder of .png/.jpg images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--alpha", type=fraction_arg, default=0.5, help="overlay opacity (default: 0.5)")
    p.add_argument("--device", default="auto", type=device_arg, help="auto | cpu | cuda | cuda:N")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser(
        "export-encoder",
        help="save a trained model's encoder as pretrained weights for model.encoder_weights",
    )
    p.add_argument("--model", required=True, help="a run's model/ folder (smp save_pretrained)")
    p.add_argument("--out", required=True, help="output .pth file (plain tensors)")
    p.set_defaults(func=cmd_export_encoder)

    for name, (module, adder, summary) in LAZY_PARSERS.items():
        if command == name:
            import_without_gc(module)
            getattr(importlib.import_module(module), adder)(sub)
        else:
            sub.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    modules: tuple[str, ...] = COMMAND_MODULES.get(args.command, ())
    if getattr(args, "mlflow_experiment", None):
        modules += ("gtaseg.tracking.mlflow_tracker",)
    import_without_gc(*modules)
    try:
        args.func(args)
    except GtasegError as exc:  # anything else is a bug: its traceback stays
        print(f"gtaseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


def run() -> None:
    """The entry point: `main` under gtaseg.startup.run_entry."""
    run_entry(main)


if __name__ == "__main__":
    run()
