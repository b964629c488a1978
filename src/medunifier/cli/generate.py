"""`medunifier generate`: prior training, text-to-image, editing, reconstruction and the image-to-image tasks of a
trained run."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from medunifier.cli.common import (
    DeviceOption,
    GuidanceOption,
    I2IRunOption,
    ModelOption,
    PriorRunOption,
    PriorStepsOption,
    console,
    fail,
    fail_on,
)

__all__ = ["generate_app"]

generate_app = typer.Typer(help="Generate images from text, reconstruct and edit images with a trained run.",
                           no_args_is_help=True)


def _synthesizer(ckpt: Path, device: str | None):
    from medunifier.generate.sampling import Synthesizer

    with fail_on(FileNotFoundError, ValueError):
        return Synthesizer.from_run(ckpt, device=device)


@generate_app.command("train-prior")
def generate_train_prior(
    ckpt: Path = typer.Option(..., help="a run folder (its model/ is frozen; the prior goes to <ckpt>/prior)"),
    data: Path = typer.Option(..., help="a manifest.jsonl (train split: training; val split: validation loss)"),
    max_steps: int | None = typer.Option(None, help="stop this invocation after this many steps (the schedule "
                                         "spans prior.max_steps; continue with --resume)"),
    resume: bool = typer.Option(False, help="continue from the last prior checkpoint"),
    minutes: float | None = typer.Option(None, help="stop (with a checkpoint) after this many minutes"),
    device: DeviceOption = None,
    overrides: list[str] | None = typer.Argument(None, help="prior settings such as width=128 steps=8 kind=masked "
                                                 "max_steps=3000 (also prior.width=128)"),
) -> None:
    """Train the text-conditioned top and bottom code priors of a run (frozen model; resumable)."""
    from medunifier.config import ConfigError
    from medunifier.generate.train_prior import train_prior
    from medunifier.train.data import DataError

    with fail_on(ConfigError, DataError, FileNotFoundError, ValueError):
        result = train_prior(ckpt, data, overrides=overrides or [], max_steps=max_steps, resume=resume,
                             time_limit_s=None if minutes is None else minutes * 60, device=device,
                             log=console.print)
    console.print(f"prior step {result.step}/{result.total_steps} ({result.samples_per_s:.0f} samples/s) in "
                  f"{result.prior_dir}" + (" (stopped early: continue with --resume)" if result.interrupted else ""))


@generate_app.command("refine-decoder")
def generate_refine_decoder(
    ckpt: Path = typer.Option(..., help="a run folder or model folder: its decoder is refitted in place, nothing "
                              "else changes"),
    data: Path = typer.Option(..., help="a manifest.jsonl (train split: training; val split: PSNR before/after)"),
    steps: int = typer.Option(600, help="optimiser steps"),
    batch_size: int = typer.Option(64, help="images per step"),
    lr: float = typer.Option(1e-3, help="peak learning rate (warm-up, then cosine)"),
    seed: int = typer.Option(0, help="seeds the batch order"),
    device: DeviceOption = None,
) -> None:
    """Refit the generator's decoder on the frozen model's codes (sharper reconstructions and samples; the codes,
    the priors and every understanding output stay as they are). Run it before or after train-prior."""
    from medunifier.generate.refine_decoder import DecoderRefineSettings, refine_decoder
    from medunifier.train.data import DataError

    with fail_on(DataError, FileNotFoundError, ValueError):
        settings = DecoderRefineSettings(steps=steps, batch_size=batch_size, lr=lr, seed=seed)
        result = refine_decoder(ckpt, data, settings, device=device, log=console.print)
    if result.interrupted:
        raise typer.Exit(1)


@generate_app.command("image")
def generate_image(
    text: str = typer.Argument(..., help="the report to draw, e.g. 'Moderate right pleural effusion.'"),
    ckpt: PriorRunOption = ...,
    n: int = typer.Option(8, help="number of images"),
    guidance: GuidanceOption = None,
    steps: PriorStepsOption = None,
    seed: int = typer.Option(0, help="the same seed gives the same images"),
    temperature: float = typer.Option(1.0, help="sampling temperature (0: greedy)"),
    out: Path = typer.Option(Path("generated"), help="output folder"),
    dicom: bool = typer.Option(False, "--dicom", help="also write DICOM Secondary Capture files marked synthetic"),
    device: DeviceOption = None,
) -> None:
    """Text-to-image: sample n images for a report and write them as PNG (and DICOM with --dicom)."""
    from medunifier.data.images import save_png

    if n < 1 or not text.strip():
        fail("need a non-empty text and --n >= 1")
    synth = _synthesizer(ckpt, device)
    images = synth.generate(text, n=n, guidance=guidance, steps=steps, seed=seed, temperature=temperature)
    out.mkdir(parents=True, exist_ok=True)
    study_uid = series_uid = None
    for i, image in enumerate(images):
        save_png(image, out / f"sample_{i:03d}.png")
        if dicom:
            from pydicom.uid import generate_uid

            from medunifier.generate.dicom import write_secondary_capture

            study_uid, series_uid = study_uid or generate_uid(), series_uid or generate_uid()
            write_secondary_capture(image, out / f"sample_{i:03d}.dcm", prompt=text, seed=seed, study_uid=study_uid,
                                    series_uid=series_uid, instance_number=i + 1)
    (out / "prompt.json").write_text(json.dumps({"text": text, "n": n, "seed": seed, "guidance": synth.default_guidance
                                                 if guidance is None else guidance, "steps": steps or
                                                 synth.default_steps, "temperature": temperature, "synthetic": True}))
    console.print(f"wrote {n} synthetic images to {out}" + (" (PNG + DICOM)" if dicom else ""))


@generate_app.command("edit")
def generate_edit(
    image: Path = typer.Argument(..., help="the source image (PNG/JPEG/DICOM)"),
    text: str = typer.Argument(..., help="the report the edited image should match"),
    ckpt: PriorRunOption = ...,
    strength: float = typer.Option(0.5, help="share (0..1) of the codes re-sampled inside the edit region"),
    mask: Path | None = typer.Option(None, help="PNG whose non-zero pixels are the edit region (default: all)"),
    source_text: str | None = typer.Option(None, help="the source image's own report (grounds its encoding)"),
    guidance: GuidanceOption = None,
    steps: PriorStepsOption = None,
    seed: int = typer.Option(0, help="the same seed gives the same edit"),
    out: Path = typer.Option(Path("edited.png"), help="output PNG; the difference map goes to <out>_diff.png"),
    device: DeviceOption = None,
) -> None:
    """Counterfactual edit: encode, re-mask a share of the codes (inside --mask), re-sample under TEXT."""
    from medunifier.data.images import ImageLoadError, save_png

    if not 0.0 <= strength <= 1.0:
        fail(f"--strength must be in [0, 1], got {strength}")
    synth = _synthesizer(ckpt, device)
    with fail_on(ImageLoadError, FileNotFoundError):
        edited, diff = synth.edit_image(image, text, strength=strength, mask=mask, seed=seed, guidance=guidance,
                                        steps=steps, source_text=source_text)
    save_png(edited, out)
    diff_path = out.with_name(f"{out.stem}_diff.png")
    save_png(diff, diff_path)
    console.print(f"wrote {out} (synthetic edit) and the difference map {diff_path} "
                  f"(mean |difference| {diff.mean() / 255:.4f})")


@generate_app.command("reconstruct")
def generate_reconstruct(
    image: Path = typer.Argument(..., help="the image (PNG/JPEG/DICOM)"),
    ckpt: ModelOption = ...,
    text: str | None = typer.Option(None, help="its report (grounds the bottom codes; default: empty)"),
    out: Path = typer.Option(Path("reconstruction.png"), help="output PNG"),
    device: DeviceOption = None,
) -> None:
    """Image -> VQ codes -> image (no prior needed); prints the PSNR to the input."""

    from medunifier.data.images import ImageLoadError, as_array, resize_array, save_png, to_tensor
    from medunifier.generate.sampling import grey_uint8
    from medunifier.generate.train_prior import model_dir_of
    from medunifier.model import load_model
    from medunifier.utils import psnr_db

    with fail_on(FileNotFoundError, ValueError, ImageLoadError):
        model = load_model(model_dir_of(ckpt), device)
        arr = as_array(image)
    c = model.config.image
    pixels = to_tensor(arr, c.size, c.channels, c.mean, c.std)[None].to(next(model.parameters()).device)
    tokens = model.tokenize([text]) if text else {"input_ids": None, "attention_mask": None}
    recon = grey_uint8(model.reconstruct(pixels, tokens["input_ids"], tokens["attention_mask"])[0], c.mean, c.std)
    save_png(recon, out)
    grey = arr if arr.ndim == 2 else arr.mean(-1)
    mse = float(((recon / 255.0 - resize_array(grey, c.size)) ** 2).mean())
    console.print(f"wrote {out}: PSNR {psnr_db(mse):.2f} dB to the input at {c.size}x{c.size}")


def _image_to_image(ckpt: Path, device: str | None):
    from medunifier.generate.i2i import ImageToImage

    with fail_on(FileNotFoundError, ValueError):
        return ImageToImage.from_run(ckpt, device=device)


def _i2i_input(image: Path):
    from medunifier.data.images import ImageLoadError, load_image

    with fail_on(ImageLoadError, FileNotFoundError):
        return load_image(image)


@generate_app.command("translate")
def generate_translate(
    image: Path = typer.Argument(..., help="the source image (PNG/JPEG/DICOM)"),
    to: str = typer.Option(..., "--to", help="target kind: soft_tissue (bone-suppressed), bone (dual-energy bone "
                           "image), or an MRI contrast t1, t2, pd"),
    ckpt: I2IRunOption = ...,
    out: Path = typer.Option(Path("translated.png"), help="output PNG"),
    device: DeviceOption = None,
) -> None:
    """Modality translation: the source image as another image type of the same patient."""
    from medunifier.data.images import save_png
    from medunifier.generate.i2i import instruction_for

    with fail_on(ValueError):
        instruction_for("translate", to=to)
    runner = _image_to_image(ckpt, device)
    result = runner.translate(_i2i_input(image), to)
    save_png(result, out)
    console.print(f"wrote {out} ({runner.size}x{runner.size}, synthetic: translated to {to})")


@generate_app.command("upscale")
def generate_upscale(
    image: Path = typer.Argument(..., help="the low-resolution image (S/scale pixels for a model of S pixels)"),
    scale: int = typer.Option(4, help="upscaling factor: 2 or 4"),
    ckpt: I2IRunOption = ...,
    out: Path = typer.Option(Path("upscaled.png"), help="output PNG"),
    device: DeviceOption = None,
) -> None:
    """Super-resolution: an (S/scale)-pixel image to S x S."""
    from medunifier.data.images import save_png
    from medunifier.generate.i2i import instruction_for

    with fail_on(ValueError):
        instruction_for("upscale", scale=scale)
    runner = _image_to_image(ckpt, device)
    with fail_on(ValueError):
        result = runner.upscale(_i2i_input(image), scale)
    save_png(result, out)
    console.print(f"wrote {out} ({runner.size}x{runner.size}, synthetic: upscaled x{scale})")


@generate_app.command("segment")
def generate_segment(
    image: Path = typer.Argument(..., help="the image (PNG/JPEG/DICOM)"),
    finding: str = typer.Option(..., help="heart (or cardiomegaly), pleural_effusion, pneumothorax, consolidation, "
                                "nodule"),
    ckpt: I2IRunOption = ...,
    out: Path = typer.Option(Path("mask.png"), help="output PNG (255 inside the mask)"),
    device: DeviceOption = None,
) -> None:
    """Finding mask: the region of FINDING in the image (probability >= 0.5)."""
    import numpy as np

    from medunifier.data.images import save_png
    from medunifier.generate.i2i import instruction_for

    with fail_on(ValueError):
        instruction_for("segment", finding=finding)
    runner = _image_to_image(ckpt, device)
    mask, _ = runner.segment(_i2i_input(image), finding)
    save_png(mask.astype(np.uint8) * 255, out)
    console.print(f"wrote {out}: {finding} mask covering {mask.mean():.1%} of the image")

