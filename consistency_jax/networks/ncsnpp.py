"""NCSN++ and DDPM++ (Song et al. 2021, "Score-Based Generative Modeling through SDEs", App. H).

The CIFAR-10 consistency models use NCSN++ (CM §5 and App. C; jcm ``configs/cifar10_ve_cd.py``):
a UNet with BigGAN-style residual blocks, anti-aliased FIR
resampling, skip connections rescaled by 1/√2, a "residual" progressive input path, random Fourier
embeddings of the noise level c_noise = 0.25·ln t, and zero-initialised output convolutions.
DDPM++ is the same module with sinusoidal embeddings, naive resampling and no input pyramid
(jcm ``configs/cifar10_k_vp.py``).

Layout for the CIFAR-10 defaults (32×32 input, nf = 128, ch_mult = (2, 2, 2)):

    conv3×3 -> [4 ResBlocks (+attention at 16×16) -> down-ResBlock] × 3 levels (32, 16, 8)
            -> ResBlock, attention, ResBlock
            -> [5 ResBlocks on concatenated skips (+attention) -> up-ResBlock] × 3 levels
            -> GroupNorm, swish, conv3×3 (zero init)

With ``progressive_input = "residual"`` the input image is also downsampled alongside (a fused FIR
convolution per level) and added to the down path (score_sde App. H.1, item 5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from consistency_jax.networks.layers import (
    AttnBlock,
    FIRConv2d,
    GaussianFourierProjection,
    ResBlock,
    check_image,
    check_labels,
    check_noise_levels,
    conv2d,
    dense,
    downsample_2d,
    group_norm,
    naive_downsample_2d,
    sinusoidal_embedding,
)
from consistency_jax.networks.second_time import add_second_time

Array = jax.Array
Dtype = Any

__all__ = ["NCSNpp", "DDPMpp"]

_EMBEDDINGS = ("fourier", "positional")
_PROGRESSIVE_INPUTS = ("none", "input_skip", "residual")
_COMBINES = ("sum", "cat")
_INV_SQRT2 = 1.0 / math.sqrt(2.0)  # a weakly typed Python float keeps bfloat16 activations


class NCSNpp(nn.Module):
    """NCSN++ denoiser F_θ(x, c_noise[, y]) (score_sde / jcm ``models/ncsnpp.py``).

    Defaults are the CIFAR-10 configuration of the Consistency Models paper (jcm
    ``cifar10_ve_cd.py`` / ``cifar10_ve_ct_adaptive.py``): about 56 M parameters.

    Called as ``module.apply({"params": p}, x, c_noise, y=None, train=False,
    rngs={"dropout": key})`` with x (B, H, W, C) square images, c_noise (B,) noise levels (jcm feeds
    0.25·ln t) and optional integer labels y (B,); returns float32 (B, H, W, C).

    Attributes:
      nf: base channel count.
      ch_mult: channel multiplier per resolution level.
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attn_resolutions: resolutions (pixels) with self-attention.
      dropout: dropout rate inside residual blocks (0 for the CM CIFAR-10 students, 0.13 for the
        EDM teacher of jcm, 0.3 in iCT).
      fir: FIR anti-aliased resampling (else nearest / 2×2 mean).
      fir_kernel: the FIR kernel.
      skip_rescale: rescale residual sums by 1/√2.
      progressive_input: "none", "input_skip" or "residual" input pyramid.
      progressive_combine: how "input_skip" combines ("sum" or "cat").
      embedding_type: "fourier" (random Fourier features) or "positional" (sinusoidal).
      fourier_scale: standard deviation of the Fourier frequencies.
      init_scale: initialisation scale of the last convolution of every block and of the output
        (0 = zero init).
      num_classes: if set, the network is class-conditional: a learned label embedding is added to
        the noise-level embedding, and labels y are required.
      dtype: compute dtype (e.g. ``jnp.bfloat16``); the embedding and the output head run in float32.
      param_dtype: parameter dtype.
    """

    nf: int = 128
    ch_mult: Sequence[int] = (2, 2, 2)
    num_res_blocks: int = 4
    attn_resolutions: Sequence[int] = (16,)
    dropout: float = 0.0
    fir: bool = True
    fir_kernel: Sequence[int] = (1, 3, 3, 1)
    skip_rescale: bool = True
    progressive_input: str = "residual"
    progressive_combine: str = "sum"
    embedding_type: str = "fourier"
    second_time: bool = (
        False  # a second time input c_noise_2 (MeanFlow's t − r; networks.second_time)
    )
    fourier_scale: float = 16.0
    init_scale: float = 0.0
    num_classes: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _check_config(self) -> None:
        if self.embedding_type not in _EMBEDDINGS:
            raise ValueError(
                f"embedding_type must be one of {_EMBEDDINGS}; got {self.embedding_type!r}."
            )
        if self.progressive_input not in _PROGRESSIVE_INPUTS:
            raise ValueError(
                f"progressive_input must be one of {_PROGRESSIVE_INPUTS}; "
                f"got {self.progressive_input!r}."
            )
        if self.progressive_combine not in _COMBINES:
            raise ValueError(
                f"progressive_combine must be one of {_COMBINES}; got {self.progressive_combine!r}."
            )
        if not self.ch_mult or self.num_res_blocks < 1 or self.nf < 1:
            raise ValueError("NCSN++ needs nf >= 1, num_res_blocks >= 1 and a non-empty ch_mult.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}.")

    def _embed(self, c_noise: Array) -> Array:
        """Noise-level embedding -> two dense layers (score_sde ``conditional=True``)."""
        if self.embedding_type == "fourier":
            temb = GaussianFourierProjection(embedding_size=self.nf, scale=self.fourier_scale)(
                c_noise
            )
        else:
            temb = sinusoidal_embedding(c_noise, self.nf, endpoint=True, sin_first=True)
        temb = dense(temb, 4 * self.nf, param_dtype=self.param_dtype)
        return dense(nn.swish(temb), 4 * self.nf, param_dtype=self.param_dtype)

    @nn.compact
    def __call__(
        self,
        x: Array,
        c_noise: Array,
        y: Array | None = None,
        train: bool = False,
        c_noise_2: Array | None = None,
    ) -> Array:
        """Evaluates F_θ.

        Args:
          x: (B, H, W, C) network input c_in(t)·x_t; H = W divisible by 2**(len(ch_mult) − 1).
          c_noise: (B,) noise-level conditioning (or a scalar).
          y: (B,) integer class labels, required iff ``num_classes`` is set.
          train: enables dropout (needs ``rngs={"dropout": key}``).
          c_noise_2: (B,) the second time input, required iff ``second_time``.

        Returns:
          float32 array of x's shape.

        Raises:
          ValueError: bad configuration, image size, attention resolution or labels.
        """
        name = type(self).__name__
        self._check_config()
        check_image(x, len(self.ch_mult), self.attn_resolutions, name)
        batch, image_size, _, channels = x.shape
        c_noise = check_noise_levels(c_noise, batch)
        check_labels(y, self.num_classes, batch, name)

        temb = self._embed(c_noise)
        temb = add_second_time(
            temb,
            c_noise_2,
            self.second_time,
            name,
            self.is_initializing(),
            dim=self.nf if self.embedding_type == "positional" else 2 * self.nf,
            kind="sinusoidal" if self.embedding_type == "positional" else "fourier",
            fourier_scale=self.fourier_scale,
            endpoint=True,
            sin_first=True,
        )
        if self.num_classes is not None:
            temb = temb + nn.Embed(
                self.num_classes,
                4 * self.nf,
                param_dtype=self.param_dtype,
                embedding_init=nn.initializers.normal(1.0),
            )(y)

        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        fir_kernel = tuple(self.fir_kernel) if self.fir else None
        block_kw = dict(
            fir_kernel=fir_kernel,
            dropout=self.dropout,
            skip_rescale=self.skip_rescale,
            out_init_scale=self.init_scale,
            init_style="ddpm",
            norm_eps=1e-6,
            **common,
        )

        def res_block(h, out_ch=None, up=False, down=False):
            return ResBlock(out_ch=out_ch, up=up, down=down, **block_kw)(h, temb, train)

        def attention(h):
            return AttnBlock(
                num_heads=1,
                skip_rescale=self.skip_rescale,
                init_style="ddpm",
                qkv_init_scale=0.1,
                out_init_scale=self.init_scale,
                norm_eps=1e-6,
                **common,
            )(h)

        x = x.astype(self.dtype)
        input_pyramid = x
        hs = [conv2d(x, self.nf, 3, **common)]
        resolution = image_size
        # Down path.
        for level, mult in enumerate(self.ch_mult):
            for _ in range(self.num_res_blocks):
                h = res_block(hs[-1], out_ch=self.nf * mult)
                if resolution in self.attn_resolutions:
                    h = attention(h)
                hs.append(h)
            if level == len(self.ch_mult) - 1:
                continue
            h = res_block(hs[-1], down=True)
            resolution //= 2
            if self.progressive_input == "input_skip":
                input_pyramid = self._pyramid_down(input_pyramid, None)
                skip = conv2d(input_pyramid, h.shape[-1], 1, **common)
                h = (
                    skip + h
                    if self.progressive_combine == "sum"
                    else jnp.concatenate([skip, h], -1)
                )
            elif self.progressive_input == "residual":
                input_pyramid = self._pyramid_down(input_pyramid, h.shape[-1])
                input_pyramid = input_pyramid + h
                if self.skip_rescale:
                    input_pyramid = input_pyramid * _INV_SQRT2
                h = input_pyramid
            hs.append(h)

        # Bottleneck.
        h = res_block(hs[-1])
        h = attention(h)
        h = res_block(h)

        # Up path (attention once per level, after the residual blocks, as in score_sde).
        for level in reversed(range(len(self.ch_mult))):
            for _ in range(self.num_res_blocks + 1):
                h = res_block(
                    jnp.concatenate([h, hs.pop()], axis=-1), out_ch=self.nf * self.ch_mult[level]
                )
            if resolution in self.attn_resolutions:
                h = attention(h)
            if level != 0:
                h = res_block(h, up=True)
                resolution *= 2
        assert not hs, "every skip connection must be consumed"

        # Output head in float32.
        h = h.astype(jnp.float32)
        h = nn.swish(group_norm(h, epsilon=1e-6, param_dtype=self.param_dtype))
        h = conv2d(h, channels, 3, init_scale=self.init_scale, param_dtype=self.param_dtype)
        return h.astype(jnp.float32)

    def _pyramid_down(self, pyramid: Array, out_ch: int | None) -> Array:
        """Downsamples the input pyramid ×2; with a (FIR) 3×3 convolution to ``out_ch`` if given.

        As in score_sde, the "residual" pyramid always uses a convolution and "input_skip" never
        does (score_sde's ``resamp_with_conv`` only affects DDPM-type blocks, unused here).
        """
        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if out_ch is None:
            return (
                downsample_2d(pyramid, self.fir_kernel)
                if self.fir
                else naive_downsample_2d(pyramid)
            )
        if self.fir:
            return FIRConv2d(out_ch, 3, down=True, fir_kernel=tuple(self.fir_kernel), **common)(
                pyramid
            )
        return conv2d(pyramid, out_ch, 3, stride=2, **common)


class DDPMpp(NCSNpp):
    """DDPM++ (score_sde App. H.2): NCSN++ with sinusoidal embeddings, no FIR, no input pyramid.

    Defaults follow jcm ``configs/cifar10_k_vp.py`` (nf 128, ch_mult (2, 2, 2), 4 residual blocks,
    attention at 16, BigGAN blocks, skip rescaling, zero init). score_sde's own CIFAR-10 DDPM++ uses
    ``ch_mult=(1, 2, 2, 2)``; pass it explicitly to get that network.
    """

    fir: bool = False
    progressive_input: str = "none"
    embedding_type: str = "positional"
