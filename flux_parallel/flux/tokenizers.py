"""The CLIP and T5 tokenizers, rebuilt with the `tokenizers` library from the checkpoint files.

Both rebuild the pipeline transformers (5.x) builds from the same files, so the ids match
`CLIPTokenizer` and `T5TokenizerFast` id for id: CLIP is byte-level BPE with `</w>` word ends
over NFC + whitespace-collapsed + lower-cased text split by CLIP's word pattern; T5 is a
SentencePiece unigram model with its precompiled normalizer, split on whitespace with `▁`
prepended to each word. Start/end tokens, truncation (with a warning) and padding are done
here, the same way for both.
"""

import base64
import struct
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE, Unigram
from torch import Tensor

from flux_parallel.weights import CheckpointError, read_json, resolve

# CLIP's word pattern (openai/CLIP simple_tokenizer): specials, English contractions, letter runs,
# single digits, runs of other non-space characters.
CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
CLIP_MAX_LENGTH = 77
T5_MAX_LENGTH = 512  # T5 v1.1 was trained on 512 tokens
UNSET_LENGTH = 10**9  # transformers writes int(1e30) as model_max_length when a tokenizer has none
CLIP_FILES = [
    "model_index.json",
    "tokenizer/*",
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
]
T5_FILES = [
    "model_index.json",
    "tokenizer_2/*",
    "tokenizer.json",
    "spiece.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
]


def as_prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not isinstance(prompts, (list, tuple)):
        raise ValueError(f"a prompt must be a string or a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("the list of prompts is empty: give at least one prompt (an empty string is a valid prompt)")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise ValueError(f"prompt {i} is of type {type(prompt).__name__}, not a string")
    return list(prompts)


class TextTokenizer:
    """`tok(prompts, max_length=None)` -> ids [B, max_length]: prefix + text ids + suffix, then padding."""

    def __init__(
        self,
        name: str,
        backend: Tokenizer,
        prefix: list[int],
        suffix: list[int],
        pad_id: int,
        model_max_length: int,
        max_length: int | None = None,
    ):
        self.name, self.backend = name, backend
        self.prefix, self.suffix, self.pad_id = prefix, suffix, pad_id
        self.model_max_length = model_max_length
        self.max_length = self.check_length(model_max_length if max_length is None else max_length)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def check_length(self, length: int) -> int:
        least = len(self.prefix) + len(self.suffix)
        if not isinstance(length, int) or isinstance(length, bool) or not least <= length <= self.model_max_length:
            raise ValueError(
                f"max_length {length!r} for the {self.name} tokenizer must be an integer from {least} "
                f"to its model_max_length {self.model_max_length}"
            )
        return length

    def __call__(self, prompts: str | list[str], max_length: int | None = None) -> Tensor:
        prompts = as_prompt_list(prompts)
        length = self.max_length if max_length is None else self.check_length(max_length)
        encodings = self.backend.encode_batch(prompts, add_special_tokens=False)
        return torch.tensor([self.frame(e.ids, length, i) for i, e in enumerate(encodings)], dtype=torch.long)

    def frame(self, ids: list[int], length: int, index: int) -> list[int]:
        room = length - len(self.prefix) - len(self.suffix)
        if len(ids) > room:
            warnings.warn(
                f"prompt {index} is too long for the {self.name} tokenizer: its last {len(ids) - room} of "
                f"{len(ids)} tokens were dropped to fit {length} tokens",
                stacklevel=3,
            )
        ids = self.prefix + ids[:room] + self.suffix
        return ids + [self.pad_id] * (length - len(ids))


def special_name(config: dict, role: str, default: str) -> str:
    value = config.get(f"{role}_token") or default
    return value["content"] if isinstance(value, dict) else str(value)


def configured_length(config: dict, default: int) -> int:
    length = config.get("model_max_length")
    return int(length) if isinstance(length, (int, float)) and length < UNSET_LENGTH else default


def add_specials(backend: Tokenizer, names: list[str]) -> None:
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in dict.fromkeys(names)])


def clip_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], config: dict) -> TextTokenizer:
    names = {
        role: special_name(config, role, default)
        for role, default in (
            ("bos", "<|startoftext|>"),
            ("eos", "<|endoftext|>"),
            ("pad", "<|endoftext|>"),
            ("unk", "<|endoftext|>"),
        )
    }
    bpe = BPE(
        vocab, merges, unk_token=names["unk"], continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False
    )
    backend = Tokenizer(bpe)
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    add_specials(backend, list(names.values()))
    ids = {role: backend.token_to_id(name) for role, name in names.items()}
    return TextTokenizer(
        "CLIP", backend, [ids["bos"]], [ids["eos"]], ids["pad"], configured_length(config, CLIP_MAX_LENGTH)
    )


def t5_tokenizer(
    pieces: list[tuple[str, float]],
    charsmap: bytes | None,
    specials: list[str],
    config: dict,
    source: str,
    max_length: int | None = None,
) -> TextTokenizer:
    names = {
        role: special_name(config, role, default)
        for role, default in (("eos", "</s>"), ("pad", "<pad>"), ("unk", "<unk>"))
    }
    index = {piece: i for i, (piece, _) in enumerate(pieces)}
    if names["unk"] not in index:
        raise CheckpointError(f"{source}: the T5 vocabulary has no unknown token {names['unk']!r}")
    backend = Tokenizer(Unigram(pieces, unk_id=index[names["unk"]], byte_fallback=False))
    if charsmap:
        backend.normalizer = normalizers.Precompiled(charsmap)
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    sentinels = [piece for piece, _ in pieces if piece.startswith("<extra_id_")]
    add_specials(backend, list(names.values()) + specials + sentinels)
    eos, pad = backend.token_to_id(names["eos"]), backend.token_to_id(names["pad"])
    return TextTokenizer("T5", backend, [], [eos], pad, configured_length(config, T5_MAX_LENGTH), max_length)


