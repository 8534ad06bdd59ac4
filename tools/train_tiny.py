"""Train the tiny FLUX on the captioned shapes of flux_parallel/shapes/data.py and write it as a FLUX checkpoint folder.

    python tools/train_tiny.py --output flux_parallel/flux/assets/tiny      # about 27 min on 2 CPU cores

Three stages, each from the seed:
  1. tokenizers: a SentencePiece model (T5) and a byte-level BPE vocabulary (CLIP) learnt from the
     training captions; the two text encoders start from seeded random weights (trained in stage 3);
  2. the 16-channel autoencoder (VAE_CONFIGS["tiny-trained"]) trained to reconstruct the images from slightly
     noisy latents; its latents are then shifted and scaled to zero mean and unit variance;
  3. the MMDiT (CONFIGS["tiny"]) trained with the rectified-flow objective of FLUX (Esser et al. 2024,
     "Scaling Rectified Flow Transformers"): x_t = (1 - t) x_0 + t noise, regress the velocity noise - x_0,
     conditioned on the captions' T5 tokens and pooled CLIP vector; both text encoders are trained with it.

The folder holds what a FLUX.1 release holds: `flux1-tiny.safetensors` and `ae.safetensors` in the
black-forest-labs layout (with a `config.json` beside them for what their tensors cannot say: the RoPE
axes, the VAE's groups, scale and shift), transformers-format `text_encoder/` and `text_encoder_2/`,
and `tokenizer/`, `tokenizer_2/`. `FluxPipeline.from_pretrained(folder)` loads it.
"""

import argparse
import dataclasses
import json
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from flux_parallel.flux.clip import CLIP_CONFIGS, ClipTextModel
from flux_parallel.flux.configs import CONFIGS
from flux_parallel.flux.model import Flux
from flux_parallel.flux.sampling import make_img_ids, pack
from flux_parallel.flux.t5 import T5_CONFIGS, T5Encoder
from flux_parallel.flux.text_encoders import TextConditioner
from flux_parallel.flux.tokenizer_training import clip_vocab, train_spiece
from flux_parallel.flux.tokenizers import load_clip_tokenizer, load_t5_tokenizer
from flux_parallel.shapes import data as shapes
from flux_parallel.vae import VAE_CONFIGS, AutoEncoder
from flux_parallel.weights import seeded_init

TEXT_TOKENS = 16  # T5 tokens per caption (the longest has 14): the tokenizer's model_max_length, the default
T5_PIECES, CLIP_MERGES = 64, 80  # enough for every caption word to be one token
SAFETENSORS_METADATA = {"format": "pt"}  # transformers refuses safetensors files without it


