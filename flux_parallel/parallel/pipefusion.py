"""PipeFusion (Fang et al. 2024, arXiv:2405.14430): the transformer's blocks in stages on the ranks of
the pipefusion axis, the image in row-band patches that flow through the stages as a pipeline, and
attention that reads the other patches' image keys and values from the previous step.

Schedule. A *message* is one patch of one step passing through every stage. Steps before
`warmup_steps` are one message holding the whole image (synchronous); later steps are
`num_pipeline_patch` messages, row bands of the latent image (uneven when the count does not divide
the rows: `shard_sizes`). Stage s runs message i in slot `slot(i) + s`: stage 0 starts a message one
slot after the previous one, but never before the last stage has sent back the latents it needs
(the previous step's overlapping patches, `make_schedule`). With at least as many patches as stages
the first stage is never idle after warm-up; the last stage applies the Euler update to each patch
as it comes and sends the new latents of that patch to stage 0.

No deadlock, whatever the stages, patches and message sizes. Every rank derives the same schedule, so
each rank knows every operation its peers post in each slot, and the operations are posted as batches
(comm.P2P) whose counterparts are in the peers' batches of the SAME slot. (xDiT posts isend/irecv one by
one; a large send queued before a receive on the same peer hangs both ranks, xDiT#310.) Two orderings,
switched by OVERLAP (one place; the default says which was never slower, docs/pipefusion.md):

- OVERLAP False: after slot t's compute each rank posts ONE batch holding everything it sends and
  receives in slot t, and waits for it: the slot's transfers are not overlapped with compute.
- OVERLAP True: in slot t stage s posts two batches, R(t) before its compute (the receive of what stage
  s-1 runs in slot t, its input of slot t+1, with the step's decision byte when it is the step's first
  message) and S(t) after it (its output and decision to s+1; from the last stage, the patch's new
  latents to stage 0; on stage 0 also the receive of those latents). A receive posted ahead lets the
  data move while the receiver still computes (gloo, like NCCL, moves data only once both sides have
  posted). A rank waits for a batch only when its data is needed: R(t) before the compute of slot t+1,
  stage 0's S(t) before it embeds a patch overlapping the latents it brings, a sends-only S(t) after
  the compute of slot t+1 (the receiver posted its side a slot ahead, so this wait is free; it bounds
  what the sends hold), everything at the end. Hang-free, even where a rank's batches run one after
  another in posting order (an NCCL stream): each rank posts R(0), S(0), R(1), S(1), ...; by induction on
  the slot, once every batch of slot t-1 is done, stage 0's S(t) is posted (stage 0 receives nothing
  ahead and waits only on earlier slots' latents), which completes stage 1's R(t), so stage 1 computes
  and posts S(t), which completes stage 2's R(t), and so on to the last stage, whose S(t) completes
  stage 0's S(t). Receives are posted ahead only along the chain 0 -> 1 -> ... -> N-1, never on the way
  back to stage 0: two ranks posting receives from each other ahead of their sends would each wait,
  stream-ordered, for the other's send queued behind its own receive.

Text stream. The text hidden states and the conditioning vector travel with the first patch of
each step (as in xDiT). The first patch's pass is the text stream's pass: every block keeps the
text input it saw then, and runs each later patch of the step on [that text; the patch], so text
keys and values are recomputed for every patch from this step's text, never stale, and the text
output of later patches is dropped. Because the text a block sees does not depend on where the
stage boundaries are, the result with stale activations is the same for every number of stages.

Stale keys and values (`StaleKV`, installed on each block's attention seam for the call): a
per-block buffer of the image K/V of the whole image. A patch writes its fresh rows, then attends
to [its fresh text K/V; the buffer]: patches already run this step are fresh, the later ones are
from the previous step. Before the buffer has seen the whole image once (warmup_steps 0), a patch
attends to the image tokens written so far. With sp ranks inside a stage, each holds a shard of the
text and of every patch, and the fresh K/V shards are all-gathered into every rank's whole buffer.
With warmup_steps >= the number of steps every step is one whole-image message: the buffer holds only
fresh values, and the result is exactly the single-device one.

Step cache (flux/cache.py, StepCache's PipeFusion part): the first compute_first blocks must lie on the
first stage and the last compute_last on the last (ParallelDenoiser.check). The first stage decides each
step from the step's first message and sends the decision (one byte per branch) with that message's
hidden states; every stage runs or forecasts its own blocks of the cached range on each message of the
step. What the cached image equals: threshold 0 is the uncached PipeFusion image bit for bit; with every
step one whole-image message (warmup_steps >= steps) it is the single-device cached image with the same
skipped steps (up to fp32 rounding of the stages' summed forecasts); after warm-up the decision watches
the first row band only (its sums against that band's at the last computed step) and a skipped step's
middle blocks leave their stale K/V as they were, an approximation on top of PipeFusion's own, whose
error tools/bench/pipefusion_error.py does not yet report for caches.
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flux_parallel.kernels import attention
from flux_parallel.parallel import comm, stages
from flux_parallel.parallel.cache import cache_report
from flux_parallel.parallel.context import ParallelContext
from flux_parallel.parallel.sequence import shard_sizes
from flux_parallel.parallel.swap import swapped

# Whether each slot's transfers overlap the compute that does not depend on them (module docstring); False:
# one batch per slot, waited for at once. Both orders give the same numbers, bit for bit. On by default: on
# 2 quiet CPU ranks it took 0.978-0.984 of the one-batch time (M = 2, 4, compute split), never slower
# (docs/pipefusion.md, "Overlap"; tools/bench/bench_pipefusion_overlap.py).
OVERLAP = True


@dataclass(frozen=True)
class Message:
    step: int
    patch: int  # index within its step: 0 carries the text stream
    start: int  # image tokens [start, end)
    end: int
    slot: int  # stage s runs it in slot + s


def patch_bounds(rows: int, width: int, patches: int) -> list[tuple[int, int]]:
    """Token ranges of `patches` row bands of a rows x width token grid (row-major), first bands larger."""
    if patches > rows:
        raise ValueError(f"num_pipeline_patch {patches} is more than the {rows} rows of image tokens "
                         "(height / 16): every patch needs a row")
    bounds, start = [], 0
    for band in shard_sizes(rows, patches):
        bounds.append((start, start + band * width))
        start += band * width
    return bounds


def make_schedule(num_steps: int, warmup_steps: int, patches: list[tuple[int, int]], img_len: int,
                  num_stages: int) -> list[Message]:
    """Every message of a call in the order stage 0 runs them, with its slot."""
    messages, previous = [], []
    for step in range(num_steps):
        current = []
        for patch, (start, end) in enumerate([(0, img_len)] if step < warmup_steps else patches):
            slot = messages[-1].slot + 1 if messages else 0
            # its latents: the last stage's update of the previous step's overlapping patches, made in
            # slot m.slot + num_stages - 1 and received by stage 0 at the end of that slot
            for m in previous:
                if m.start < end and start < m.end:
                    slot = max(slot, m.slot + num_stages)
            messages.append(Message(step, patch, start, end, slot))
            current.append(messages[-1])
        previous = current
    return messages


class StaleKV:
    """A block's attention_fn under PipeFusion: fresh text K/V, the image K/V buffer for the rest.

    With an sp group inside the stage, each sp rank holds a shard of the text and of the patch; the
    fresh K/V shards are all-gathered over the group, so every sp rank keeps the whole buffer and
    attends its own queries to every key, in the single-device key order (xDiT replicates the fresh
    K/V over the sp group likewise)."""

    def __init__(self, img_len: int, group=None, rank: int = 0):
        self.img_len, self.group, self.rank = img_len, group, rank  # the sp group and this rank's index in it
        self.keys = self.values = None  # [B, H, L, D]: the image K/V of each patch's latest pass
        self.filled = 0  # image tokens [0, filled) have been written
        self.txt_sizes, self.patch_sizes, self.start, self.end = [0], [0], 0, 0

    def set_patch(self, txt_sizes: list[int], patch_sizes: list[int], start: int, end: int) -> None:
        """Text and patch tokens per sp rank (one entry without sp); the patch is image tokens [start, end)."""
        self.txt_sizes, self.patch_sizes, self.start, self.end = txt_sizes, patch_sizes, start, end

    def __call__(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q, k, v [B, H, S_r + P_r, D] of this rank's [txt; patch] -> attention over [txt; whole image]."""
        text = self.txt_sizes[self.rank]
        kv = torch.stack((k, v))  # [2, B, H, S_r + P_r, D]
        kv_txt, kv_img = kv[:, :, :, :text], kv[:, :, :, text:]
        if self.group is not None:
            kv_txt = comm.all_gather(kv_txt.contiguous(), self.group, dim=3, sizes=self.txt_sizes)
            kv_img = comm.all_gather(kv_img.contiguous(), self.group, dim=3, sizes=self.patch_sizes)
        if self.keys is None:
            shape = (*k.shape[:2], self.img_len, k.shape[3])
            self.keys, self.values = k.new_empty(shape), v.new_empty(shape)
        self.keys[:, :, self.start : self.end] = kv_img[0]
        self.values[:, :, self.start : self.end] = kv_img[1]
        self.filled = max(self.filled, self.end)
        keys = torch.cat((kv_txt[0], self.keys[:, :, : self.filled]), dim=2)
        values = torch.cat((kv_txt[1], self.values[:, :, : self.filled]), dim=2)
        return attention(q, keys, values)