def tokenizer_folder(src: str | Path, subfolder: str, patterns: list[str]) -> Path:
    """The tokenizer folder of `src`: itself, or `subfolder` of a pipeline folder (model_index.json)."""
    path = resolve(src, allow_patterns=patterns)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a folder: give the tokenizer folder or the pipeline folder")
    if (path / "model_index.json").is_file():
        if not (path / subfolder).is_dir():
            raise CheckpointError(f"{path} is a pipeline folder without a {subfolder}/ folder")
        return path / subfolder
    return path


def tokenizer_config(folder: Path) -> dict:
    config = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            config.update(read_json(folder / name))
    return config


def load_clip_tokenizer(src: str | Path) -> TextTokenizer:
    """CLIP tokenizer from `tokenizer.json`, or `vocab.json` + `merges.txt` (the pipeline's `tokenizer/`)."""
    folder = tokenizer_folder(src, "tokenizer", CLIP_FILES)
    if (folder / "tokenizer.json").is_file():
        vocab, merges = bpe_from_json(folder / "tokenizer.json")
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        try:
            vocab, merges = BPE.read_file(str(folder / "vocab.json"), str(folder / "merges.txt"))
        except Exception as err:  # tokenizers raises a bare Exception for malformed files
            raise CheckpointError(f"cannot read {folder / 'vocab.json'} and {folder / 'merges.txt'}: {err}") from None
    else:
        raise CheckpointError(f"{folder} has no CLIP tokenizer files: tokenizer.json, or vocab.json with merges.txt")
    return clip_tokenizer(vocab, merges, tokenizer_config(folder))


def load_t5_tokenizer(src: str | Path, max_length: int | None = None) -> TextTokenizer:
    """T5 tokenizer from `tokenizer.json` or `spiece.model` (the pipeline's `tokenizer_2/`). `max_length`
    defaults to `model_max_length` of `tokenizer_config.json`, else 512."""
    folder = tokenizer_folder(src, "tokenizer_2", T5_FILES)
    config = tokenizer_config(folder)
    if (folder / "tokenizer.json").is_file():
        pieces, charsmap, specials = unigram_from_json(folder / "tokenizer.json")
    elif (folder / "spiece.model").is_file():
        pieces, charsmap, specials = read_spiece((folder / "spiece.model").read_bytes(), folder / "spiece.model")
        # transformers appends the sentinels <extra_id_{n-1}> ... <extra_id_0> after the model's pieces.
        pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(int(config.get("extra_ids", 100))))]
    else:
        raise CheckpointError(f"{folder} has no T5 tokenizer files: tokenizer.json or spiece.model")
    return t5_tokenizer(pieces, charsmap, specials, config, str(folder), max_length)


def bpe_from_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = read_json(path).get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise CheckpointError(f"{path} holds a {model.get('type')} model, not the BPE model of a CLIP tokenizer")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return model["vocab"], merges


def unigram_from_json(path: Path) -> tuple[list[tuple[str, float]], bytes | None, list[str]]:
    data = read_json(path)
    model = data.get("model", {})
    if model.get("type") != "Unigram" or not isinstance(model.get("vocab"), list):
        raise CheckpointError(f"{path} holds a {model.get('type')} model, not the unigram model of a T5 tokenizer")
    norm = data.get("normalizer") or {}
    charsmaps = [n["precompiled_charsmap"] for n in norm.get("normalizers", [norm]) if n.get("type") == "Precompiled"]
    specials = [t["content"] for t in data.get("added_tokens", []) if t.get("special")]
    return [(p, float(s)) for p, s in model["vocab"]], base64.b64decode(charsmaps[0]) if charsmaps else None, specials


def read_spiece(data: bytes, source: Path) -> tuple[list[tuple[str, float]], bytes | None, list[str]]:
    """(pieces with scores, precompiled charsmap, control and user-defined pieces) of a SentencePiece
    ModelProto, read from its protobuf wire format (protobuf itself is not needed)."""
    try:
        pieces, charsmap, specials, model_type = [], None, [], 1
        for field, value in protobuf_fields(data):
            if field == 1:  # repeated SentencePiece {1: piece, 2: score (float32), 3: type}
                piece = dict(protobuf_fields(value))
                pieces.append((piece[1].decode(), struct.unpack("<f", piece.get(2, bytes(4)))[0]))
                if piece.get(3, 1) in (3, 4):  # CONTROL (<pad>, </s>) and USER_DEFINED pieces are added tokens
                    specials.append(pieces[-1][0])
            elif field == 2:  # TrainerSpec {3: model_type}
                model_type = dict(protobuf_fields(value)).get(3, 1)
            elif field == 3:  # NormalizerSpec {2: precompiled_charsmap}
                charsmap = dict(protobuf_fields(value)).get(2)
    except (AttributeError, IndexError, KeyError, UnicodeDecodeError, ValueError, TypeError, struct.error) as err:
        raise CheckpointError(f"{source} is not a readable SentencePiece model ({type(err).__name__}: {err})") from None
    if model_type != 1 or not pieces:
        raise CheckpointError(
            f"{source} is not a SentencePiece unigram model (model type {model_type}, {len(pieces)} pieces)"
        )
    return pieces, charsmap, specials


def protobuf_fields(data: bytes):
    """(field number, value) pairs of a protobuf message: ints for varints, bytes otherwise."""
    pos = 0
    while pos < len(data):
        key, pos = varint(data, pos)
        wire = key & 7
        if wire == 0:
            value, pos = varint(data, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = data[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported wire type {wire}")
        if pos > len(data):
            raise ValueError("truncated message")
        yield key >> 3, value


def varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos
