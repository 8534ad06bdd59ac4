"""FLUX.1's image-conditioned modes as small functions over pixels and packed latents.

The transformer's kind says what it takes: "text" (schnell, dev: 64 input channels), "kontext" (64, plus
reference tokens), "fill" (384) or "control" (Canny, Depth: 128). One call's mode follows from the kind
and the images given:
- img2img (a "text" model, image=): diffusers' FluxImg2ImgPipeline. The full shifted schedule of
  num_steps, cut at t_start = int(max(n - min(n * strength, n), 0)); the loop starts from
  sigma * noise + (1 - sigma) * image latents at the first remaining sigma.
- inpaint (image= and mask_image=): img2img, and after step i the kept region (mask 0) is reset to the
  image latents noised to sigma[i + 1] with the same noise, the clean latents after the last step
  (diffusers' FluxInpaintPipeline). The transformer sees the 64 channels of the state only.
- kontext: the reference image's latent tokens are appended after the output tokens, with ids
  (1, row, col) on the reference's own grid; their output is discarded (parallel.ImageCond) and the
  schedule's shift counts the output tokens only (BFL's prepare_kontext, diffusers' FluxKontextPipeline).
- fill: channels [noise 64 | masked-image latents 64 | mask 256] (BFL's prepare_fill): the masked image is
  image * (1 - mask) in the VAE's [-1, 1] (repainted pixels mid-gray), the mask 8x8-packed then 2x2.
- control: channels [noise 64 | control-image latents 64] (BFL's prepare_control, FluxControlPipeline).

Every image is VAE-encoded at the posterior mean, so a call is deterministic given its noise. BFL samples
the posterior, and so do diffusers' img2img, inpaint, Fill and Control pipelines (with the generator);
diffusers' Kontext takes the mode (the mean), as here.
"""

import numbers
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from flux_parallel.flux.image_inputs import (
    ImageArgumentError,
    binarised,
    check_token_size,
    image_size,
    kontext_size,
    latent_mask,
    load_images,
    pack_fill_mask,
    resized,
)
from flux_parallel.flux.sampling import check_image_size, make_img_ids, pack
from flux_parallel.parallel import ImageCond

KIND_NAMES = {"text": "FLUX.1 text to image (schnell or dev)", "kontext": "FLUX.1 Kontext", "fill": "FLUX.1 Fill",
              "control": "FLUX.1 Canny or Depth"}
# what each kind needs, and why (the second half of the refusal's sentence)
NEEDED = {
    "kontext": {"image": "FLUX.1 Kontext edits a reference image"},
    "fill": {"image": "FLUX.1 Fill repaints part of an image", "mask_image": "FLUX.1 Fill repaints where it is white"},
    "control": {"control_image": "FLUX.1 Canny or Depth follows a control image (an edge or depth map)"},
}
TAKEN = {"text": ("image", "mask_image"), "kontext": ("image",), "fill": ("image", "mask_image"),
         "control": ("control_image",)}
DEFAULT_STRENGTH = 0.6  # diffusers' img2img and inpaint default


@dataclass(frozen=True)
class ImageRequest:
    """One call's image inputs, checked, in [0, 1] at the sizes the model sees them."""

    mode: str  # "text", "img2img", "inpaint", "kontext", "fill" or "control"
    height: int  # output pixels
    width: int
    pixels: Tensor | None = None  # [b, 3, H, W]: the image, the control image, or Kontext's reference at its own size
    mask: Tensor | None = None  # [b, 1, H, W], 1 = repaint
    strength: float | None = None
    source: str = "image"  # the argument the pixels came from: "image" or "control_image"

    @property
    def reference_tokens(self) -> int:
        """Tokens Kontext's reference adds to the sequence (0 in other modes)."""
        return self.pixels.shape[2] // 16 * (self.pixels.shape[3] // 16) if self.mode == "kontext" else 0

    def for_images(self, prompts: int, per_prompt: int, part: slice) -> "ImageRequest":
        """One image (and mask) per generated image, in prompt order, this data replica's `part` of them:
        the inputs hold one image for all prompts or one per prompt."""
        if self.pixels is None:
            return self
        mask = None if self.mask is None else _per_image(self.mask, "mask_image", prompts, per_prompt, part)
        return replace(self, pixels=_per_image(self.pixels, self.source, prompts, per_prompt, part), mask=mask)


