"""Images into the pipeline: load, convert to RGB, resize, binarise masks, pack Fill's mask.

An image is a PIL image, a path to an image file, a list of either, or a float tensor [B, 3, H, W]
(or [3, H, W]) in [0, 1]; a mask the same with one channel (white = repaint), binarised at 0.5 as
diffusers' mask processor does. Pillow is imported only to read a file or a PIL image.
Everything here returns pixels in [0, 1]; the pipeline maps them to the VAE's [-1, 1].
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from flux_parallel.flux.sampling import pack

# (width, height) pairs FLUX.1 Kontext was trained at, as BFL's sampling.py and diffusers list them
PREFERRED_KONTEXT_RESOLUTIONS = [
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184), (944, 1104),
    (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752), (1456, 720), (1504, 688),
    (1568, 672),
]


class ImageArgumentError(ValueError):
    """A bad image argument, in one sentence that starts with the argument's name: `argument` and the
    `rest` of the sentence apart, so that tools/generate.py can name its flag instead."""

    def __init__(self, argument: str, rest: str):
        super().__init__(f"{argument} {rest}")
        self.argument, self.rest = argument, rest


def _pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading image files or PIL images needs Pillow (pip install pillow); "
                          "or pass float tensors [B, 3, H, W] in [0, 1]") from None
    return Image


def load_images(source, name: str, channels: int = 3) -> list | Tensor:
    """`source` as PIL images in mode RGB (channels 3) or L (channels 1), or as a float tensor
    [B, channels, H, W] in [0, 1]. Refuses with one sentence naming `name`."""
    if isinstance(source, Tensor):
        return _checked_tensor(source, name, channels)
    items = source if isinstance(source, (list, tuple)) else [source]
    if not items:
        raise ImageArgumentError(name, "is an empty list")
    images = [_open(item, name).convert("RGB" if channels == 3 else "L") for item in items]
    if len({im.size for im in images}) > 1:
        sizes = sorted({im.size for im in images})
        raise ImageArgumentError(name, f"holds images of different sizes {sizes} (width, height)")
    return images


def _open(item, name: str):
    Image = _pil()
    if isinstance(item, Image.Image):
        return item
    if not isinstance(item, (str, Path)):
        kind = type(item).__name__
        raise ImageArgumentError(name, f"must be a PIL image, a path, a list of them or a tensor, got {kind}")
    try:
        with Image.open(item) as opened:
            opened.load()  # read now: the file is closed on return
            return opened
    except (OSError, Image.UnidentifiedImageError) as err:
        raise ImageArgumentError(name, f"{item} is not an image file Pillow can read ({type(err).__name__})") from None


def _checked_tensor(x: Tensor, name: str, channels: int) -> Tensor:
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != channels or not x.is_floating_point():
        raise ImageArgumentError(name, f"as a tensor must be float [B, {channels}, H, W], is {x.dtype} {list(x.shape)}")
    if x.numel() and (x.min() < 0 or x.max() > 1):
        raise ImageArgumentError(name, f"as a tensor must hold values in [0, 1], got [{x.min():.3g}, {x.max():.3g}]")
    return x.float()


def image_size(images: list | Tensor) -> tuple[int, int]:
    """(height, width) in pixels."""
    if isinstance(images, Tensor):
        return images.shape[2], images.shape[3]
    return images[0].size[1], images[0].size[0]


def check_token_size(name: str, height: int, width: int) -> None:
    """One 16x16 px token at least: 8x VAE down-sampling, then 2x2 packing."""
    if height < 16 or width < 16:
        raise ImageArgumentError(name, f"is {width}x{height} px: at least 16x16 px (one token) is needed")


def resized(images: list | Tensor, height: int, width: int) -> Tensor:
    """[B, C, height, width] in [0, 1]. PIL images are resized with LANCZOS, as BFL and diffusers do;
    tensors with antialiased bicubic interpolation, clamped to [0, 1]. Same size: no resampling."""
    if isinstance(images, Tensor):
        if tuple(images.shape[2:]) == (height, width):
            return images
        out = F.interpolate(images, size=(height, width), mode="bicubic", antialias=True, align_corners=False)
        return out.clamp(0, 1)
    Image = _pil()
    arrays = [torch.from_numpy(_array(im if im.size == (width, height) else
                                      im.resize((width, height), Image.LANCZOS))) for im in images]
    pixels = torch.stack(arrays).float() / 255  # [B, H, W, C] or [B, H, W]
    return pixels[:, None] if pixels.ndim == 3 else pixels.permute(0, 3, 1, 2)


def _array(image):
    import numpy

    return numpy.array(image, dtype=numpy.uint8)


def binarised(mask: Tensor) -> Tensor:
    """[B, 1, H, W] -> 1 where the mask is >= 0.5 (repaint), else 0 (keep), as diffusers' do_binarize."""
    return (mask >= 0.5).float()


def kontext_size(height: int, width: int, auto_resize: bool) -> tuple[int, int]:
    """(height, width) a Kontext reference of height x width px is resized to: the preferred resolution
    nearest its aspect ratio (auto_resize, as BFL and diffusers), else its own size; floored to 16 px."""
    if auto_resize:
        ratio = width / height
        _, width, height = min((abs(ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return height // 16 * 16, width // 16 * 16


def pack_fill_mask(mask: Tensor) -> Tensor:
    """Fill's mask [B, 1, H, W] -> [B, (H/16)(W/16), 256]: each 8x8 pixel block becomes 64 channels
    (index 8 * row + col, one per latent pixel as BFL's prepare_fill), then 2x2 packed like the latents."""
    per_latent_pixel = rearrange(mask, "B 1 (h ph) (w pw) -> B (ph pw) h w", ph=8, pw=8)  # [B, 64, H/8, W/8]
    return pack(per_latent_pixel)


def latent_mask(mask: Tensor) -> Tensor:
    """Inpainting's mask [B, 1, H, W] -> [B, (H/16)(W/16), 64]: the nearest pixel per latent pixel
    (diffusers' F.interpolate default), repeated over the 16 latent channels and packed."""
    small = F.interpolate(mask, size=(mask.shape[2] // 8, mask.shape[3] // 8), mode="nearest")
    return pack(small.expand(-1, 16, -1, -1))
