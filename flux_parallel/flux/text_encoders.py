"""Loading the CLIP and T5 text encoders, and `TextConditioner`: prompts -> (txt, txt_ids, y).

The encoders load from transformers-format folders (`config.json` + `model.safetensors`, or shards
with an index), from a diffusers pipeline folder (`text_encoder/` is CLIP-L, `text_encoder_2/` is
T5-XXL), or from a hub repo id. Weights are cast tensor by tensor into the target dtype, so
T5-XXL (4.7B parameters) never exists in fp32; `TextConditioner.release()` drops both encoders
once the prompts are encoded.
"""

import functools
from pathlib import Path

import torch
from torch import Tensor, nn

from flux_parallel.flux.clip import CLIP_CONFIGS, LEGACY_EOS_ID, ClipParams, ClipTextModel
from flux_parallel.flux.t5 import T5_CONFIGS, T5Encoder, T5Params
from flux_parallel.flux.tokenizer_training import tiny_clip_tokenizer, tiny_t5_tokenizer
from flux_parallel.flux.tokenizers import CLIP_FILES as CLIP_TOKENIZER_FILES
from flux_parallel.flux.tokenizers import T5_FILES as T5_TOKENIZER_FILES
from flux_parallel.flux.tokenizers import TextTokenizer, load_clip_tokenizer, load_t5_tokenizer
from flux_parallel.weights import (
    CheckpointError,
    build_params,
    check_device,
    check_dtype,
    known_fields,
    load_strict,
    module_or_load,
    read_json,
    read_safetensors,
    resolve,
    seeded_init,
    weight_files,
)

WEIGHTS_STEM = "model"  # transformers' model.safetensors / model.safetensors.index.json
CLIP_FILES = ["model_index.json", "text_encoder/*", "config.json", "model.safetensors", "model.safetensors.index.json"]
T5_FILES = ["model_index.json", "text_encoder_2/*", "config.json", "model*.safetensors", "model.safetensors.index.json"]


def encoder_folder(src: str | Path, subfolder: str, patterns: list[str]) -> Path:
    """The transformers model folder of `src`: itself, or `subfolder` of a pipeline folder."""
    path = resolve(src, allow_patterns=patterns)
    if path.is_dir() and (path / "model_index.json").is_file():
        if not (path / subfolder).is_dir():
            raise CheckpointError(f"{path} is a pipeline folder without a {subfolder}/ folder")
        path = path / subfolder
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{path} is neither a pipeline folder (model_index.json) nor a transformers model folder (config.json)"
        )
    return path


def t5_params(config: dict, source: str) -> T5Params:
    """T5Params from a transformers T5Config `config.json` (its field names are ours)."""
    projection = config.get("feed_forward_proj", "gated-gelu")
    if projection != "gated-gelu":
        raise CheckpointError(
            f"{source}: feed_forward_proj {projection!r} is not supported (T5 v1.1 uses 'gated-gelu')"
        )
    return build_params(T5Params, known_fields(T5Params, config), source)


def clip_params(config: dict, source: str) -> ClipParams:
    """ClipParams from a transformers CLIPTextConfig `config.json` (its field names are ours)."""
    if not isinstance(config.get("eos_token_id", 0), int):
        raise CheckpointError(f"{source}: eos_token_id must be one integer, got {config['eos_token_id']!r}")
    return build_params(ClipParams, known_fields(ClipParams, config), source)


def t5_from_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers' T5EncoderModel keys -> ours (the same but for the tied embedding, which either
    `shared.weight` or `encoder.embed_tokens.weight` holds, or both)."""
    embed = state.pop("encoder.embed_tokens.weight", None)
    if "shared.weight" not in state and embed is not None:
        state["shared.weight"] = embed
    return state


def clip_from_transformers(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers' CLIPTextModel keys -> ours: those of transformers 5, which dropped the `text_model.`
    prefix of transformers 4 files; files before 4.31 also hold the position ids, which are made in forward."""
    state = {key.removeprefix("text_model."): value for key, value in state.items()}
    state.pop("embeddings.position_ids", None)
    return state


def load_t5(src: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu") -> T5Encoder:
    """T5 v1.1 encoder from a transformers folder, a pipeline folder (its text_encoder_2/) or a hub repo id."""
    dtype, device = check_dtype(dtype), check_device(device)
    folder = encoder_folder(src, "text_encoder_2", T5_FILES)
    params = t5_params(read_json(folder / "config.json"), str(folder / "config.json"))
    state = t5_from_transformers(read_safetensors(weight_files(folder, WEIGHTS_STEM), dtype, device))
    return load_strict(lambda: T5Encoder(params), state, str(folder))


def load_clip(
    src: str | Path, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"
) -> ClipTextModel:
    """CLIP text model from a transformers folder, a pipeline folder (its text_encoder/) or a hub repo id."""
    dtype, device = check_dtype(dtype), check_device(device)
    folder = encoder_folder(src, "text_encoder", CLIP_FILES)
    params = clip_params(read_json(folder / "config.json"), str(folder / "config.json"))
    state = clip_from_transformers(read_safetensors(weight_files(folder, WEIGHTS_STEM), dtype, device))
    return load_strict(lambda: ClipTextModel(params), state, str(folder))


def module_device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def check_pair(tokenizer: TextTokenizer, vocab_size: int, encoder: str) -> None:
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"the {tokenizer.name} tokenizer has {tokenizer.vocab_size} tokens but the {encoder} embeds only "
            f"{vocab_size}: they do not belong together"
        )


