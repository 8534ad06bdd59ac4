"""Text to image: encode the prompt, denoise the packed latents, decode them with the VAE.

Thin glue over `flux.sampling`; each stage's seconds land in `pipe.last_run`. With a
ParallelContext, the denoising loop keeps only this rank's token shard between steps and
gathers once at the end; the VAE decode runs on every rank (parallel_vae), on rank 0 in
stripes (vae_chunks), or whole on rank 0.
"""

import dataclasses
import time
from functools import partial
import warnings
from pathlib import Path

import torch
from torch import Tensor

from flux.checkpoint import load_transformer
from flux.configs import CONFIGS
from flux.model import Flux
from flux.sampling import Schedule, check_image_size, denoise, get_noise, get_schedule, make_img_ids, pack, unpack
from flux.text_encoders import TextConditioner
from flux.tokenizers import as_prompt_list
from flux.weights import CheckpointError, check_device, check_dtype, module_or_load, read_json, resolve, seeded_init
from parallel.context import ParallelContext

# FlowMatchEulerDiscreteScheduler options that change the sigmas in ways Schedule does not implement
UNSUPPORTED_SCHEDULER_OPTIONS = {"shift_terminal": None, "use_karras_sigmas": False, "use_exponential_sigmas": False,
                                 "use_beta_sigmas": False, "invert_sigmas": False, "stochastic_sampling": False,
                                 "time_shift_type": "exponential"}
COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def load_schedule(root: Path | None, guidance_embed: bool) -> Schedule:
    """From `scheduler/scheduler_config.json` when the folder has one, else FLUX's defaults."""
    config_path = root / "scheduler" / "scheduler_config.json" if root is not None and root.is_dir() else None
    if config_path is None or not config_path.is_file():
        return Schedule(use_dynamic_shifting=guidance_embed)
    config = read_json(config_path)
    for option, default in UNSUPPORTED_SCHEDULER_OPTIONS.items():
        if config.get(option, default) != default:
            raise CheckpointError(f"{config_path}: {option} {config[option]!r} is not supported (only {default!r})")
    fields = {f.name for f in dataclasses.fields(Schedule)}
    try:
        return Schedule(**{k: v for k, v in config.items() if k in fields})
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{config_path}: {err}") from None