class PipeFusionGeneration:
    """One call's denoising on one stage; the same interface as runtime.Generation (denoise)."""

    def __init__(self, model: nn.Module, ctx: ParallelContext, blocks: range, img: Tensor, img_ids: Tensor,
                 cond, branches: int, guidance: float | None, true_cfg_scale: float | None,
                 channels: Tensor | None = None, out_len: int | None = None, cache=None):
        """img [B, L, 64], img_ids [B, L, 3] full on every rank; cond: the branches' conditioning
        stacked along the batch ([negative; positive] when both are on this rank). Image conditioning
        (runtime.ImageCond): `channels` [B, L, C] join each patch's tokens at the first stage (Fill,
        Canny/Depth); tokens from `out_len` on (Kontext's reference) are one more patch of every step,
        after the output's row bands, whose latents the last stage leaves unchanged. cache: this stage's
        flux.cache.StepCache, or None (see the module docstring)."""
        self.model, self.ctx, self.blocks, self.scale = model, ctx, blocks, true_cfg_scale
        self.stage, self.num_stages, self.branches = ctx.rank("pipefusion"), ctx.pipefusion_degree, branches
        self.sp_rank, self.sp_group = ctx.rank("sp"), ctx.group("sp") if ctx.sp_degree > 1 else None
        self.img = img.float().clone()  # full latents, kept current on the first and the last stage
        self.img_ids = img_ids.repeat(branches, 1, 1)
        # sp inside a stage: this rank's contiguous shard of the text (and, per message, of the patch)
        self.txt_sizes = shard_sizes(cond.txt.shape[1], ctx.sp_degree)
        text = slice(sum(self.txt_sizes[: self.sp_rank]), sum(self.txt_sizes[: self.sp_rank + 1]))
        self.txt, self.txt_ids, self.y = cond.txt[:, text], cond.txt_ids[:, text], cond.y
        rows = self.txt.shape[0]
        self.guidance = None if guidance is None else torch.full((rows,), guidance, device=img.device)
        self.channels, self.out_len = channels, img.shape[1] if out_len is None else out_len
        # the output's row-major position ids: its last token is in its last row
        grid_rows = int(img_ids[0, self.out_len - 1, 1].item()) + 1
        self.patches = patch_bounds(grid_rows, self.out_len // grid_rows, ctx.patches)
        if self.out_len < img.shape[1]:  # the reference: one patch of its own, attended by every other
            self.patches.append((self.out_len, img.shape[1]))
        self.blend = None  # blend(step, img_rows, rows): inpainting's kept region, set by the caller
        self.kv = [StaleKV(img.shape[1], self.sp_group, self.sp_rank) for _ in blocks]
        self.swaps = [(b, "attention_fn", kv) for b, kv in zip(stages.stage_blocks(model, blocks), self.kv)]
        self.txt_h = self.vec = None  # this step's text input and conditioning vector at this stage
        self.block_txt = [None] * len(blocks)  # each block's text input in this step's first patch
        self.cache, self.cache_report = cache, None
        self.compute = self.compute_inbox = None  # the step's decision per branch; the one arriving with a message

    def denoise(self, timesteps: list[float], on_step=None) -> Tensor:
        """Run every step; returns the final latents [B, L, 64] on every rank of the pipefusion group."""
        schedule = make_schedule(len(timesteps) - 1, self.ctx.warmup_steps, self.patches, self.img.shape[1],
                                 self.num_stages)
        by_slot = {m.slot: m for m in schedule}  # what stage 0 runs in each slot
        ends_step = {max((m for m in schedule if m.step == s), key=lambda m: m.slot) for s in range(len(timesteps) - 1)}
        if self.num_stages > 1:
            # every stage starts from the same noise anyway; this collective makes the group's first
            # NCCL call one that all its ranks join, as batch_isend_irecv requires (torch.distributed docs)
            comm.broadcast(self.img, self.ctx.group("pipefusion"), src=0)
        slots = range(schedule[-1].slot + self.num_stages)
        if self.num_stages > 1 and OVERLAP:
            self._pipeline_overlapped(slots, by_slot, ends_step, timesteps, on_step)
        else:
            inbox = None
            for slot in slots:
                message = by_slot.get(slot - self.stage)
                out = self._run(message, inbox, timesteps) if message is not None else None
                if self.num_stages > 1:
                    inbox = self._exchange(slot, by_slot, message, out, len(timesteps) - 2)
                if message in ends_step and on_step is not None:
                    on_step(message.step)
        if self.num_stages > 1:
            comm.broadcast(self.img, self.ctx.group("pipefusion"), src=self.num_stages - 1)
        self.cache_report = cache_report(self.cache, self.ctx)
        return self.img

    def _pipeline_overlapped(self, slots: range, by_slot: dict, ends_step: set, timesteps: list[float],
                             on_step) -> None:
        """The slots with each transfer in flight while this rank computes what does not depend on it (see the
        module docstring): the input's receive is posted a slot ahead, a batch is waited for when its data is
        needed (sends-only batches one slot later, to bound what they hold)."""
        group, final_step = self.ctx.group("pipefusion"), len(timesteps) - 2
        incoming, sent, returning = None, None, []  # the input's batch; the last sends-only batch; latents' batches
        for slot in slots:
            message = by_slot.get(slot - self.stage)
            ahead = comm.P2P(group)  # R(slot): what the previous stage runs now, this stage's next input
            upcoming = self._post_input_receive(ahead, slot, by_slot)
            ahead.commit()
            out = None
            if message is not None:
                inbox = self._complete(incoming) if self.stage > 0 else None
                for arrival in [a for a in returning if a.overlaps(message)]:  # stage 0: this patch's latents
                    self._complete(arrival)
                    returning.remove(arrival)
                out = self._run(message, inbox, timesteps)
            incoming = upcoming
            if sent is not None:
                self._complete(sent)
            after = comm.P2P(group)  # S(slot): what this rank sends after the compute; on stage 0, latents back
            arrival = Arrival(after)
            if message is not None:
                self._post_sends(after, message, out, final_step)
            self._post_latents_receive(arrival, slot, by_slot, final_step)
            after.commit()
            if arrival.latents is not None:
                returning.append(arrival)
            sent = arrival if arrival.latents is None else None
            if message in ends_step and on_step is not None:
                on_step(message.step)
        for arrival in [incoming, sent, *returning]:
            if arrival is not None:
                self._complete(arrival)

    def _shard(self, message: Message) -> tuple[list[int], int, int]:
        """(patch tokens per sp rank, this rank's first and end token): contiguous shards of the patch."""
        sizes = shard_sizes(message.end - message.start, self.ctx.sp_degree)
        first = message.start + sum(sizes[: self.sp_rank])
        return sizes, first, first + sizes[self.sp_rank]

    def _run(self, message: Message, inbox: Tensor | None, timesteps: list[float]) -> Tensor | None:
        """This stage's blocks on one message; the last stage updates the patch's latents instead."""
        model, text = self.model, self.txt.shape[1]
        patch_sizes, start, end = self._shard(message)  # this sp rank's image tokens
        if self.stage == 0:
            if message.patch == 0:
                t = torch.full((self.txt.shape[0],), timesteps[message.step], device=self.img.device)
                self.vec = stages.conditioning(model, t, self.y, self.guidance)
                self.txt_h = stages.embed_text(model, self.txt)
            patch = self.img[:, start:end]
            if self.channels is not None:  # Fill's masked image and mask, or the control image, after the 64
                patch = torch.cat((patch, self.channels[:, start:end]), dim=-1)
            img_h = stages.embed_image(model, patch.repeat(self.branches, 1, 1))
        elif message.patch == 0:  # [txt; vec; img] from the previous stage
            self.txt_h, self.vec, img_h = inbox[:, :text], inbox[:, text], inbox[:, text + 1 :]
        else:
            img_h = inbox
        for kv in self.kv:
            kv.set_patch(self.txt_sizes, patch_sizes, message.start, message.end)
        pe = stages.rope(model, self.txt_ids, self.img_ids[:, start:end])
        with swapped(self.swaps):
            if self.cache is None:
                img_h, txt_h = self._run_blocks(self.blocks, message, img_h, self.txt_h, pe)
            else:
                img_h, txt_h = self._run_cached(message, img_h, self.txt_h, pe, slice(start, end))
        if self.stage < self.num_stages - 1:
            return torch.cat((txt_h, self.vec[:, None], img_h), dim=1) if message.patch == 0 else img_h
        velocity = self._guided(stages.final(model, img_h, self.vec).float())
        if self.sp_group is not None:  # every sp rank of the last stage updates (and sends back) the whole patch
            velocity = comm.all_gather(velocity, self.sp_group, dim=1, sizes=patch_sizes)
        # Kontext: the output on the reference's tokens is discarded, so their latents stay as they are
        velocity[:, max(0, self.out_len - message.start) :] = 0
        step = timesteps[message.step + 1] - timesteps[message.step]
        rows = slice(message.start, message.end)
        self.img[:, rows] += step * velocity
        if self.blend is not None:  # inpainting: the kept region back to the image, noised to the next time
            self.img[:, rows] = self.blend(message.step, self.img[:, rows], rows)
        return None

    def _run_blocks(self, blocks: range, message: Message, img_h: Tensor, txt_h: Tensor, pe) -> tuple[Tensor, Tensor]:
        """This stage's `blocks` on one message: each on [its text input of the step's first patch; the patch]."""
        for block in blocks:
            i = block - self.blocks.start
            if message.patch == 0:
                self.block_txt[i] = txt_h  # the text input of block i in this step's text pass
            img_h, txt_h = stages.run_blocks(self.model, range(block, block + 1), img_h, self.block_txt[i], self.vec,
                                             pe)
        return img_h, txt_h

    def _run_cached(self, message: Message, img_h: Tensor, txt_h: Tensor, pe, rows: slice) -> tuple[Tensor, Tensor]:
        """_run_blocks with a step cache: this stage's blocks before the cached range, the range (run or
        forecast as the step's decision says; the first stage makes it at the step's first message), after it."""
        config, total = self.cache.config, len(self.model.double_blocks) + len(self.model.single_blocks)
        edges = (config.blocks_first, total - config.blocks_last)
        head, middle, tail = (range(max(self.blocks.start, a), min(self.blocks.stop, b))
                              for a, b in ((0, edges[0]), edges, (edges[1], total)))
        first = message.patch == 0
        img_in = img_h
        img_h, txt_h = self._run_blocks(head, message, img_h, txt_h, pe)
        if first and self.stage == 0:
            signal = (self.model.double_blocks[0].modulate_img(img_h, self.vec)[2] if config.kind == "teacache"
                      else img_h - img_in)  # as StepCache.run_blocks watches it
            self.compute = self.cache.decide_message(message.step, signal, rows, self.img.shape[1])
        elif first:
            self.compute = self.compute_inbox
        if first:
            self.cache.record(message.step, self.compute)
        return self._run_blocks(tail, message, *self.cache.run_message(
            lambda img, txt: self._run_middle(middle, message, img, txt, pe), img_h, txt_h, message.step, rows,
            self.img.shape[1], first, self.compute), pe)

    def _run_middle(self, middle: range, message: Message, img_h: Tensor, txt_h: Tensor, pe) -> tuple[Tensor, Tensor]:
        """The cached range's blocks on the whole batch; where some branch skips the step, its rows of their
        stale K/V buffers are put back as they were, as if it had not run (as under cfg_degree 2, where it
        does not): the image does not depend on how the branches are laid out."""
        n, buffers = len(self.compute), [self.kv[block - self.blocks.start] for block in middle]
        skipping = [i for i, c in enumerate(self.compute) if not c]
        kept = [(kv, i, kv.keys.chunk(n)[i].clone(), kv.values.chunk(n)[i].clone())
                for kv in buffers if kv.keys is not None for i in skipping]
        img_h, txt_h = self._run_blocks(middle, message, img_h, txt_h, pe)
        for kv, i, keys, values in kept:
            kv.keys.chunk(n)[i].copy_(keys)
            kv.values.chunk(n)[i].copy_(values)
        return img_h, txt_h

    def local(self, x: Tensor) -> Tensor:
        """A full per-token tensor as this generation holds the state: whole, on every stage."""
        return x

    def _guided(self, pred: Tensor) -> Tensor:
        """The branches' predictions [n B, l, C] -> the guided velocity [B, l, C] (as runtime.Generation)."""
        preds = pred.chunk(self.branches)
        if self.scale is None:
            return preds[0]
        if self.branches == 1:  # cfg_degree 2: the last stages of the two cfg halves exchange predictions
            preds = comm.all_gather(preds[0][None], self.ctx.group("cfg"), dim=0)
        negative, positive = preds[0], preds[1]
        return negative + self.scale * (positive - negative)

    def _post_input_receive(self, p2p, slot: int, by_slot: dict) -> "Arrival":
        """Queue the receive of what the previous stage runs in `slot` (this stage's input in slot + 1), with
        the step's decision when it is the step's first message."""
        arriving = by_slot.get(slot - (self.stage - 1)) if self.stage > 0 else None
        if arriving is None:
            return Arrival(p2p)
        rows = self._shard(arriving)[0][self.sp_rank] + (self.txt.shape[1] + 1 if arriving.patch == 0 else 0)
        shape = (self.txt.shape[0], rows, self.model.params.hidden_size)
        inbox = p2p.recv(shape, self.model.img_in.weight.dtype, self.img.device, src=self.stage - 1)
        decision = None
        if self.cache is not None and arriving.patch == 0:
            decision = p2p.recv((len(self.cache.state),), torch.uint8, self.img.device, src=self.stage - 1)
        return Arrival(p2p, inbox=inbox, decision=decision)

    def _post_sends(self, p2p, message: Message, out: Tensor | None, final_step: int) -> None:
        """Queue what this stage sends after running `message`: its output (and the step's decision with the
        step's first message) to the next stage; from the last stage, the patch's new latents to stage 0."""
        stage, last = self.stage, self.num_stages - 1
        if stage < last:
            p2p.send(out, dst=stage + 1)
            if self.cache is not None and message.patch == 0:  # the step's decision, with its first message
                p2p.send(torch.tensor(self.compute, dtype=torch.uint8, device=out.device), dst=stage + 1)
        elif message.step < final_step:
            p2p.send(self.img[:, message.start : message.end], dst=0)

    def _post_latents_receive(self, arrival: "Arrival", slot: int, by_slot: dict, final_step: int) -> None:
        """On stage 0: queue the receive of the latents the last stage updates in `slot`."""
        returned = by_slot.get(slot - (self.num_stages - 1)) if self.stage == 0 else None
        if returned is not None and returned.step < final_step:
            arrival.rows = slice(returned.start, returned.end)
            arrival.latents = arrival.p2p.recv(self.img[:, arrival.rows].shape, torch.float32, self.img.device,
                                               src=self.num_stages - 1)

    def _complete(self, arrival: "Arrival") -> Tensor | None:
        """Wait for a committed batch and put what it brought in place; returns the input it brought, if any."""
        arrival.p2p.wait()
        if arrival.latents is not None:
            self.img[:, arrival.rows] = arrival.latents
        if arrival.decision is not None:
            self.compute_inbox = [bool(c) for c in arrival.decision.tolist()]
        return arrival.inbox

    def _exchange(self, slot: int, by_slot: dict, message: Message | None, out: Tensor | None,
                  final_step: int) -> Tensor | None:
        """Without overlap, after a slot: one batch of everything this rank sends and receives in it, waited at
        once; returns the next input."""
        p2p = comm.P2P(self.ctx.group("pipefusion"))
        if message is not None:
            self._post_sends(p2p, message, out, final_step)
        arrival = self._post_input_receive(p2p, slot, by_slot)
        self._post_latents_receive(arrival, slot, by_slot, final_step)
        p2p.commit()
        return self._complete(arrival)


@dataclass
class Arrival:
    """A batch of point-to-point operations and the buffers its receives fill: the next input (and the step's
    decision), latents returned to stage 0 for image tokens `rows`."""

    p2p: object  # comm.P2P
    inbox: Tensor | None = None
    decision: Tensor | None = None
    latents: Tensor | None = None
    rows: slice | None = None

    def overlaps(self, message: Message) -> bool:
        return self.rows is not None and self.rows.start < message.end and message.start < self.rows.stop