def _per_image(x: Tensor, name: str, prompts: int, per_prompt: int, part: slice) -> Tensor:
    if x.shape[0] not in (1, prompts):
        raise ImageArgumentError(name, f"holds {x.shape[0]} images for {prompts} prompts: give one, or one per prompt")
    # image i goes with prompt i (diffusers tiles a batch of images instead, pairing them with other prompts)
    return (x.expand(prompts, -1, -1, -1) if x.shape[0] == 1 else x).repeat_interleave(per_prompt, dim=0)[part]


def call_mode(kind: str, image, mask_image, control_image, strength) -> str:
    """The mode of a call on a `kind` transformer; one sentence naming the argument if they do not fit."""
    given = {"image": image is not None, "mask_image": mask_image is not None,
             "control_image": control_image is not None}
    for argument, why in NEEDED.get(kind, {}).items():
        if not given[argument]:
            raise ImageArgumentError(argument, f"is needed: {why}")
    for argument, present in given.items():
        if present and argument not in TAKEN[kind]:
            raise ImageArgumentError(argument, f"is not used by {KIND_NAMES[kind]}")
    if given["mask_image"] and not given["image"]:
        raise ImageArgumentError("mask_image", "needs an image too (the image to inpaint)")
    if strength is not None:
        check_strength(kind, strength, given["image"])
    if kind != "text":
        return kind
    return "inpaint" if given["mask_image"] else "img2img" if given["image"] else "text"


def check_strength(kind: str, strength, has_image: bool) -> None:
    if isinstance(strength, bool) or not isinstance(strength, numbers.Real) or not 0 < strength <= 1:
        raise ImageArgumentError("strength", f"must be in (0, 1] (the share of the schedule run), got {strength!r}")
    if kind != "text":
        raise ImageArgumentError("strength", f"is for img2img and inpainting, not {KIND_NAMES[kind]}")
    if not has_image:
        raise ImageArgumentError("strength", "needs an image (img2img): without one the whole schedule runs")


def image_request(kind: str, image, mask_image, control_image, strength: float | None, height: int | None,
                  width: int | None, auto_resize: bool) -> ImageRequest:
    """Check and load a call's images. Output size: height/width when given, else the image's size floored
    to 16 px (Kontext: the reference's, after auto_resize), 1024 without an image."""
    for name, size in (("height", height), ("width", width)):
        if size is not None:
            check_image_size(name, size)
    mode = call_mode(kind, image, mask_image, control_image, strength)
    if mode == "text":
        return ImageRequest(mode, height or 1024, width or 1024)
    name = "control_image" if mode == "control" else "image"
    images = load_images(control_image if mode == "control" else image, name)
    image_h, image_w = image_size(images)
    check_token_size(name, image_h, image_w)
    if mode == "kontext":
        ref_h, ref_w = kontext_size(image_h, image_w, auto_resize)
        return ImageRequest(mode, height or ref_h, width or ref_w, resized(images, ref_h, ref_w))
    height, width = height or image_h // 16 * 16, width or image_w // 16 * 16
    mask = None if mask_image is None else _mask(mask_image, (image_h, image_w), height, width)
    strength = (DEFAULT_STRENGTH if strength is None else float(strength)) if mode in ("img2img", "inpaint") else None
    return ImageRequest(mode, height, width, resized(images, height, width), mask, strength, name)


