"""Learning tokenizers from a text, in memory and deterministically: a SentencePiece unigram model in
T5's layout and a CLIP-style byte-level BPE vocabulary.

They give the `tiny` models their built-in tokenizers (learnt at first use from TINY_CORPUS), the
trained tiny model its caption vocabulary (tools/train_tiny.py), and the tokenizer tests their files.
"""

import collections
import functools
import io
import itertools
from pathlib import Path

import sentencepiece
from tokenizers import pre_tokenizers

from flux_parallel.flux.tokenizers import TextTokenizer, clip_tokenizer, read_spiece, t5_tokenizer

# The built-in tokenizers of the `tiny` model: learnt at first use from this text, in memory, deterministically,
# so that the whole pipeline runs offline. They show the machinery; they are no language model's vocabulary.
TINY_CORPUS = """\
A photograph of an astronaut riding a horse on the moon, with the Earth rising behind the hills.
A watercolor painting of a quiet mountain village at dawn, mist over the river and pine forests.
A close-up portrait of an old fisherman with a grey beard, dramatic light, shallow depth of field.
A red fox sleeping in the snow under a birch tree; soft winter light, highly detailed fur.
An oil painting of a lighthouse in a storm, waves crashing against the rocks at night.
A cup of coffee on a wooden table next to an open book and a pair of glasses, morning sunlight.
A futuristic city with flying cars, neon signs and tall glass towers reflecting the sunset.
A small robot watering flowers in a garden, cartoon style, bright colors, 3D render.
A bowl of ramen with eggs, noodles, green onions and steam rising, food photography.
The word "FLUX" written in golden letters on a black marble wall, studio lighting.
A cat wearing a tiny wizard hat, reading a spell book by candle light, digital art.
Two children flying a kite on a windy beach, long shadows, summer afternoon, 35mm film.
A dense jungle with a hidden temple covered in vines, rays of light through the leaves.
A pixel art castle on a floating island, waterfalls falling into the clouds below.
A minimalist poster of a bicycle, flat shapes, pastel palette, plenty of white space.
Café crème brûlée in Paris, naïve façade; 東京タワー at night; Москва зимой; ¿qué tal? 🙂
An isometric illustration of a cozy bedroom with plants, a desk, a lamp and a sleeping dog.
A macro photo of a dragonfly on a leaf covered with morning dew drops, bokeh background.
A medieval knight in shining armor standing in a field of sunflowers, epic composition.
A snowy owl flying over a frozen lake under the northern lights, long exposure.
A steaming loaf of bread on a kitchen counter, flour scattered around, warm tones.
A sailing ship made of paper floating in a puddle after the rain, reflections of the street.
A portrait of a woman with freckles and curly red hair, natural light, 85mm lens, f/1.8.
A desert road at sunset with a vintage car, dust in the air, cinematic wide shot.
A sketch of a hummingbird drinking nectar from a flower, pencil on paper, 1920s style.
Numbers and symbols: 0 1 2 3 4 5 6 7 8 9 + - * / = % & @ # $ ( ) [ ] { } < > ! ? ' " : ; , .
"""
TINY_CLIP_MERGES = 254  # 512 byte symbols + 254 merges + start and end tokens = 768, the tiny CLIP's vocab
TINY_T5_PIECES = 400  # at most; plus 100 sentinels, within the tiny T5's 512 embeddings


def train_spiece(lines: list[str], vocab_size: int) -> bytes:
    """A SentencePiece unigram model (Kudo 2018) in T5's layout: <pad> 0, </s> 1, <unk> 2, no start token;
    `vocab_size` pieces at most (fewer if the text has fewer)."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="unigram",
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        num_threads=1,  # one thread: the same model on every machine
        minloglevel=2,
    )
    return model.getvalue()


@functools.cache
def tiny_spiece_model() -> bytes:
    return train_spiece(TINY_CORPUS.splitlines(), TINY_T5_PIECES)


def tiny_t5_tokenizer(max_length: int | None = None) -> TextTokenizer:
    pieces, charsmap, specials = read_spiece(tiny_spiece_model(), Path("<built-in tiny spiece.model>"))
    pieces += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(100))]
    return t5_tokenizer(pieces, charsmap, specials, {}, "built-in tiny T5 tokenizer", max_length)


def clip_vocab(lines: list[str], num_merges: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary: the 256 byte symbols with and without `</w>`, `num_merges` merges
    learnt on `lines`, then the start and end tokens (the end token's id is the vocabulary size - 1)."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    words = collections.Counter()
    tokenizer = clip_tokenizer({s: i for i, s in enumerate(symbols)}, [], {})  # for its normalizer and pre-tokenizer
    for line in lines:
        for word, _ in tokenizer.backend.pre_tokenizer.pre_tokenize_str(
            tokenizer.backend.normalizer.normalize_str(line)
        ):
            words[(*word[:-1], word[-1] + "</w>")] += 1
    merges = learn_merges(words, num_merges)
    tokens = symbols + [s + "</w>" for s in symbols] + [a + b for a, b in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, merges


@functools.cache
def tiny_clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    return clip_vocab(TINY_CORPUS.splitlines(), TINY_CLIP_MERGES)


def tiny_clip_tokenizer() -> TextTokenizer:
    return clip_tokenizer(*tiny_clip_vocab(), {})


def learn_merges(words: collections.Counter, count: int) -> list[tuple[str, str]]:
    """Byte-pair encoding (Sennrich et al. 2016): merge the most frequent adjacent pair, `count` times.
    Ties go to the largest pair, so the result does not depend on dictionary order. Only the words
    holding the merged pair are recounted."""
    words = [(list(word), n) for word, n in words.items()]
    pairs, holders = collections.Counter(), collections.defaultdict(set)
    for index, (word, n) in enumerate(words):
        for pair in itertools.pairwise(word):
            pairs[pair] += n
            holders[pair].add(index)
    merges = []
    for _ in range(count):
        if not pairs:
            raise ValueError(f"the corpus yields only {len(merges)} merges, not {count}")
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        for index in sorted(holders.pop(best)):
            word, n = words[index]
            for pair in itertools.pairwise(word):
                pairs[pair] -= n
            word[:] = merge_pair(tuple(word), best)
            for pair in itertools.pairwise(word):
                pairs[pair] += n
                holders[pair].add(index)
        pairs = +pairs  # drop pairs counted down to zero
    return merges


def merge_pair(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if word[i : i + 2] == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)
