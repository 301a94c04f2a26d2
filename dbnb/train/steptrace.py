"""One training step run on fake tensors (torch's FakeTensorMode: shapes and dtypes, no memory,
no weights), counting the bytes alive after every operation: what the planner
(dbnb.train.planner) reads the step's activations and gradients from.

The step is the loop's own (dbnb.train.loop.optimizer_step, dbnb.train.loss): the family's
parts built from their config files as its `load` sets them up (frozen and cast, adapters,
gradient checkpointing), the pictures encoded by the autoencoder unless the latents are cached,
the prompts encoded (with gradients when the text encoder learns), the denoiser under the run's
autocast, the MSE in fp32, backward. What a fake tensor cannot run — bitsandbytes' 8-bit
kernels, the optimizer's state, the EMA's copy — the planner adds from the parameter counts
this trace reports. On a CPU-only box the fake tensors are CPU tensors under CPU autocast, whose
casting rules match CUDA's for the ops the UNet uses (linear, conv, matmul, baddbmm, SDPA).
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from dbnb.core.precision import mixed_dtype
from dbnb.data.batches import cache_chunk


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive, and their peak, counted at every operation's output.
    A storage is counted once however many views share it, and uncounted when Python frees it."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def hold(self, tensors) -> None:
        """Count `tensors` made before the mode (a model's weights) as live, so the views ops take
        of them are not counted as new bytes."""
        for t in tensors:
            self._count(t.untyped_storage())

    def reset_peak(self) -> int:
        self.peak = self.live
        return self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._count(t.untyped_storage())
        return out

    def _count(self, storage) -> None:
        key = id(storage)
        if key in self._seen:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size


@dataclass(frozen=True)
class StepTrace:
    """What one step of a run keeps on its device, in bytes; numels are per tensor."""
    weights: int            # the parts as set up to train (the autoencoder's aside)
    autoencoder: int        # the autoencoder's weights: on the device unless the latents are cached
    parameters: int         # numel of every part's weights, the autoencoder's too
    trained: tuple          # numel of each trained tensor (fp32 master weights): optimizer state and EMA follow them
    gradients: int          # the gradients once backward is done
    encode_peak: int        # above the weights, while the autoencoder encodes (a step's pictures, or a cache chunk)
    forward_peak: int       # above the weights (and the autoencoder's), at the forward's highest point
    backward_peak: int      # the same in backward: recomputed activations, gradients so far
    encoder: int = 0        # the encoder's weights, within `weights` (off the device with cached text
                            # embeddings); 0 in traces kept before it was counted: the planner then keeps them on

    @property
    def trained_bytes(self) -> int:
        return 4 * sum(self.trained)


def batch_rows(config) -> int:
    """The rows the denoiser sees at once: prior preservation stacks the class rows under the instance ones."""
    return config.train_batch_size * (2 if config.with_prior_preservation else 1)


def trace_step(config, build) -> StepTrace:
    """Run one step of `config` on fake tensors. `build(config, weight_dtype)` makes the family's
    parts on the meta device (dbnb.family.sd1.memory.empty_parts for SD 1.x)."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # lazy: only the planner fakes tensors

    from dbnb.family.base import family_of

    family = family_of(config)
    weight_dtype = mixed_dtype(config.mixed_precision)
    live = LiveBytes()
    parts = build(config, weight_dtype)  # on the meta device: there, casts and adapters change tensors in place
    with FakeTensorMode(allow_non_fake_inputs=True), live:  # the meta parts become fake ones
        for part in (parts.denoiser, parts.encoder, parts.autoencoder):
            part.to_empty(device="cpu")
        autoencoder = _bytes(parts.autoencoder)
        encoder = _bytes(parts.encoder)
        weights = _bytes(parts.denoiser) + encoder
        parameters = sum(p.numel() for m in (parts.denoiser, parts.encoder, parts.autoencoder) for p in m.parameters())
        trained = tuple(p.numel() for m in (parts.denoiser, parts.encoder) for p in m.parameters() if p.requires_grad)
        rows, side = batch_rows(config), config.resolution // parts.latent_factor
        start = live.reset_peak()
        # The autoencoder encodes the batch's pictures at each step, or once beforehand in chunks
        # (the latent cache): either way before the denoiser runs, so its peak is a phase of its own.
        encoded = cache_chunk(config.resolution, config.resolution) if config.cache_latents else rows
        pictures = torch.randn(encoded, 3, config.resolution, config.resolution)
        latents = family.encode_images(parts.autoencoder, pictures).sample()
        del pictures
        encode_peak = live.peak - start
        if config.cache_latents:
            latents = torch.randn(rows, parts.latent_channels, side, side)
        start = live.reset_peak()
        inputs = {k: torch.zeros((rows, *shape), dtype=torch.long) for k, shape in parts.token_inputs.items()}
        mixed = torch.autocast("cpu", dtype=weight_dtype) if weight_dtype != torch.float32 else contextlib.nullcontext()
        learns_text = config.trains_text_encoder
        parts.denoiser.train()
        parts.encoder.train(learns_text)
        with torch.set_grad_enabled(learns_text), (mixed if learns_text else contextlib.nullcontext()):
            conditioning = family.encode_prompts(parts.encoder, inputs)
        noisy, timesteps = torch.randn_like(latents), torch.zeros(rows, dtype=torch.long)
        with mixed:
            pred = family.predict(parts.denoiser, noisy, timesteps, conditioning).float()
        loss = torch.nn.functional.mse_loss(pred, latents.float())
        forward_peak = live.peak - start
        live.reset_peak()
        loss.backward()
        backward_peak = live.peak - start
        gradients = sum(p.grad.untyped_storage().nbytes() for m in (parts.denoiser, parts.encoder)
                        for p in m.parameters() if p.grad is not None)
    return StepTrace(weights=weights, autoencoder=autoencoder, parameters=parameters, trained=trained, gradients=gradients,
                     encode_peak=encode_peak, forward_peak=forward_peak, backward_peak=backward_peak, encoder=encoder)


def _bytes(module: torch.nn.Module) -> int:
    return sum(t.untyped_storage().nbytes() for t in (*module.parameters(), *module.buffers()))
