"""`avi encode`: every layer's posterior for the images of a file, written as latents.npz
(the work is in builders.latents and TrainedRun.encode_file)."""
from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import JsonOption, SetOption, UserError, out
from .eval import DeviceOption, Device, NoEmaOption, RunArgument, SeedOption, default_output, load_model


def encode_command(
    run: RunArgument,
    images: Annotated[Path, typer.Option("--images", "-i", metavar="FILE",
                                         help="Images to encode: .npy or .npz ([N, H, W] or [N, H, W, C]; "
                                              "uint8 or floats in [0, 1]) or one .png.")],
    output: Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FILE.npz",
                                                   help="Where to write the latents (default RUN/latents.npz).")] = None,
    temperature: Annotated[float, typer.Option(
        "--temperature", "-t", min=0.0, help="Temperature of the posterior draw written as 'sample'.")] = 1.0,
    device: DeviceOption = Device.auto,
    seed: SeedOption = 0,
    no_ema: NoEmaOption = False,
    overrides: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Encode images into every layer's posterior; write mean, scale and sample to an .npz.

    Each array is [N, L, Z, S, S] (images, layers, latent channels, height, width): mean and
    scale along the path where every z_l is its posterior mean (decode(mean) is the model's
    deterministic reconstruction), sample one posterior draw at --temperature. Binary data is
    binarised once with a fixed seed, as evaluation does. Prints the path of the .npz.

    Example:

        avi encode runs/quickstart --images digits.npy --out latents.npz
    """
    import numpy as np

    from builders.data.datasets import DatasetError
    from builders.files import write_atomically

    if not math.isfinite(temperature):
        raise UserError(f"--temperature must be a finite number, not {temperature}")
    if output is not None and output.suffix.lower() != ".npz":
        raise UserError(f"--out must name an .npz file, not {output}")
    model, resolved, run_dir = load_model(run, device, not no_ema, overrides)
    from builders.api import TrainedRun
    trained = TrainedRun(model, resolved, run_dir)
    try:
        latents = trained.encode_file(images, temperature, seed)
    except DatasetError as e:
        raise UserError(str(e)) from None
    buffer = io.BytesIO()
    np.savez(buffer, **latents.arrays())
    path = output or default_output(run_dir, "latents.npz")
    try:
        write_atomically(path, buffer.getvalue())
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    if as_json:
        out.print(json.dumps({"out": str(path), "shape": list(latents.mean.shape),
                              "arrays": ["mean", "scale", "sample"]}), markup=False)
    else:
        out.print(str(path), markup=False)


def register(app: typer.Typer) -> None:
    app.command("encode")(encode_command)