def _mask(mask_image, image_hw: tuple[int, int], height: int, width: int) -> Tensor:
    masks = load_images(mask_image, "mask_image", channels=1)
    (mask_h, mask_w), (image_h, image_w) = image_size(masks), image_hw
    if (mask_h, mask_w) != image_hw:
        raise ImageArgumentError("mask_image", f"is {mask_w}x{mask_h} px and the image {image_w}x{image_h} px: "
                                               "a mask must have its image's size")
    return binarised(resized(masks, height, width))


def img2img_timesteps(timesteps: list[float], strength: float) -> list[float]:
    """The schedule's tail that img2img runs: from t_start as diffusers' get_timesteps (Python floats)."""
    steps = len(timesteps) - 1
    t_start = int(max(steps - min(steps * strength, steps), 0))
    return timesteps[t_start:]


def noised(clean: Tensor, noise: Tensor, sigma: float) -> Tensor:
    """The flow-matching point at time sigma between clean latents and noise (diffusers' scale_noise)."""
    return sigma * noise + (1.0 - sigma) * clean


@dataclass
class Start:
    """Where one generation's loop starts, from an ImageRequest: packed state, ids, schedule, extras."""

    img: Tensor  # [b, L, 64]: noise, or noised image latents, then Kontext's reference tokens
    img_ids: Tensor  # [b, L, 3]
    timesteps: list[float]
    cond: ImageCond | None = None
    inpaint: tuple[Tensor, Tensor, Tensor] | None = None  # clean latents, noise, mask: [b, L, 64] each


def start(request: ImageRequest, encode: Callable[[Tensor], Tensor], noise: Tensor, timesteps: list[float]) -> Start:
    """noise [b, L, 64] packed; timesteps the full schedule; encode: pixels in [-1, 1] -> latents [b, 16, h, w]."""
    ids = make_img_ids(noise.shape[0], request.height, request.width, noise.device)
    mode, device = request.mode, noise.device
    if mode == "text":
        return Start(noise, ids, timesteps)
    if mode in ("img2img", "inpaint"):
        clean = pack(encode(request.pixels * 2 - 1))
        timesteps = img2img_timesteps(timesteps, request.strength)
        mask = None if request.mask is None else latent_mask(request.mask.to(device))
        return Start(noised(clean, noise, timesteps[0]), ids, timesteps,
                     inpaint=None if mask is None else (clean, noise, mask))
    if mode == "kontext":
        reference = encode(request.pixels * 2 - 1)  # [b, 16, h, w] on the reference's own grid
        ref_ids = make_img_ids(noise.shape[0], 8 * reference.shape[2], 8 * reference.shape[3], device).clone()
        ref_ids[..., 0] = 1  # the reference's positions: the output's grid, at index 1 of the first axis
        return Start(torch.cat((noise, pack(reference)), dim=1), torch.cat((ids, ref_ids), dim=1), timesteps,
                     ImageCond(out_len=noise.shape[1]))
    if mode == "fill":
        mask = request.mask.to(device)
        masked = (request.pixels.to(device) * 2 - 1) * (1 - mask)  # repainted pixels mid-gray (0 in [-1, 1])
        channels = torch.cat((pack(encode(masked)), pack_fill_mask(mask)), dim=-1)  # [b, L, 64 + 256]
    else:
        channels = pack(encode(request.pixels * 2 - 1))  # control: [b, L, 64]
    return Start(noise, ids, timesteps, ImageCond(channels=channels))


def inpaint_blend(clean: Tensor, noise: Tensor, mask: Tensor, timesteps: list[float]):
    """blend(step, img) for sampling.denoise: after step i the kept region (mask 0) holds the image latents
    noised to timesteps[i + 1] (the last is 0: the clean latents). Tensors are the state's rows, [b, L_r, 64]."""

    def blend(step: int, img: Tensor, rows: slice = slice(None)) -> Tensor:  # rows: PipeFusion's patch
        kept = 1 - mask[:, rows]
        return kept * noised(clean[:, rows], noise[:, rows], timesteps[step + 1]) + mask[:, rows] * img

    return blend
