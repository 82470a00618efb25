"""``surgery sensitivity CKPT``: cut each coupled group alone at several ratios (recovered without
retraining), measure mAP on a validation subset, write a CSV (resumable) and a plot."""

from __future__ import annotations

from pathlib import Path

import typer

from .console import console
from .display import working
from .outputs import overwrite_allowed

LABEL_FREE_MIN_SCORE = 0.25  # the dense model's detections kept as the reference (Ultralytics' default conf)
DATA_HELP = "synthetic | coco:ROOT | voc:ROOT | yolo:DATA_YAML | a dataset folder | a COCO .json (default: the checkpoint's recipe)."


def sensitivity(
    ckpt: Path = typer.Argument(..., help="A dense (or pruned) surgery checkpoint."),
    data: str | None = typer.Option(None, "--data", help=DATA_HELP),
    ratios: str = typer.Option("0.25,0.5,0.75", "--ratios", help="Fractions of each group's channels cut, comma-separated."),
    val_images: int = typer.Option(50, "--val-images", min=1, help="Validation images each cut is scored on."),
    recover: int = typer.Option(2, "--recover", min=0, help="Calibration batches (8 images) for the recovery after each "
                                "cut (0: score the raw cut)."),
    group: list[str] = typer.Option(None, "--group", help="Only this group (root layer name; repeatable)."),
    method: str = typer.Option(None, "--method", help="Ranking criterion (default: the checkpoint's recipe, else l1)."),
    macs_size: int = typer.Option(None, help="Input size for the MACs count (default: recipe bench.input_size)."),
    csv: Path = typer.Option(Path("sensitivity.csv"), "--csv", help="The table (rows already in it are kept: resume; --overwrite "
                           "measures them again)."),
    plot: Path | None = typer.Option(None, "--plot", help="Write the sensitivity plot (PNG) here."),
    label_free: bool = typer.Option(False, "--label-free", help="Score each cut by its mAP against the checkpoint's own "
                                    f"detections (score >= {LABEL_FREE_MIN_SCORE}) on the same images: no annotation read."),
) -> None:
    """Sensitivity of each coupled group to cutting (Distiller's analysis), for --allocation sensitivity."""
    from torch.utils.data import Subset

    from surgery.data import dataset_for
    from surgery.errors import RecipeError
    from surgery.measure.evaluate import evaluate, reference_ground_truth
    from surgery.pruning.calibrate import calibration_data
    from surgery.pruning.recover import RECOVER_BATCH_SIZE
    from surgery.pruning.sensitivity import analyse, plot_table, run_key
    from surgery.storage.checkpoint import load_checkpoint
    from surgery.storage.trust import sha256_file
    from surgery.workflows import recipe_for_checkpoint

    try:
        fractions = [float(x) for x in ratios.split(",") if x.strip()]
    except ValueError:
        raise RecipeError(f"--ratios {ratios!r}: expected fractions like 0.25,0.5,0.75") from None
    model, ck = load_checkpoint(ckpt)
    rec = recipe_for_checkpoint(ck, None, {"data.source": data, "prune.method": method})
    if rec.prune.method == "magnitude":
        rec.prune.method = "l1"
    with working("preparing data"):
        val = dataset_for(rec.data, "val", train=False)
        subset = Subset(val, list(range(min(val_images, len(val)))))
        calib = list(calibration_data(rec.data, batches=recover, batch_size=RECOVER_BATCH_SIZE, model=model)) if recover else None
    size = macs_size or rec.bench.input_size
    key = run_key(sha256_file(ckpt), {"data": vars(rec.data), "val_images": len(subset), "recover": recover,
                                      "method": rec.prune.method, "skip": rec.prune.skip, "macs_size": size,
                                      "round_to": rec.prune.round_to, "min_channels": rec.prune.min_channels,
                                      **({"label_free": LABEL_FREE_MIN_SCORE} if label_free else {})})
    reference = None
    if label_free:
        with working("the dense model's detections (the label-free reference)"):
            reference = reference_ground_truth(model, subset, min_score=LABEL_FREE_MIN_SCORE)

    def score(m):  # noqa: ANN001, ANN202
        r = evaluate(m, subset, batch_size=8, ground_truth=reference).metrics
        return {"mAP": float(r["mAP"]), "mAP50": float(r["mAP50"])}

    def on_row(row, i, total) -> None:  # noqa: ANN001
        baseline = f"dense, recovered on {recover} batches with nothing cut (the baseline)" if recover else "dense"
        what = baseline if row.group == "dense" else f"{row.group} cut {row.ratio:g} ({row.kept}/{row.channels} kept)"
        console.print(f"[{i}/{total}] {what}: MACs {row.macs_ratio:.1%}, mAP {row.map:.3f} (mAP50 {row.map50:.3f}), "
                      f"{row.seconds:.1f}s", soft_wrap=True, highlight=False, markup=False)

    rows, resumed = analyse(model, csv_path=csv, key=key, calib_data=calib, recover_batches=recover,
                            ratios=fractions, cfg=rec.prune, macs_input_size=size, groups=group or None, score=score,
                            on_row=on_row, restart=overwrite_allowed())
    if resumed:
        console.print(f"resumed: {resumed} rows were already in {csv}", highlight=False)
    console.print(f"sensitivity table written to {csv} ({len(rows)} rows)", soft_wrap=True, highlight=False)
    if plot is not None:
        console.print(f"plot written to {plot_table(rows, plot)}", soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    app.command("sensitivity")(sensitivity)
