"""FLUX.1: encode the prompt (and any image), denoise the packed latents, decode them with the VAE.

Thin glue over `flux.sampling` and `parallel`; each stage's seconds land in `pipe.last_run`.
Everything parallel (token shards, CFG branches, data replicas, the parallel VAE) sits behind
the one denoiser that `parallel.parallelize` returns and the functions beside it.
"""

import math
import time
import warnings
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from flux_parallel.flux.cache import StepCache
from flux_parallel.flux.cache_config import CacheConfig, check_cache
from flux_parallel.flux.checkpoint import load_transformer, load_transformer_tensor_parallel
from flux_parallel.flux.compile import prepare_transformer
from flux_parallel.flux.configs import CONFIGS
from flux_parallel.flux.image_modes import ImageRequest, Start, image_request, inpaint_blend, start
from flux_parallel.flux.lora import LoRAAdapters
from flux_parallel.flux.model import Flux
from flux_parallel.flux.pipeline_folder import (
    CHANNEL_KINDS,
    KIND_CHANNELS,
    VARIANT_KINDS,
    check_variant,
    load_schedule,
    pipeline_kind,
    transformer_kind,
)
from flux_parallel.flux.sampling import (
    Schedule,
    check_image_size,
    denoise,
    get_noise,
    get_schedule,
    pack,
    unpack,
)
from flux_parallel.flux.text_encoders import TextConditioner
from flux_parallel.flux.text_parallel import load_text_shards, resolve_placement, shard_text_encoders, text_params
from flux_parallel.flux.tokenizers import as_prompt_list
from flux_parallel.memory import peak_memory_bytes, reset_peak_memory
from flux_parallel.parallel import (
    Conditioning,
    ParallelContext,
    batch_slice,
    check_decode,
    count_comm,
    decode,
    gather_batch,
    parallelize,
    release_other_stages,
    stage_filter,
)
from flux_parallel.parallel.pipefusion import PipeFusionGeneration
from flux_parallel.parallel.runtime import encode, holds_text_encoders, share_conditioning
from flux_parallel.vae import VAE_CONFIGS, AutoEncoder, load_autoencoder
from flux_parallel.weights import check_device, check_dtype, module_or_load, resolve, seeded_init

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


