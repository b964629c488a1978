"""Text-to-image generation, counterfactual editing and reconstruction with a trained run.

    synth = Synthesizer.from_run("runs/demo/run")
    images = synth.generate("Moderate right pleural effusion. Enlarged heart.", n=8, seed=0)  # uint8 (S, S)
    edited, diff = synth.edit_image("a.png", "Large left pleural effusion.", strength=0.6, mask="lower.png")
    recon = synth.reconstruct("a.png", text="FINDINGS: ...")

Generation: the report text goes through the frozen image-text encoder (text-only pass), the priors sample
(top, bottom) codes with classifier-free guidance, the frozen VQ decoder turns them into an image.
Editing: the image is encoded to its codes (grounded on its own report when known, else on an empty one);
inside the edit region (the whole image, or the cells of each code map that a `mask` touches) a
`strength` fraction of the codes is drawn at random, masked and re-sampled under the new text; every other
code is kept, so the decoded image changes only where (and as much as) asked. Everything random draws
from one `torch.Generator` seeded by `seed`: the same arguments give the same images.

`synthesize` / `edit` are the tensor API used by the REST service (`medunifier.serve.api.ImageGenerator`):
they return images in the model's normalised input space [B, C, S, S].
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from medunifier.data.images import as_array, to_tensor, to_uint8
from medunifier.generate.prior_base import SampleOptions
from medunifier.generate.prior_common import resize_mask
from medunifier.generate.priors import HierarchicalPrior
from medunifier.generate.train_prior import codes_checksum, load_prior, model_dir_of, weights_file_checksum

if TYPE_CHECKING:
    from medunifier.model.medunifier import MedUnifier

ImageLike = Any  # a path, bytes, PIL image, numpy array or pydicom dataset (see data.images.as_array)


def grey_uint8(pixels: Tensor, mean: float, std: float) -> np.ndarray:
    """One normalised image [C, S, S] -> uint8 (S, S) (colour channels averaged)."""
    arr = to_uint8(pixels, mean, std)
    return arr if arr.ndim == 2 else arr.astype(np.float32).mean(-1).round().astype(np.uint8)


def load_mask(mask: ImageLike | np.ndarray | Tensor, size: int) -> Tensor:
    """An edit region: any image (non-zero = edit) or a bool array -> bool [size, size] (nearest resize)."""
    if isinstance(mask, Tensor):
        arr = mask.detach().float().cpu().numpy()
    elif isinstance(mask, np.ndarray) and mask.dtype == bool:
        arr = mask.astype(np.float32)
    else:
        arr = as_array(mask)
    if arr.ndim == 3:
        arr = arr.max(-1)
    m = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))[None, None]
    m = torch.nn.functional.interpolate(m, size=(size, size), mode="nearest")[0, 0]
    return m > 0.5


class Synthesizer:
    """A frozen MedUnifier and its trained code priors."""

    def __init__(self, model: MedUnifier, prior: HierarchicalPrior, meta: dict[str, Any] | None = None):
        g = model.config.generator
        c = prior.config
        sizes = (g.level_codebook("top")[0], g.level_codebook("bottom")[0])
        if (c.codebook_size, c.codebook_size, c.top_size, c.bottom_size) != (*sizes, g.top_size, g.bottom_size):
            raise ValueError(
                f"the prior (codebook {c.codebook_size}, maps {c.top_size}/{c.bottom_size}) does not match the "
                f"model's generator (codebooks {sizes[0]}/{sizes[1]}, maps {g.top_size}/{g.bottom_size})"
            )
        if c.text_width != model.config.encoder.hidden_size:
            raise ValueError(f"the prior reads text features of width {c.text_width}, the model gives "
                             f"{model.config.encoder.hidden_size}")
        self.model = model.eval()
        self.prior = prior.to(self.device).eval()
        self.meta = meta or {}
        settings = self.meta.get("settings") or model.config.prior.model_dump()
        self.default_guidance = float(settings.get("guidance", 3.0))
        self.default_steps = int(settings.get("steps", c.steps))

    @classmethod
    def from_run(cls, ckpt: str | Path, device: str | None = None, model: MedUnifier | None = None) -> Synthesizer:
        """Load the model of a run (or model folder) and the prior trained for it."""
        from medunifier.model import load_model

        model_dir = model_dir_of(ckpt)
        if model is None:
            model = load_model(model_dir, device)
        dev = next(model.parameters()).device
        prior, meta = load_prior(ckpt, dev)
        if "codes_checksum" in meta:  # the decoder may have been refitted since: only the codes must match
            other = meta["codes_checksum"] != codes_checksum(model)
        else:
            checksum = meta.get("model_checksum")
            other = bool(checksum and (model_dir / "model.safetensors").exists()
                         and checksum != weights_file_checksum(model_dir))
        if other:
            warnings.warn(f"the prior in {ckpt} was trained on the codes of other model weights than {model_dir}",
                          stacklevel=2)
        return cls(model, prior, meta)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, model: MedUnifier | None = None, device: str | None = None) -> Synthesizer:
        """The REST service's entry point (`medunifier.serve.api.load_generator`)."""
        return cls.from_run(model_dir, device=device, model=model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def options(self, guidance: float | None, steps: int | None, temperature: float = 1.0) -> SampleOptions:
        """The priors' sampling options, the trained prior's guidance and steps where None (or steps 0).

        Args:
            guidance: classifier-free guidance scale, or None for the prior's default.
            steps: masked prior's decoding steps per level, or None for the prior's default.
            temperature: softmax temperature (0 = greedy).
        """
        return SampleOptions(
            guidance=self.default_guidance if guidance is None else float(guidance),
            steps=steps or self.default_steps,
            temperature=temperature,
        )

    def _generator(self, seed: int | None) -> torch.Generator:
        g = torch.Generator(device=self.device)
        if seed is None:
            g.seed()
        else:
            g.manual_seed(int(seed))
        return g

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Text-only encoder features of the reports: (states [B, T, H], mask bool [B, T])."""
        tok = self.model.tokenize(list(texts))
        states = self.model.text_states(tok["input_ids"], tok["attention_mask"], role="generate")
        return states.float(), tok["attention_mask"].bool()

    # ------------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def sample_codes(
        self,
        texts: Sequence[str] | None,
        n: int = 1,
        *,
        guidance: float | None = None,
        steps: int | None = None,
        seed: int | None = 0,
        temperature: float = 1.0,
        batch_size: int = 16,
    ) -> tuple[Tensor, Tensor]:
        """n code maps per text (text-major), or n unconditional ones when texts is None: (top, bottom)."""
        if n < 1:
            raise ValueError(f"n must be at least 1, got {n}")
        options = self.options(guidance, steps, temperature)
        generator = self._generator(seed)
        if texts is None:
            rows_states, rows_mask, total = None, None, n
        else:
            if isinstance(texts, str):
                texts = [texts]
            states, mask = self.text_features(texts)
            rows_states = states.repeat_interleave(n, dim=0)  # [P*n, T, H]
            rows_mask = mask.repeat_interleave(n, dim=0)
            total = rows_states.shape[0]
        tops, bottoms = [], []
        for start in range(0, total, batch_size):
            end = min(total, start + batch_size)
            s = None if rows_states is None else rows_states[start:end]
            m = None if rows_mask is None else rows_mask[start:end]
            top, bottom = self.prior.sample_codes(
                s, m, options=options, num_samples=end - start, generator=generator
            )
            tops.append(top)
            bottoms.append(bottom)
        return torch.cat(tops), torch.cat(bottoms)

    @torch.no_grad()
    def decode(self, top: Tensor, bottom: Tensor, batch_size: int = 64) -> Tensor:
        """Codes -> images in the model's normalised space [B, C, S, S]."""
        out = [self.model.decode_codes(top[i : i + batch_size].to(self.device), bottom[i : i + batch_size].to(self.device))
               for i in range(0, top.shape[0], batch_size)]
        return torch.cat(out)

    def to_uint8(self, pixels: Tensor) -> list[np.ndarray]:
        c = self.model.config.image
        return [grey_uint8(p, c.mean, c.std) for p in pixels]

    @torch.no_grad()
    def synthesize(self, texts: list[str], n: int, *, guidance: float | None = None, steps: int | None = None,
                   seed: int | None = 0) -> Tensor:
        """n images per text (text-major), normalised [len(texts) * n, C, S, S]."""
        top, bottom = self.sample_codes(texts, n, guidance=guidance, steps=steps, seed=seed)
        return self.decode(top, bottom)

    def generate(self, texts: str | Sequence[str], n: int = 1, guidance: float | None = None, steps: int | None = None,
                 seed: int | None = 0, temperature: float = 1.0) -> list[np.ndarray]:
        """n uint8 (S, S) images per text, text-major."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        top, bottom = self.sample_codes(texts, n, guidance=guidance, steps=steps, seed=seed, temperature=temperature)
        return self.to_uint8(self.decode(top, bottom))

    def random_codes(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """Uniformly random code maps (the 'no prior at all' reference of the synthesis metrics)."""
        g = torch.Generator().manual_seed(seed)
        c = self.prior.config
        top = torch.randint(0, c.codebook_size, (n, c.top_size, c.top_size), generator=g)
        bottom = torch.randint(0, c.codebook_size, (n, c.bottom_size, c.bottom_size), generator=g)
        return top.to(self.device), bottom.to(self.device)

    # ----------------------------------------------------------------------- encode, edit, reconstruct

    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> Tensor:
        """Images (paths, arrays, PIL, DICOM) -> normalised pixels [B, C, S, S] on the model's device."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        c = self.model.config.image
        return torch.stack([to_tensor(as_array(im), c.size, c.channels, c.mean, c.std) for im in images]).to(self.device)

    def _tokens(self, texts: Sequence[str] | None, batch: int) -> tuple[Tensor | None, Tensor | None]:
        if texts is None:
            return None, None
        if len(texts) != batch:
            raise ValueError(f"{len(texts)} texts for {batch} images")
        tok = self.model.tokenize(list(texts))
        return tok["input_ids"], tok["attention_mask"]

    @torch.no_grad()
    def encode(self, pixels: Tensor, texts: Sequence[str] | None = None) -> tuple[Tensor, Tensor]:
        """Codes (top, bottom) of normalised images, grounded on their reports (an empty one when None)."""
        ids, mask = self._tokens(texts, pixels.shape[0])
        return self.model.encode_codes(pixels.to(self.device), ids, mask)

    def edit_masks(
        self, batch: int, strength: float, region: Tensor | None, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """Which codes to re-sample: (top [B, t, t], bottom [B, b, b]) bool.

        region: bool [B or 1, H, W] at any resolution (a code is in the region if any cell it covers is),
        None = everywhere. Inside the region, round(strength * count) codes (at least one when strength > 0)
        are drawn uniformly at random at each level.
        """
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        c = self.prior.config
        masks = []
        for side in (c.top_size, c.bottom_size):
            if region is None:
                inside = torch.ones(batch, side, side, dtype=torch.bool, device=self.device)
            else:
                r = region.to(self.device).bool()
                r = r[None] if r.dim() == 2 else r
                inside = resize_mask(r, side).expand(batch, side, side)
            flat = inside.flatten(1)  # [B, L]
            noise = torch.rand(flat.shape, generator=generator, device=self.device)
            noise = noise.masked_fill(~flat, 2.0)  # outside the region: never chosen
            rank = noise.argsort(1).argsort(1)
            count = torch.round(flat.sum(1).float() * strength).long()
            if strength > 0:
                count = torch.maximum(count, flat.any(1).long())
            masks.append((rank < count[:, None]).view(batch, side, side))
        return masks[0], masks[1]

    @torch.no_grad()
    def edit_codes(
        self,
        top: Tensor,
        bottom: Tensor,
        texts: Sequence[str],
        *,
        strength: float,
        region: Tensor | None = None,
        guidance: float | None = None,
        steps: int | None = None,
        seed: int | None = 0,
        temperature: float = 1.0,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Re-sample a strength fraction of the codes in the region under the texts.

        Returns (top, bottom, resampled_top, resampled_bottom); codes outside the re-sampled masks are kept
        exactly. The bottom level is re-sampled conditioned on the edited top.
        """
        options = self.options(guidance, steps, temperature)
        generator = self._generator(seed)
        mask_top, mask_bottom = self.edit_masks(top.shape[0], strength, region, generator)
        states, mask = self.text_features(texts)
        new_top = self.prior.top.sample(
            states, mask, options=options, generator=generator, init_codes=top, edit_mask=mask_top
        )
        new_bottom = self.prior.bottom.sample(
            states, mask, options=options, generator=generator, context_codes=new_top, init_codes=bottom,
            edit_mask=mask_bottom,
        )  # fmt: skip
        return new_top, new_bottom, mask_top, mask_bottom

    @torch.no_grad()
    def edit(self, pixel_values: Tensor, texts: list[str], *, strength: float, guidance: float | None = None,
             steps: int | None = None, seed: int | None = 0, mask: Tensor | None = None,
             source_texts: Sequence[str] | None = None) -> Tensor:
        """Edited images, normalised [B, C, S, S] (mask: bool [B or 1, H, W] edit region, None = everywhere)."""
        top, bottom = self.encode(pixel_values, source_texts)
        new_top, new_bottom, _, _ = self.edit_codes(top, bottom, texts, strength=strength, region=mask,
                                                    guidance=guidance, steps=steps, seed=seed)
        return self.decode(new_top, new_bottom)

    def edit_image(
        self,
        image: ImageLike,
        text: str,
        strength: float = 0.5,
        mask: ImageLike | np.ndarray | Tensor | None = None,
        seed: int | None = 0,
        guidance: float | None = None,
        steps: int | None = None,
        source_text: str | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(edited uint8 (S, S), |edited - reconstruction| uint8 (S, S)) for one image.

        The difference is taken against the source's own reconstruction (same codes, nothing re-sampled), so
        it shows the edit alone, not the VQ reconstruction error.
        """
        pixels = self.preprocess(image)
        region = None if mask is None else load_mask(mask, self.model.config.image.size)
        top, bottom = self.encode(pixels, None if source_text is None else [source_text])
        new_top, new_bottom, _, _ = self.edit_codes(top, bottom, [text], strength=strength, region=region,
                                                    guidance=guidance, steps=steps, seed=seed)
        edited, recon = self.to_uint8(self.decode(torch.cat([new_top, top]), torch.cat([new_bottom, bottom])))
        diff = np.abs(edited.astype(np.int16) - recon.astype(np.int16)).astype(np.uint8)
        return edited, diff

    @torch.no_grad()
    def reconstruct(self, image: ImageLike, text: str | None = None) -> np.ndarray:
        """Image -> codes (grounded on `text`, or an empty report) -> image, uint8 (S, S)."""
        pixels = self.preprocess(image)
        top, bottom = self.encode(pixels, None if text is None else [text])
        return self.to_uint8(self.decode(top, bottom))[0]