class FluxPipeline:
    def __init__(
        self,
        transformer: Flux,
        vae,
        text: TextConditioner,
        schedule: Schedule,
        parallel: ParallelContext | None = None,
        parallel_vae: bool = False,
        vae_chunks: int | None = None,
    ):
        if vae_chunks is not None and (not isinstance(vae_chunks, int) or vae_chunks < 1):
            raise ValueError(f"vae_chunks must be a positive integer (the number of row stripes), got {vae_chunks!r}")
        self.transformer, self.vae, self.text, self.schedule = transformer, vae, text, schedule
        self.parallel = parallel or ParallelContext()
        self.parallel_vae = parallel_vae
        self.vae_chunks = vae_chunks
        self.sp_transformer = None
        if self.parallel.sp_degree > 1:
            from parallel.apply import parallelize_flux

            self.sp_transformer = parallelize_flux(transformer, self.parallel)
        self.last_run: dict = {}
        self.progress = None  # optional callable(steps_done, steps_total), e.g. a progress bar

    @classmethod
    def from_pretrained(
        cls,
        src: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        transformer=None,
        vae=None,
        text_encoder=None,
        text_encoder_2=None,
        parallel: ParallelContext | None = None,
        parallel_vae: bool = False,
        vae_chunks: int | None = None,
    ) -> "FluxPipeline":
        """A diffusers pipeline folder, a folder with the BFL files beside the tokenizer and text-encoder
        folders, or a hub repo id. Each override takes any source its loader accepts (or a loaded module).
        parallel, parallel_vae, vae_chunks: see __init__."""
        from vae import AutoEncoder, load_autoencoder

        dtype, device = check_dtype(dtype), check_device(device)
        overrides = {"transformer": transformer, "vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
        wanted = [f"{c}/*" for c in COMPONENTS if overrides.get(c) is None]
        root = resolve(src, allow_patterns=["model_index.json", "scheduler/*", *wanted])

        model = module_or_load(transformer, Flux, "transformer", partial(load_transformer, dtype=dtype, device=device), root)
        ae = module_or_load(vae, AutoEncoder, "vae", partial(load_autoencoder, dtype=dtype, device=device), root)
        text = TextConditioner.from_pretrained(
            root, dtype=dtype, device=device, text_encoder=text_encoder, text_encoder_2=text_encoder_2
        )
        schedule = load_schedule(root, model.params.guidance_embed)
        return cls(model, ae, text, schedule, parallel, parallel_vae, vae_chunks)

    @classmethod
    def tiny(
        cls,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        parallel: ParallelContext | None = None,
        parallel_vae: bool = False,
        vae_chunks: int | None = None,
    ) -> "FluxPipeline":
        """The trained tiny model shipped in flux/assets/tiny (tools/train_tiny.py; docs/tiny-model.md): it draws
        the captioned shapes of tools/shapes.py at 64x64 px, offline, loaded like any checkpoint folder."""
        folder = Path(__file__).resolve().parent / "assets" / "tiny"
        return cls.from_pretrained(folder, dtype, device, parallel=parallel, parallel_vae=parallel_vae,
                                   vae_chunks=vae_chunks)

    @classmethod
    def tiny_random(
        cls,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        parallel: ParallelContext | None = None,
        parallel_vae: bool = False,
        vae_chunks: int | None = None,
    ) -> "FluxPipeline":
        """Seeded random weights at the `tiny` sizes and built-in tokenizers: runs offline in seconds,
        identically on every rank. It shows the machinery, not image quality."""
        from vae import VAE_CONFIGS, AutoEncoder

        dtype, device = check_dtype(dtype), check_device(device)
        model = seeded_init(Flux(CONFIGS["tiny"]), seed).to(device=device, dtype=dtype)
        ae = seeded_init(AutoEncoder(VAE_CONFIGS["tiny"]), seed + 2).to(device=device, dtype=dtype)
        text = TextConditioner.tiny(seed=seed, dtype=dtype, device=device)  # takes seed and seed + 1
        return cls(model, ae, text, Schedule(use_dynamic_shifting=False), parallel, parallel_vae, vae_chunks)

    @property
    def device(self) -> torch.device:
        return self.transformer.img_in.weight.device

    def check_call(self, prompt, height: int, width: int, num_steps: int, max_sequence_length: int,
                   latents: Tensor | None) -> int:
        """One sentence per bad argument, raised identically on every rank before any collective and
        before the text encoders run. Returns the batch size."""
        batch = len(as_prompt_list(prompt))
        check_image_size("height", height)
        check_image_size("width", width)
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        limit = self.text.model_max_length  # the argument's own name in the message, not the tokenizer's max_length
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= limit:
            raise ValueError(f"max_sequence_length {max_sequence_length!r} is outside 1..{limit} (the T5 tokenizer's model_max_length)")
        if self.sp_transformer is not None:  # every sp rank needs an image token, every VAE rank a latent row
            from parallel.sequence import make_layout

            make_layout(max_sequence_length, (height // 16) * (width // 16), self.parallel.ulysses_degree, self.parallel.ring_degree)
        if self.parallel_vae and self.parallel.is_distributed:
            from parallel.halo import split_rows

            split_rows(height // 8, self.parallel.world_size)
        expected = (batch, 16, height // 8, width // 8)
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(f"latents must have shape {list(expected)} for {height}x{width}, got {list(latents.shape)}")
        return batch

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        height: int = 1024,
        width: int = 1024,
        num_steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        latents: Tensor | None = None,
        max_sequence_length: int | None = None,
        output_type: str = "pil",
    ):
        """Images for `prompt`: PIL images ("pil"), a [B, 3, H, W] tensor in [0, 1] ("pt") or the
        unpacked latents [B, 16, H/8, W/8] ("latent"). Ranks other than 0 return None."""
        has_guidance = self.transformer.params.guidance_embed
        num_steps = num_steps if num_steps is not None else (28 if has_guidance else 4)
        if max_sequence_length is None:
            max_sequence_length = min(512 if has_guidance else 256, self.text.model_max_length)
        batch = self.check_call(prompt, height, width, num_steps, max_sequence_length, latents)
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        if guidance is not None and not has_guidance:
            warnings.warn("this model has no guidance embedding (FLUX.1-schnell): the guidance value is ignored")
        guidance = (3.5 if guidance is None else guidance) if has_guidance else None

        # the settings this call used, defaults resolved, for reports
        run = self.last_run = {"num_steps": num_steps, "guidance": guidance, "max_sequence_length": max_sequence_length,
                               "steps_s": []}
        start = time.perf_counter()
        txt, txt_ids, y = self.text(prompt, max_sequence_length=max_sequence_length)
        self._sync()
        run["text_encoding_s"] = time.perf_counter() - start
        if latents is None:
            latents = get_noise(batch, height, width, seed)

        dtype, device = self.transformer.img_in.weight.dtype, self.device
        img = pack(latents.to(device=device, dtype=torch.float32))
        img_ids = make_img_ids(batch, height, width, device)
        txt, y = txt.to(device=device, dtype=dtype), y.to(device=device, dtype=dtype)
        timesteps = get_schedule(num_steps, img.shape[1], self.schedule)
        img = self._denoise(img, img_ids, txt, txt_ids.to(device), y, timesteps, guidance)
        latents = unpack(img, height, width)
        if output_type == "latent":
            return latents if self.parallel.is_main else None
        start = time.perf_counter()
        image = self._decode(latents)
        self._sync()
        run["vae_decode_s"] = time.perf_counter() - start
        if image is None:
            return None
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        return image if output_type == "pt" else to_pil(image)

    def _denoise(self, img, img_ids, txt, txt_ids, y, timesteps, guidance) -> Tensor:
        steps_s, last = self.last_run["steps_s"], [time.perf_counter()]

        def on_step(step: int) -> None:
            self._sync()
            now = time.perf_counter()
            steps_s.append(now - last[0])
            last[0] = now
            if self.progress is not None:
                self.progress(step + 1, len(timesteps) - 1)

        if self.sp_transformer is None:
            return denoise(self.transformer, img, img_ids, txt, txt_ids, y, timesteps, guidance, on_step)
        from parallel.comm import count_comm

        sp = self.sp_transformer
        with count_comm() as stats:
            img_l, img_ids_l, txt_l, txt_ids_l = sp.shard(img, img_ids, txt, txt_ids)
            img_l = denoise(sp, img_l, img_ids_l, txt_l, txt_ids_l, y, timesteps, guidance, on_step)
            img = sp.gather(img_l)
        steps = max(1, len(timesteps) - 1)
        self.last_run["comm_bytes_per_step"] = {k: v / steps for k, v in stats.bytes.items()}
        return img

    def _decode(self, latents: Tensor) -> Tensor | None:
        if self.parallel_vae and self.parallel.is_distributed:
            from parallel.vae import decode_parallel

            return decode_parallel(self.vae, latents, self.parallel)
        if not self.parallel.is_main:
            return None
        if self.vae_chunks:
            from parallel.vae import decode_in_stripes

            return decode_in_stripes(self.vae, latents, self.vae_chunks)
        return self.vae.decode(latents)

    def _sync(self) -> None:
        """Stage timings on a GPU need the queued kernels finished (a step's output is needed next anyway)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def to_pil(images: Tensor) -> list:
    """[B, 3, H, W] in [0, 1] -> PIL images (needs Pillow, which diffusers users already have)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("output_type='pil' needs Pillow (pip install pillow); use output_type='pt' without it") from None
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]