class FluxPipeline:
    """FLUX.1 on one device or every rank of a ParallelContext: text to image, img2img and inpainting with
    schnell or dev, image editing with Kontext, Fill, Canny and Depth (flux/image_modes.py).

    variant: one of pipeline_folder.VARIANT_KINDS; needed only for Kontext, which the transformer's input
    channels do not tell from dev (from_pretrained finds it in the folder or the file name).
    parallel: the mesh (sequence, CFG and data parallelism); every rank builds the pipeline and calls
    it with the same arguments. parallel_vae: decode across all ranks of a data replica. vae_stripes:
    decode on one device in that many exact row stripes (lower peak memory). compile: regional
    torch.compile of the blocks; attention_backend: one of kernels.BACKENDS (default: the rule in
    kernels.default_backend); fp8: FP8 block linears (GPUs with FP8 tensor cores); see flux/compile.py.
    text_encoder_placement: "replicated" (T5 and CLIP on every rank, each encoding its own branches) or
    "rank0" (on rank 0 of each data replica only, which encodes the replica's branches and broadcasts
    the embeddings over the replica: T5-XXL's 9.5 GB in bf16 leave the other ranks) or "sharded" (both
    tensor-parallel over the replica's ranks, each holding 1/replica_size of their layers and encoding
    every branch of the replica with the others: flux/text_parallel.py) or "auto" ("sharded" where the replica
    has several ranks and the encoders' heads and widths divide by their count, else "replicated"; the
    default: the least peak memory per rank, docs/tensor-parallel.md)."""

    def __init__(
        self,
        transformer: Flux,
        vae: AutoEncoder,
        text: TextConditioner,
        schedule: Schedule,
        parallel: ParallelContext | None = None,
        parallel_vae: bool = False,
        vae_stripes: int | None = None,
        compile: bool = False,
        attention_backend: str | None = None,
        fp8: bool = False,
        variant: str | None = None,
        text_encoder_placement: str = "auto",
    ):
        check_variant(variant)
        self.kind = transformer_kind(transformer.params.in_channels, "the transformer given",
                                     VARIANT_KINDS.get(variant), f"variant {variant}")
        self.base_kind = self.kind  # a control LoRA makes it "control" while loaded (_follow_channels)
        if vae_stripes is not None and (not isinstance(vae_stripes, int) or vae_stripes < 1):
            raise ValueError(f"vae_stripes must be a positive integer (the number of row stripes), got {vae_stripes!r}")
        self.transformer, self.vae, self.text, self.schedule = transformer, vae, text, schedule
        self.parallel = parallel or ParallelContext()
        self.parallel_vae = parallel_vae
        self.vae_stripes = vae_stripes
        if text_encoder_placement == "auto":
            text_encoder_placement = resolve_placement("auto", self.parallel, text.t5.params, text.clip.params)
        self.text_encoder_placement = text_encoder_placement
        if not holds_text_encoders(self.parallel, text_encoder_placement):
            text.release()  # replica rank 0 encodes and broadcasts (from_pretrained never loads them here)
        elif text_encoder_placement == "sharded" and text.t5 is not None:
            shard_text_encoders(text, self.parallel)  # whole encoders split here; loaded shards kept as they are
        prepare_transformer(transformer, attention_backend, fp8, compile)  # before any parallel view of it
        # the parallel strategies leave the transformer as it is, except tensor parallelism, which shards it in place
        self.denoiser = parallelize(transformer, self.parallel, attention_backend or "auto")
        self.last_run: dict = {}
        self.progress = None  # optional callable(steps_done, steps_total), e.g. a progress bar
        # record each stage's peak memory in last_run["peak_memory_bytes_by_stage"]; it resets the device's
        # peak at each stage, so a caller's own peak read after the call covers the last stage only
        self.measure_stages = False

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
        vae_stripes: int | None = None,
        variant: str | None = None,
        **options,
    ) -> "FluxPipeline":
        """A diffusers pipeline folder, a folder with the BFL files beside the tokenizer and text-encoder
        folders, or a hub repo id. Each override takes any source its loader accepts (or a loaded module).
        parallel, parallel_vae, vae_stripes, variant and `options` (compile, attention_backend, fp8): see the
        class docstring."""
        dtype, device = check_dtype(dtype), check_device(device)
        overrides = {
            "transformer": transformer,
            "vae": vae,
            "text_encoder": text_encoder,
            "text_encoder_2": text_encoder_2,
        }
        wanted = [f"{c}/*" for c in COMPONENTS if overrides.get(c) is None]
        root = resolve(src, allow_patterns=["model_index.json", "scheduler/*", *wanted])
        kind = pipeline_kind(root, transformer, variant)  # a variant not run here, a corrupt folder: before any weight

        load = partial(load_transformer, dtype=dtype, device=device, keep=stage_filter(parallel) if parallel else None)
        if parallel is not None and parallel.tensor_degree > 1 and not parallel.uses_pipefusion:
            load = partial(load_transformer_tensor_parallel, ctx=parallel, dtype=dtype, device=device)  # slices only
        model = module_or_load(transformer, Flux, "transformer", load, root)  # a PipeFusion rank: its stage only
        ae = module_or_load(vae, AutoEncoder, "vae", partial(load_autoencoder, dtype=dtype, device=device), root)
        placement = options.get("text_encoder_placement", "auto")
        if placement == "auto":  # decided from the encoders' configs, before any weight is read
            placement = resolve_placement(placement, parallel or ParallelContext(),
                                          *text_params(root, text_encoder, text_encoder_2))
            options["text_encoder_placement"] = placement
        if placement == "sharded" and parallel is not None and parallel.replica_size > 1:  # slices only
            text_encoder, text_encoder_2 = load_text_shards(root, parallel, dtype, device, text_encoder, text_encoder_2)
        if holds_text_encoders(parallel or ParallelContext(), placement):
            text = TextConditioner.from_pretrained(
                root, dtype=dtype, device=device, text_encoder=text_encoder, text_encoder_2=text_encoder_2
            )
        else:  # the embeddings arrive from replica rank 0: never read the encoders' weights here
            text = TextConditioner.tokenizers_only(root)
        schedule = load_schedule(root, model.params.guidance_embed)
        variant = variant or ("kontext" if kind == "kontext" else None)  # the other kinds follow from the channels
        return cls(model, ae, text, schedule, parallel, parallel_vae, vae_stripes, variant=variant, **options)

    @classmethod
    def tiny(cls, dtype: torch.dtype = torch.float32, device="cpu", **options) -> "FluxPipeline":
        """The trained tiny model shipped in flux/assets/tiny (tools/train_tiny.py; docs/tiny-model.md): it draws
        the captioned shapes of shapes/data.py at 64x64 px, offline, loaded like any checkpoint folder.
        `options` are from_pretrained's (parallel, parallel_vae, vae_stripes, ...)."""
        return cls.from_pretrained(Path(__file__).resolve().parent / "assets" / "tiny", dtype, device, **options)

    @classmethod
    def tiny_kontext(cls, dtype: torch.dtype = torch.float32, device="cpu", **options) -> "FluxPipeline":
        """The trained tiny FLUX.1 Kontext (flux/assets/tiny-kontext; tools/train_tiny_kontext.py;
        docs/tiny-kontext.md): the tiny model fine-tuned to edit the shapes of shapes/data.py ("make the circle
        red", "change the background to blue"), with the tiny model's text encoders and VAE. Its references
        are 64x64 px: call it with auto_resize=False (the preferred Kontext resolutions are 1024 px)."""
        assets = Path(__file__).resolve().parent / "assets"
        transformer = assets / "tiny-kontext" / "flux1-kontext-tiny.safetensors"
        return cls.from_pretrained(assets / "tiny", dtype, device, transformer=transformer, variant="kontext",
                                   **options)

    @classmethod
    def tiny_random(
        cls,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device="cpu",
        parallel: ParallelContext | None = None,
        parallel_vae: bool = False,
        vae_stripes: int | None = None,
        variant: str | None = None,
        **options,
    ) -> "FluxPipeline":
        """Seeded random weights at the `tiny` sizes and built-in tokenizers: runs offline in seconds,
        identically on every rank. It shows the machinery, not image quality. variant: the input channels
        of that FLUX.1 variant (e.g. "fill": 384), the rest as schnell."""
        dtype, device = check_dtype(dtype), check_device(device)
        check_variant(variant)
        params = replace(CONFIGS["tiny"], in_channels=KIND_CHANNELS[VARIANT_KINDS.get(variant, "text")])
        model = seeded_init(Flux(params), seed).to(device=device, dtype=dtype)
        if parallel is not None and (keep := stage_filter(parallel)) is not None:
            model = release_other_stages(model, keep(model.params))  # a PipeFusion rank holds its stage only
        ae = seeded_init(AutoEncoder(VAE_CONFIGS["tiny"]), seed + 2).to(device=device, dtype=dtype)
        text = TextConditioner.tiny(seed=seed, dtype=dtype, device=device)  # takes seed and seed + 1
        return cls(model, ae, text, Schedule(use_dynamic_shifting=False), parallel, parallel_vae, vae_stripes,
                   variant=variant, **options)

    # LoRA (flux/lora.py): the same adapters on every rank; CLIP's apply before encoding
    @property
    def lora(self) -> LoRAAdapters:
        if getattr(self, "_lora", None) is None:
            self._lora = LoRAAdapters({"transformer": self.transformer, "clip": self.text.clip})
        return self._lora

    def load_lora(self, source: str | Path, adapter_name: str | None = None, scale: float = 1.0,
                  weight_name: str | None = None) -> str:
        """A LoRA file, a folder (pytorch_lora_weights.safetensors or weight_name) or a hub repo id with
        weight_name, in any layout of flux/lora_formats.py -> the adapter's name."""
        name = self.lora.load(source, adapter_name, scale, self.transformer.params, weight_name)
        self._follow_channels()
        return name

    def set_lora_scales(self, scales: dict[str, float]) -> None:
        self.lora.set_scales(scales)

    def fuse_lora(self) -> None:
        self.lora.fuse()

    def unfuse_lora(self) -> None:
        self.lora.unfuse()

    def unload_lora(self, name: str | None = None) -> None:
        self.lora.unload(name)
        self._follow_channels()

    def _follow_channels(self) -> None:
        """A BFL control LoRA widens img_in to 128 channels while it is loaded (flux/lora.py): the pipeline
        is a Control pipeline then (control_image=), and its own kind again once it is unloaded."""
        channels = self.transformer.params.in_channels
        self.kind = self.base_kind if channels == KIND_CHANNELS[self.base_kind] else CHANNEL_KINDS[channels]

    @property
    def lora_adapters(self) -> dict[str, float]:
        """Loaded adapters and their scales."""
        return self.lora.adapters

    @property
    def device(self) -> torch.device:
        # the first held parameter: a later PipeFusion stage holds no embedder (the rest is on the meta device)
        return next(p.device for p in self.transformer.parameters() if not p.is_meta)

    def check_call(self, prompts: list[str], negatives: list[str] | None, height: int, width: int, num_steps: int,
                   max_sequence_length: int, latents: Tensor | None, cache: CacheConfig | None = None,
                   request: ImageRequest | None = None) -> None:
        """One sentence per bad argument, raised identically on every rank before any collective and
        before the text encoders run. request: the call's images (image_modes.image_request)."""
        check_image_size("height", height)
        check_image_size("width", width)
        if num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {num_steps}")
        limit = self.text.model_max_length  # the argument's own name in the message, not the tokenizer's max_length
        if not isinstance(max_sequence_length, int) or not 1 <= max_sequence_length <= limit:
            raise ValueError(f"max_sequence_length {max_sequence_length!r} is outside 1..{limit} "
                             "(the T5 tokenizer's model_max_length)")
        extra_tokens = 0 if request is None else request.reference_tokens  # Kontext's, sharded with the output's
        self.denoiser.check(len(prompts), max_sequence_length, (height // 16) * (width // 16) + extra_tokens,
                            negatives is not None, rows=height // 16, cache=cache)
        check_decode(height // 8, self.parallel, self.parallel_vae)  # a latent row per rank of the parallel VAE
        if request is not None and request.pixels is not None:  # the image it encodes, likewise
            check_decode(request.pixels.shape[2] // 8, self.parallel, self.parallel_vae)
        expected = (len(prompts), 16, height // 8, width // 8)
        if latents is not None and tuple(latents.shape) != expected:
            raise ValueError(f"latents must have shape {list(expected)} for {len(prompts)} images of {height}x{width}, "
                             f"got {list(latents.shape)}")

    @torch.inference_mode()
    def __call__(
        self,
        prompt: str | list[str],
        height: int | None = None,
        width: int | None = None,
        num_steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        latents: Tensor | None = None,
        max_sequence_length: int | None = None,
        output_type: str = "pil",
        negative_prompt: str | list[str] | None = None,
        true_cfg_scale: float = 1.0,
        num_images_per_prompt: int = 1,
        cache: CacheConfig | None = None,
        image=None,
        mask_image=None,
        control_image=None,
        strength: float | None = None,
        auto_resize: bool = True,
    ):
        """Images for `prompt`: PIL images ("pil"), a [B, 3, H, W] tensor in [0, 1] ("pt") or the
        unpacked latents [B, 16, H/8, W/8] ("latent"), B = prompts x num_images_per_prompt in prompt
        order, on global rank 0 (the other ranks return None). With a negative prompt and
        true_cfg_scale > 1, every step uses neg + true_cfg_scale * (pos - neg) (true CFG, as diffusers).
        Image i's noise is drawn for image i (seed, then the batch order), whatever the parallel layout;
        `latents` replaces it: the initial noise [B, 16, H/8, W/8], in every mode.
        cache: skip steps of the block stack (flux/cache.py); last_run["cache"] lists the steps computed.

        Images (flux/image_modes.py has each mode's exact semantics): PIL images, paths, or float tensors
        [B, 3, H, W] in [0, 1] (masks [B, 1, H, W] or 8-bit grayscale, white = repaint, binarised at 0.5),
        one for every prompt or one per prompt; each is VAE-encoded at the posterior mean (deterministic;
        diffusers samples it in img2img, inpaint, Fill and Control). image: img2img's (with `strength` in
        (0, 1], default 0.6) and inpainting's (with `mask_image`) image for schnell or dev, Kontext's
        reference, Fill's image (with `mask_image`); control_image: Canny's or Depth's map. height and
        width default to the image's size floored to 16 px (Kontext: the reference's), else 1024;
        auto_resize: Kontext's reference is resized to the preferred resolution nearest its aspect ratio."""
        has_guidance = self.transformer.params.guidance_embed
        num_steps = num_steps if num_steps is not None else (28 if has_guidance else 4)
        if max_sequence_length is None:
            max_sequence_length = min(512 if has_guidance else 256, self.text.model_max_length)
        if output_type not in ("pil", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'pt' or 'latent', got {output_type!r}")
        prompts, negatives = expand_prompts(prompt, negative_prompt, true_cfg_scale, num_images_per_prompt)
        request = image_request(self.kind, image, mask_image, control_image, strength, height, width, auto_resize)
        height, width = request.height, request.width
        check_cache(cache, self.transformer)
        self.check_call(prompts, negatives, height, width, num_steps, max_sequence_length, latents, cache,
                        request)
        total, part = len(prompts), batch_slice(len(prompts), self.parallel)  # this data replica's images
        request = request.for_images(len(prompts) // num_images_per_prompt, num_images_per_prompt, part)
        if guidance is not None and not has_guidance:
            warnings.warn("this model has no guidance embedding (FLUX.1-schnell): the guidance value is ignored")
        guidance = (3.5 if guidance is None else guidance) if has_guidance else None

        # the settings this call used, defaults resolved, for reports
        run = self.last_run = {"num_steps": num_steps, "guidance": guidance, "max_sequence_length": max_sequence_length,
                               "true_cfg_scale": true_cfg_scale if negatives else None, "steps_s": [],
                               "mode": request.mode, "strength": request.strength, "height": height, "width": width,
                               "reference_tokens": request.reference_tokens}  # Kontext's, beside the output's
        run["lora"] = self.lora_adapters
        run["text_encoder_placement"] = self.text_encoder_placement  # "auto" resolved
        run["lora_memory"] = self.lora.memory() if self.lora_adapters else None
        run["transformer_parameter_bytes"] = self.denoiser.parameter_bytes()  # this rank's: its TP slices, its stage
        run["peak_memory_bytes_by_stage"] = peaks = {}  # this rank's, with measure_stages
        self._stage_peak(peaks, "before")  # everything up to this call: loading
        start_s = time.perf_counter()
        conds = self._encode(prompts[part], negatives[part] if negatives else None, max_sequence_length)
        run["text_encoding_s"] = time.perf_counter() - start_s
        self._stage_peak(peaks, "text")

        noise = latents if latents is not None else get_noise(total, height, width, seed)
        begin = self._start(request, pack(noise[part].to(device=self.device, dtype=torch.float32)), num_steps)
        steps = len(begin.timesteps) - 1  # img2img runs the schedule's tail
        branches = self.denoiser.branches(negatives is not None)
        step_cache = None if cache is None else StepCache(cache, branches, steps, self.denoiser.cache_sums())
        generation = self.denoiser.start(begin.img, begin.img_ids, conds, guidance,
                                         true_cfg_scale if negatives else None, step_cache, begin.cond)
        blend = None if begin.inpaint is None else inpaint_blend(*map(generation.local, begin.inpaint),
                                                                 begin.timesteps)
        img = self._denoise(generation, begin.timesteps, blend)[:, : (height // 16) * (width // 16)]
        self._stage_peak(peaks, "denoise")  # with the VAE encode of the image modes
        run["cache"] = generation.cache_report
        latents = unpack(img, height, width)
        if output_type == "latent":
            return gather_batch(latents, total, self.parallel)
        start_s = time.perf_counter()
        with count_comm() as stats:
            image = decode(self.vae, latents.to(self.vae_dtype), self.parallel, self.parallel_vae, self.vae_stripes)
        self._sync()
        run["vae_decode_s"] = time.perf_counter() - start_s
        self._stage_peak(peaks, "vae")
        run["vae_comm_bytes"] = dict(stats.bytes)
        image = gather_batch(image, total, self.parallel)
        if image is None:
            return None
        image = (image.float() / 2 + 0.5).clamp(0, 1)
        return image if output_type == "pt" else to_pil(image)

    def _start(self, request: ImageRequest, noise: Tensor, num_steps: int) -> Start:
        """The loop's start for this replica's images: noise [b, L, 64] packed; the images VAE-encoded here."""
        timesteps = get_schedule(num_steps, noise.shape[1], self.schedule)  # the shift counts output tokens only
        start_s = time.perf_counter()
        begin = start(request, self._vae_encode, noise, timesteps)
        self._sync()
        if request.pixels is not None:
            self.last_run["vae_encode_s"] = time.perf_counter() - start_s
        return begin

    def _vae_encode(self, pixels: Tensor) -> Tensor:
        """[b, 3, H, W] in [-1, 1] -> latents [b, 16, H/8, W/8] in fp32 on the transformer's device: the posterior
        mean, on every rank of the replica (with the parallel VAE, encoded across its ranks)."""
        vae_device = next(self.vae.parameters()).device
        pixels = pixels.to(device=vae_device, dtype=self.vae_dtype)
        return encode(self.vae, pixels, self.parallel, self.parallel_vae).float().to(self.device)

    @property
    def vae_dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def _encode(self, prompts: list[str], negatives: list[str] | None, max_sequence_length: int) -> dict:
        """The conditioning of each CFG branch this rank computes (cfg-parallel ranks encode only theirs); with
        text_encoder_placement "rank0", replica rank 0 encodes every branch of the replica and broadcasts them;
        with "sharded", every rank of the replica encodes every branch together with the others."""
        dtype, device = self.transformer.img_in.weight.dtype, self.device
        mine = self.denoiser.branches(negatives is not None)
        shared = self.text_encoder_placement == "rank0"
        every = shared or self.text_encoder_placement == "sharded"
        branches = (("negative", "positive") if negatives else ("positive",)) if every else mine
        conds = {}
        for branch in branches if self.text.t5 is not None else ():
            txt, txt_ids, y = self.text(negatives if branch == "negative" else prompts, max_sequence_length)
            conds[branch] = Conditioning(txt.to(device=device, dtype=dtype), txt_ids.to(device), y.to(device=device,
                                                                                                        dtype=dtype))
        if shared:
            p, batch = self.transformer.params, len(prompts)
            shapes = {"txt": (batch, max_sequence_length, p.context_in_dim), "txt_ids": (batch, max_sequence_length, 3),
                      "y": (batch, p.vec_in_dim)}
            conds = share_conditioning(conds, branches, shapes, dtype, device, self.parallel)
        self._sync()
        return {branch: conds[branch] for branch in mine}

    def _denoise(self, generation, timesteps: list[float], blend=None) -> Tensor:
        steps_s = self.last_run["steps_s"]
        last = time.perf_counter()

        def on_step(step: int) -> None:
            nonlocal last
            self._sync()
            now = time.perf_counter()
            steps_s.append(now - last)
            last = now
            if self.progress is not None:
                self.progress(step + 1, len(timesteps) - 1)

        with count_comm() as stats:
            img = denoise_on_mesh(generation, timesteps, on_step, blend)
        steps = max(1, len(timesteps) - 1)
        self.last_run["comm_bytes_per_step"] = {k: v / steps for k, v in stats.bytes.items()}
        self.last_run["comm_bytes_per_step_by_axis"] = {k: v / steps for k, v in stats.axis_bytes.items()}
        return img

    def _stage_peak(self, peaks: dict, stage: str) -> None:
        """With measure_stages: the peak memory of the stage that just ended; the next one counts from here."""
        if self.measure_stages:
            peaks[stage] = peak_memory_bytes(self.device)
            reset_peak_memory(self.device)

    def _sync(self) -> None:
        """Stage timings on a GPU need the queued kernels finished (a step's output is needed next anyway)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def denoise_on_mesh(generation, timesteps: list[float], on_step=None, blend=None) -> Tensor:
    """The denoising loop of one generation on this rank -> the final latents [B, L, C] on every rank of
    the replica: the Euler loop over this rank's token shard, or PipeFusion's own patch schedule.
    blend(step, img_local): see sampling.denoise (inpainting)."""
    if isinstance(generation, PipeFusionGeneration):
        generation.blend = blend  # its last stage blends each patch as it updates it
        return generation.denoise(timesteps, on_step)
    return generation.finish(denoise(generation.velocity, generation.img, timesteps, on_step, blend))


def expand_prompts(prompt, negative_prompt, true_cfg_scale: float, num_images_per_prompt: int):
    """(prompts, negatives): one entry per image, each prompt repeated num_images_per_prompt times in
    a row; negatives is None unless true CFG is on (a negative prompt and true_cfg_scale > 1)."""
    if not isinstance(num_images_per_prompt, int) or isinstance(num_images_per_prompt, bool) \
            or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")
    if isinstance(true_cfg_scale, bool) or not isinstance(true_cfg_scale, (int, float)) \
            or not math.isfinite(true_cfg_scale):
        raise ValueError(f"true_cfg_scale must be a finite number, got {true_cfg_scale!r}")
    prompts = as_prompt_list(prompt)
    if negative_prompt is None or true_cfg_scale <= 1:
        if true_cfg_scale > 1:
            warnings.warn("true_cfg_scale > 1 without a negative prompt: true CFG is off (as in diffusers)")
        return [p for p in prompts for _ in range(num_images_per_prompt)], None
    negatives = as_prompt_list(negative_prompt)
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    if len(negatives) != len(prompts):
        raise ValueError(f"negative_prompt has {len(negatives)} prompts for {len(prompts)} prompts: "
                         "give one negative prompt, or one per prompt")
    repeat = num_images_per_prompt
    return [p for p in prompts for _ in range(repeat)], [n for n in negatives for _ in range(repeat)]


def to_pil(images: Tensor) -> list:
    """[B, 3, H, W] in [0, 1] -> PIL images (needs Pillow, which diffusers users already have)."""
    try:
        from PIL import Image
    except ImportError:
        raise ImportError(
            "output_type='pil' needs Pillow (pip install pillow); use output_type='pt' without it"
        ) from None
    arrays = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arrays]

