"""`avi sample` (images from the prior) and `avi reconstruct` (test images through the
posterior), both written as image grids (PNG, or the format of --out's extension)."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from .common import SetOption, UserError, err, print_path
from .eval import (DeviceOption, NoEmaOption, RunArgument, SeedOption, Device, Split,
                   default_output, images, load_model)


class Mode(str, Enum):
    mean = "mean"
    sample = "sample"


OutOption = Annotated[Optional[Path], typer.Option("--out", "-o", metavar="FILE.png",
                                                   help="Where to write the PNG grid.")]
ScaleOption = Annotated[int, typer.Option(
    "--scale", min=1, max=32, metavar="S",
    help="Draw every pixel as an S x S block (64 MNIST digits: 242 px wide at 1, 968 px at 4).")]
ModeOption = Annotated[Mode, typer.Option(
    "--mode", help="Binary data: mean shows pixel probabilities, sample draws Bernoulli pixels "
                   "(8-bit data is always sampled).")]


def _seed(seed: int, device) -> None:
    import torch
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(seed)


def sample_command(
    run: RunArgument,
    n: Annotated[int, typer.Option("--n", "-n", min=1, max=4096, help="Number of images.")] = 64,
    temperature: Annotated[float, typer.Option(
        "--temperature", "-t", min=0.0, help="Scale of every latent's noise (1: the prior itself).")] = 1.0,
    output: OutOption = None,
    scale: ScaleOption = 1,
    mode: ModeOption = Mode.mean,
    device: DeviceOption = Device.auto,
    seed: SeedOption = 0,
    no_ema: NoEmaOption = False,
    readjust_bn: Annotated[bool, typer.Option(
        "--readjust-bn", help="Before sampling, re-estimate the batch-norm statistics on prior samples "
                              "at --temperature (NVAE's readjust_bn: sharper low-temperature samples). "
                              "The checkpoint is not changed.")] = False,
    readjust_passes: Annotated[int, typer.Option(
        "--readjust-passes", min=1, max=100000, metavar="P",
        help="--readjust-bn: batches of --n prior samples the statistics are averaged over.")] = 100,
    overrides: SetOption = None,
) -> None:
    """Draw images from the prior of a trained model and write them as one PNG grid.

    RUN is a run directory, a .pt checkpoint or a .safetensors file of `avi export`. Prints
    the path of the PNG (default RUN/samples/prior_t<temperature>.png, or
    prior_t<temperature>_readjusted.png with --readjust-bn). With --readjust-bn the
    batch-norm statistics are first re-estimated on prior samples at the same temperature;
    the draw of the images themselves is the one --seed gives without it.

    Example:

        avi sample runs/quickstart --n 64 --temperature 0.8 --out samples.png

        avi sample runs/quickstart --n 64 --temperature 0.6 --readjust-bn --out sharp.png

        avi sample quickstart.safetensors --n 16 --scale 4
    """
    import math

    from builders.evaluation.images import save_grid

    if not math.isfinite(temperature):
        raise UserError(f"--temperature must be a finite number, not {temperature}")
    _check_format(output)
    model, _, run_dir = load_model(run, device, not no_ema, overrides)
    dev = next(model.parameters()).device
    if readjust_bn:
        from builders.evaluation.readjust_bn import readjust_batch_norm
        _seed(seed, dev)
        count = readjust_batch_norm(model, temperature, readjust_passes, n)
        err.print(f"re-estimated the statistics of {count} batch norms on {readjust_passes} batches of "
                  f"{n} prior samples at temperature {temperature:g}", markup=False)
    _seed(seed, dev)
    x = model.sample(n, temperature, mode.value)
    name = f"prior_t{temperature:g}{'_readjusted' if readjust_bn else ''}.png"
    path = output or default_output(run_dir, "samples", name)
    print_path(_save(lambda p, im: save_grid(p, im, scale=scale), path, x))


def reconstruct_command(
    run: RunArgument,
    n: Annotated[int, typer.Option("--n", "-n", min=1, max=1024, help="Number of test images.")] = 16,
    output: OutOption = None,
    split: Annotated[Split, typer.Option("--split", help="Which split to take the images from.")] = Split.test,
    scale: ScaleOption = 1,
    mode: ModeOption = Mode.mean,
    device: DeviceOption = Device.auto,
    seed: SeedOption = 0,
    no_ema: NoEmaOption = False,
    overrides: SetOption = None,
) -> None:
    """Pass test images through the posterior and back; write each beside its reconstruction.

    In the PNG every image is followed by its reconstruction (pairs, left to right). Prints
    the path (default RUN/samples/reconstructions.png).

    Example:

        avi reconstruct runs/quickstart --n 16 --out reconstructions.png
    """
    import torch

    from builders.evaluation.images import save_grid

    _check_format(output)
    model, resolved, run_dir = load_model(run, device, not no_ema, overrides)
    dev = next(model.parameters()).device
    x = images(resolved, split.value, n).to(dev)
    _seed(seed, dev)
    recon = model.reconstruct(x, mode.value)
    original = _center_crop((x + 1) / 2, recon.shape[-1])
    pairs = torch.stack([original, recon.to(original.dtype)], 1).flatten(0, 1)   # [2n, C, H, W]
    columns = 2 * max(1, min(8, round(len(x) ** 0.5)))
    path = output or default_output(run_dir, "samples", "reconstructions.png")
    print_path(_save(lambda p, im: save_grid(p, im, columns, scale), path, pairs))


def _center_crop(x, size: int):
    extra = x.shape[-1] - size
    if extra <= 0:
        return x
    a = extra // 2
    return x[..., a:a + size, a:a + size]


def _check_format(output: Optional[Path]) -> None:
    """Refuse an --out that Pillow cannot write before any model is loaded."""
    from builders.evaluation.images import image_format
    if output is not None:
        try:
            image_format(output)
        except ValueError as e:
            raise UserError(str(e)) from None


def _save(save, path: Path, images) -> Path:
    try:
        return save(path, images)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def register(app: typer.Typer) -> None:
    app.command("sample")(sample_command)
    app.command("reconstruct")(reconstruct_command)
    # `avi plot` lives in cli/plot.py; register it here too until cli.main lists it
    # (plot.register skips itself when it is already there).
    from . import plot
    plot.register(app)