def write_tokenizers(out: Path) -> None:
    """tokenizer/ (CLIP: vocab.json, merges.txt) and tokenizer_2/ (T5: spiece.model), learnt from the captions."""
    captions = shapes.caption_corpus()
    vocab, merges = clip_vocab(captions, CLIP_MERGES)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    (out / "tokenizer" / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "tokenizer" / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (out / "tokenizer_2").mkdir(parents=True, exist_ok=True)
    # SentencePiece seeds its pieces from repeats that cannot be extended: in captions, "▁circle" always
    # extends to "▁circle▁on..." and whole words never become pieces. Shuffled words make each word its own repeat.
    rng = random.Random(0)
    shuffled = [" ".join(rng.sample(c.split(), len(c.split()))) for c in captions]
    (out / "tokenizer_2" / "spiece.model").write_bytes(train_spiece(shuffled, T5_PIECES))
    (out / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps({"model_max_length": TEXT_TOKENS}))


def text_conditioner(out: Path, seed: int) -> TextConditioner:
    """The text side: the tokenizers read back from `out`, seeded random encoders sized to them."""
    clip_tok, t5_tok = load_clip_tokenizer(out), load_t5_tokenizer(out)
    clip_params = dataclasses.replace(CLIP_CONFIGS["tiny"], vocab_size=clip_tok.vocab_size,
                                      eos_token_id=clip_tok.vocab_size - 1)
    t5_params = dataclasses.replace(T5_CONFIGS["tiny"], vocab_size=t5_tok.vocab_size)
    clip = seeded_init(ClipTextModel(clip_params), seed)
    t5 = seeded_init(T5Encoder(t5_params), seed + 1)
    return TextConditioner(clip_tok, t5_tok, clip, t5)


def train_autoencoder(seed: int, steps: int, batch: int, log) -> AutoEncoder:
    torch.manual_seed(seed)
    ae = AutoEncoder(VAE_CONFIGS["tiny-trained"])
    optimizer = torch.optim.AdamW(ae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    rng, noise = random.Random(seed), torch.Generator().manual_seed(seed)
    for step in range(steps):
        scenes = [shapes.sample_scene(rng) for _ in range(batch)]
        images = torch.stack([shapes.render(s) for s in scenes]) * 2 - 1  # [B, 3, 64, 64] in [-1, 1]
        # the shape covers 5-25% of the pixels: weigh its colour as much as the background's
        weights = 1 + 3 * torch.stack([shapes.shape_mask(s.shape, s.centre, shapes.SIZES[s.size]) for s in scenes])
        mean = ae.encoder(images).chunk(2, dim=1)[0]  # [B, 16, 8, 8] the posterior's mean, before shift and scale
        # A fixed small posterior noise rather than a learnt one: the decoder learns to tolerate latents a little
        # off (as the transformer's will be) from the first step, and the penalty keeps the encoder from
        # outgrowing the noise; a learnt variance starts at 1 and slows training down on 2 cores.
        latent = mean + 0.1 * torch.randn(mean.shape, generator=noise)
        penalty = mean.pow(2).mean()
        error = (ae.decoder(latent) - images).abs().mean(dim=1)  # [B, 64, 64]
        loss = (weights * error).sum() / weights.sum() + 1e-3 * penalty
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"autoencoder step {step}: loss {loss.item():.4f} (latent mean square {penalty.item():.2f})")
    return ae.eval().requires_grad_(False)


@torch.no_grad()
def normalise_latents(ae: AutoEncoder, seed: int, count: int) -> AutoEncoder:
    """FLUX's shift and scale for this autoencoder: the latents' mean and inverse standard deviation over `count`
    scenes."""
    images = shapes.make_batch(random.Random(seed), count)[0] * 2 - 1
    mean = ae.encoder(images).chunk(2, dim=1)[0]
    params = dataclasses.replace(ae.params, shift_factor=round(mean.mean().item(), 4),
                                 scale_factor=round(1 / mean.std().item(), 4))
    normalised = AutoEncoder(params)
    normalised.load_state_dict(ae.state_dict())
    return normalised.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(ae: AutoEncoder, text: TextConditioner, seed: int, count: int) -> dict:
    """`count` training scenes, encoded once: latents packed into tokens, the captions' token ids."""
    rng, latents, captions = random.Random(seed), [], []
    for first in range(0, count, 256):
        images, batch_captions = shapes.make_batch(rng, min(256, count - first))
        latents.append(pack(ae.encode(images * 2 - 1)))  # [256, 16, 64]
        captions += batch_captions
    unique = sorted(set(captions))
    clip_ids = text.clip_tokenizer(unique)  # [U, 77]
    # CLIP's attention is causal and it pools at the first end token: the padding after it changes nothing
    clip_ids = clip_ids[:, : int((clip_ids == text.clip.params.eos_token_id).int().argmax(dim=1).max()) + 1]
    index = torch.tensor([unique.index(c) for c in captions])
    return {"img": torch.cat(latents), "clip_ids": clip_ids, "t5_ids": text.t5_tokenizer(unique, TEXT_TOKENS),
            "caption_index": index}


def zero_init_outputs(model: Flux) -> Flux:
    """adaLN-Zero (Peebles & Xie 2023, DiT): every block starts as the identity, the output at zero."""
    modulations = [b.img_mod.lin for b in model.double_blocks] + [b.txt_mod.lin for b in model.double_blocks]
    modulations += [b.modulation.lin for b in model.single_blocks]
    for layer in [*modulations, model.final_layer.adaLN_modulation[1], model.final_layer.linear]:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    return model


def train_transformer(pool: dict, text: TextConditioner, seed: int, steps: int, batch: int, log) -> Flux:
    """The MMDiT and both text encoders together: the encoders learn which colour word names the shape and which
    the background (frozen random encoders left both roles alike, and the model could not tell them apart)."""
    torch.manual_seed(seed)
    model = zero_init_outputs(Flux(CONFIGS["tiny"]))
    trained = [*model.parameters(), *text.clip.parameters(), *text.t5.parameters()]
    for module in (text.clip, text.t5):
        module.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(trained, lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    generator = torch.Generator().manual_seed(seed)
    size = shapes.IMAGE_SIZE
    img_ids, txt_ids = make_img_ids(batch, size, size), torch.zeros(batch, TEXT_TOKENS, 3)
    for step in range(steps):
        pick = torch.randint(len(pool["img"]), (batch,), generator=generator)
        x0, caption = pool["img"][pick], pool["caption_index"][pick]  # [B, 16, 64] clean latent tokens
        txt, y = text.t5(pool["t5_ids"][caption]), text.clip(pool["clip_ids"][caption])  # [B, 16, 64], [B, 32]
        noise = torch.randn(x0.shape, generator=generator)
        # uniform t, not SD3's logit-normal: the 4-step sampler spends a quarter of its steps at each level
        t = torch.rand(batch, generator=generator)
        x_t = (1 - t[:, None, None]) * x0 + t[:, None, None] * noise
        velocity = model(x_t, img_ids, txt, txt_ids, t, y)
        loss = F.mse_loss(velocity, noise - x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"transformer step {step}: loss {loss.item():.4f}")
    for module in (text.clip, text.t5):
        module.eval().requires_grad_(False)
    return model.eval().requires_grad_(False)


def write_model_index(out: Path) -> None:
    """Marks `out` as a pipeline folder; the transformer and VAE are the BFL files beside it."""
    index = {"_class_name": "FluxPipeline", "text_encoder": ["transformers", "CLIPTextModel"],
             "text_encoder_2": ["transformers", "T5EncoderModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "tokenizer_2": ["transformers", "T5TokenizerFast"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_text_encoders(out: Path, text: TextConditioner) -> None:
    """transformers folders: config.json in transformers' field names (ours are the same) + model.safetensors."""
    clip_config = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                   **dataclasses.asdict(text.clip.params)}
    t5_config = {"architectures": ["T5EncoderModel"], "model_type": "t5", "feed_forward_proj": "gated-gelu",
                 "is_encoder_decoder": False, "tie_word_embeddings": False, **dataclasses.asdict(text.t5.params)}
    for folder, config, module in (("text_encoder", clip_config, text.clip), ("text_encoder_2", t5_config, text.t5)):
        (out / folder).mkdir(exist_ok=True)
        (out / folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(module.state_dict(), out / folder / "model.safetensors", metadata=SAFETENSORS_METADATA)


def write_autoencoder(out: Path, ae: AutoEncoder) -> None:
    """ae.safetensors; config.json beside it holds what its shapes cannot say (read by the VAE loader,
    which takes the AutoEncoderParams fields, and by the transformer loader, which takes FluxParams')."""
    save_file(ae.state_dict(), out / "ae.safetensors", metadata=SAFETENSORS_METADATA)
    fields = ("norm_groups", "scale_factor", "shift_factor", "resolution")
    config = {"axes_dim": list(CONFIGS["tiny"].axes_dim), **{f: getattr(ae.params, f) for f in fields}}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default="flux_parallel/flux/assets/tiny", help="the checkpoint folder to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vae-steps", type=int, default=2400)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--transformer-steps", type=int, default=8000)
    p.add_argument("--transformer-batch", type=int, default=64)
    p.add_argument("--pool", type=int, default=16384, help="training scenes encoded once for the transformer")
    p.add_argument("--threads", type=int, default=2, help="torch threads (the numbers depend on it a little)")
    p.add_argument("--reuse-vae", action="store_true", help="keep the ae.safetensors already in --output")
    args = p.parse_args(argv)
    for name in ("vae_steps", "vae_batch", "transformer_steps", "transformer_batch", "pool", "threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out, start = Path(args.output), time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", flush=True)

    write_model_index(out)
    write_tokenizers(out)
    text = text_conditioner(out, args.seed)
    if args.reuse_vae:
        from flux_parallel.vae import load_autoencoder

        ae = load_autoencoder(out, dtype=torch.float32)
    else:
        ae = normalise_latents(train_autoencoder(args.seed + 2, args.vae_steps, args.vae_batch, log), args.seed + 3,
                               min(1024, args.pool))
        write_autoencoder(out, ae)
    log(f"autoencoder ready: shift {ae.params.shift_factor}, scale {ae.params.scale_factor}")
    pool = encode_pool(ae, text, args.seed + 4, args.pool)
    log(f"encoded {len(pool['img'])} training scenes ({len(pool['t5_ids'])} captions)")
    model = train_transformer(pool, text, args.seed + 5, args.transformer_steps, args.transformer_batch, log)
    write_text_encoders(out, text)
    for old in out.glob("flux1-*.safetensors"):
        old.unlink()
    save_file(model.state_dict(), out / "flux1-tiny.safetensors", metadata=SAFETENSORS_METADATA)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    log(f"wrote {out} ({total / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