class TextConditioner:
    """Both tokenizers and both encoders: `cond(prompts)` -> (txt [B, S, d_model], txt_ids [B, S, 3], y [B, hidden]),
    txt and y in the encoders' dtype, S the T5 length (`max_sequence_length`, default the T5 tokenizer's).

    After encoding, `release()` drops the encoders (or `.to("cpu")` parks them) to free the device."""

    def __init__(self, clip_tokenizer: TextTokenizer, t5_tokenizer: TextTokenizer, clip: ClipTextModel, t5: T5Encoder):
        check_pair(clip_tokenizer, clip.params.vocab_size, "CLIP text encoder")
        check_pair(t5_tokenizer, t5.params.vocab_size, "T5 encoder")
        if clip_tokenizer.max_length > clip.params.max_position_embeddings:
            raise ValueError(
                f"the CLIP tokenizer pads to {clip_tokenizer.max_length} tokens but the CLIP text encoder has "
                f"{clip.params.max_position_embeddings} positions"
            )
        eos = clip.params.eos_token_id
        if eos != LEGACY_EOS_ID and clip_tokenizer.suffix != [eos]:
            raise ValueError(
                f"the CLIP tokenizer ends prompts with id {clip_tokenizer.suffix} but the CLIP text encoder "
                f"pools at eos_token_id {eos}"
            )
        self.clip_tokenizer, self.t5_tokenizer, self.clip, self.t5 = clip_tokenizer, t5_tokenizer, clip, t5

    @property
    def model_max_length(self) -> int:
        """The longest T5 sequence the tokenizer allows: the cap on `max_sequence_length`."""
        return self.t5_tokenizer.model_max_length

    @property
    def max_sequence_length(self) -> int:
        return self.t5_tokenizer.max_length

    def __call__(
        self, prompts: str | list[str], max_sequence_length: int | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        if self.clip is None or self.t5 is None:
            raise ValueError("the text encoders were released: build a new TextConditioner to encode more prompts")
        clip_ids = self.clip_tokenizer(prompts)  # [B, 77]
        t5_ids = self.t5_tokenizer(prompts, max_sequence_length)  # [B, S]
        with torch.no_grad():
            y = self.clip(clip_ids.to(module_device(self.clip)))  # [B, clip hidden]
            txt = self.t5(t5_ids.to(module_device(self.t5)))  # [B, S, d_model]
        # Every text token sits at position (0, 0, 0): RoPE leaves text queries and keys unrotated.
        txt_ids = torch.zeros(*txt.shape[:2], 3, dtype=txt.dtype, device=txt.device)
        return txt, txt_ids, y

    def to(self, device: torch.device | str) -> "TextConditioner":
        device = check_device(device)
        for encoder in (self.clip, self.t5):
            if encoder is not None:
                encoder.to(device)
        return self

    def release(self) -> None:
        """Drop the encoders (T5-XXL is 9.5 GB in bf16); the tokenizers stay."""
        self.clip = self.t5 = None

    @classmethod
    def from_pretrained(
        cls,
        src: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        text_encoder: str | Path | nn.Module | None = None,
        text_encoder_2: str | Path | nn.Module | None = None,
    ) -> "TextConditioner":
        """Tokenizers and encoders from a pipeline folder or hub repo id; `text_encoder` (CLIP) and
        `text_encoder_2` (T5) override the encoders with any source their loader accepts, or a module."""
        patterns = {*CLIP_TOKENIZER_FILES, *T5_TOKENIZER_FILES}
        patterns |= set(CLIP_FILES) if text_encoder is None else set()
        patterns |= set(T5_FILES) if text_encoder_2 is None else set()
        src = resolve(src, allow_patterns=sorted(patterns))  # a hub id: one download for every part read from it
        clip_tokenizer, t5_tokenizer = load_clip_tokenizer(src), load_t5_tokenizer(src)
        load_clip_here = functools.partial(load_clip, dtype=dtype, device=device)
        load_t5_here = functools.partial(load_t5, dtype=dtype, device=device)
        clip = module_or_load(text_encoder, ClipTextModel, "text_encoder", load_clip_here, src)
        t5 = module_or_load(text_encoder_2, T5Encoder, "text_encoder_2", load_t5_here, src)
        try:
            return cls(clip_tokenizer, t5_tokenizer, clip, t5)
        except ValueError as err:  # a tokenizer and an encoder that do not belong together: the files' fault
            raise CheckpointError(f"{src}: {err}") from None

    @classmethod
    def tokenizers_only(cls, src: str | Path) -> "TextConditioner":
        """The tokenizers of a pipeline folder or hub repo id without the encoders, as after release(): a
        rank that receives the embeddings from the rank holding the encoders (text_encoder_placement "rank0")."""
        src = resolve(src, allow_patterns=sorted({*CLIP_TOKENIZER_FILES, *T5_TOKENIZER_FILES}))
        text = cls.__new__(cls)  # the encoder checks of __init__ need the encoders
        text.clip_tokenizer, text.t5_tokenizer = load_clip_tokenizer(src), load_t5_tokenizer(src)
        text.clip = text.t5 = None
        return text

    @classmethod
    def tiny(
        cls, seed: int = 0, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
    ) -> "TextConditioner":
        """Tiny encoders with seeded random weights and the built-in tokenizers: offline, in a second."""
        dtype, device = check_dtype(dtype), check_device(device)
        clip = seeded_init(ClipTextModel(CLIP_CONFIGS["tiny"]), seed).to(device, dtype)
        t5 = seeded_init(T5Encoder(T5_CONFIGS["tiny"]), seed + 1).to(device, dtype)
        return cls(tiny_clip_tokenizer(), tiny_t5_tokenizer(), clip, t5)
