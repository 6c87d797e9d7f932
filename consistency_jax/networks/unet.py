"""The ADM UNet (Dhariwal & Nichol 2021; openai/consistency_models ``cm/unet.py``).

The ImageNet 64×64 and LSUN 256×256 consistency models use this network (CM App. C
footnotes 2 and 3). The PyTorch code feeds it c_noise = 1000·0.25·ln(t + 1e-44) through a sinusoidal
timestep embedding; class labels (ImageNet) are embedded and added to the timestep embedding.

Layout (ImageNet-64 values): conv3×3 -> per level [3 ResBlocks (+ multi-head attention at 32, 16, 8)
-> down-ResBlock] -> ResBlock, attention, ResBlock -> per level [4 ResBlocks on concatenated skips
(+ attention), the last followed by an up-ResBlock] -> GroupNorm, SiLU, conv3×3 (zero init).

The paper trains in float16; here mixed precision is ``dtype=jnp.bfloat16`` (parameters stay float32,
normalisation statistics, softmax, embeddings and the output head run in float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from consistency_jax.networks.layers import (
    AttnBlock,
    ResBlock,
    check_image,
    check_labels,
    check_noise_levels,
    conv2d,
    dense,
    group_norm,
    naive_downsample_2d,
    naive_upsample_2d,
    sinusoidal_embedding,
)
from consistency_jax.networks.second_time import add_second_time

Array = jax.Array
Dtype = Any

__all__ = ["ADMUNet", "IMAGENET64_CONFIG", "LSUN256_CONFIG"]

# cm scripts/launch.sh, class-conditional ImageNet 64×64 (CD and CT; EDM teacher uses dropout 0.1).
IMAGENET64_CONFIG: dict[str, Any] = dict(
    model_channels=192,
    channel_mult=(1, 2, 3, 4),  # cm script_util.create_model for image_size 64
    num_res_blocks=3,
    attention_resolutions=(32, 16, 8),
    num_head_channels=64,
    resblock_updown=True,
    use_scale_shift_norm=True,
    num_classes=1000,
    dropout=0.0,
)

# cm scripts/launch.sh, unconditional LSUN 256×256 (bedroom, cat).
LSUN256_CONFIG: dict[str, Any] = dict(
    model_channels=256,
    channel_mult=(1, 1, 2, 2, 4, 4),  # cm script_util.create_model for image_size 256
    num_res_blocks=2,
    attention_resolutions=(32, 16, 8),
    num_head_channels=64,
    resblock_updown=True,
    use_scale_shift_norm=False,
    num_classes=None,
    dropout=0.0,
)

_NORM_EPS = 1e-5  # PyTorch GroupNorm default, as in cm's GroupNorm32.


class ADMUNet(nn.Module):
    """ADM UNet denoiser F_θ(x, c_noise[, y]) (guided-diffusion / cm ``UNetModel``).

    Defaults are the ImageNet-64 configuration of the Consistency Models paper (about 296 M
    parameters, class-conditional with 1000 classes); ``ADMUNet.imagenet64()`` and
    ``ADMUNet.lsun256()`` build the paper networks, with keyword overrides.

    Called as ``module.apply({"params": p}, x, c_noise, y=None, train=False,
    rngs={"dropout": key})``; returns float32 of x's shape.

    Attributes:
      model_channels: base channel count.
      channel_mult: channel multiplier per level (floats allowed, e.g. 0.5).
      num_res_blocks: residual blocks per level on the way down (one more on the way up).
      attention_resolutions: resolutions in pixels with self-attention (cm's CLI form "32,16,8").
      dropout: dropout rate in residual blocks.
      num_classes: number of classes for class conditioning (None: unconditional).
      num_head_channels: channels per attention head; -1 to use ``num_heads`` heads instead.
      num_heads: number of heads when ``num_head_channels == -1``.
      use_scale_shift_norm: FiLM conditioning of the residual blocks.
      normalize_scale_shift: RMS-normalise the FiLM scale and shift (sCM's adaptive double
        normalization, for continuous-time training; no extra parameters).
      resblock_updown: resample with residual blocks (else nearest/avg-pool layers).
      norm_groups: GroupNorm group count; None: ``layers.num_groups(C)`` (32 for every width of
        the paper networks), 32: cm's ``GroupNorm32`` at any width (converted networks narrower
        than 128 channels need it).
      conv_resample: with ``resblock_updown=False``, resample with 3×3 convolutions.
      dtype: compute dtype (``jnp.bfloat16`` for mixed precision).
      param_dtype: parameter dtype.
    """

    model_channels: int = 192
    channel_mult: Sequence[float] = (1, 2, 3, 4)
    num_res_blocks: int = 3
    attention_resolutions: Sequence[int] = (32, 16, 8)
    dropout: float = 0.0
    num_classes: int | None = 1000
    second_time: bool = (
        False  # a second time input c_noise_2 (MeanFlow's t − r; networks.second_time)
    )
    num_head_channels: int = 64
    num_heads: int = 1
    use_scale_shift_norm: bool = True
    normalize_scale_shift: bool = False
    resblock_updown: bool = True
    conv_resample: bool = True
    norm_groups: int | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @classmethod
    def imagenet64(cls, **overrides: Any) -> ADMUNet:
        """The class-conditional ImageNet 64×64 network of CM (App. C; cm's ImageNet 64 launch flags)."""
        return cls(**{**IMAGENET64_CONFIG, **overrides})

    @classmethod
    def lsun256(cls, **overrides: Any) -> ADMUNet:
        """The unconditional LSUN 256×256 network of CM (App. C; cm's LSUN 256 launch flags)."""
        return cls(**{**LSUN256_CONFIG, **overrides})

    def _heads(self, channels: int) -> int:
        if self.num_head_channels == -1:
            return self.num_heads
        if self.num_head_channels < 1 or channels % self.num_head_channels:
            raise ValueError(
                f"ADMUNet: {channels} channels are not divisible by "
                f"num_head_channels={self.num_head_channels}."
            )
        return channels // self.num_head_channels

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
          x: (B, H, W, C) network input; H = W divisible by 2**(len(channel_mult) − 1).
          c_noise: (B,) noise-level conditioning (cm: 1000·0.25·ln t), or a scalar.
          y: (B,) integer labels, required iff ``num_classes`` is set.
          train: enables dropout (needs ``rngs={"dropout": key}``).

        Returns:
          float32 array of x's shape.

        Raises:
          ValueError: bad image size, attention resolution, head split or labels.
        """
        if not self.channel_mult or self.num_res_blocks < 1 or self.model_channels < 1:
            raise ValueError(
                "ADMUNet needs model_channels >= 1, num_res_blocks >= 1 and a "
                "non-empty channel_mult."
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}.")
        check_image(x, len(self.channel_mult), self.attention_resolutions, "ADMUNet")
        batch, image_size, _, channels = x.shape
        c_noise = check_noise_levels(c_noise, batch)
        check_labels(y, self.num_classes, batch, "ADMUNet")

        # Timestep (+ label) embedding, in float32.
        mc = self.model_channels
        emb = sinusoidal_embedding(c_noise, mc, endpoint=False, sin_first=False)
        emb = dense(emb, 4 * mc, init_style="torch", param_dtype=self.param_dtype)
        emb = dense(nn.swish(emb), 4 * mc, init_style="torch", param_dtype=self.param_dtype)
        emb = add_second_time(
            emb, c_noise_2, self.second_time, "ADMUNet", self.is_initializing(), dim=mc
        )
        if self.num_classes is not None:
            emb = emb + nn.Embed(
                self.num_classes,
                4 * mc,
                param_dtype=self.param_dtype,
                embedding_init=nn.initializers.normal(1.0),
            )(y)

        common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(
            fir_kernel=None,
            dropout=self.dropout,
            skip_rescale=False,
            scale_shift_norm=self.use_scale_shift_norm,
            normalize_scale_shift=self.normalize_scale_shift,
            skip_conv_on_resample=False,
            init_style="torch",
            out_init_scale=0.0,
            norm_eps=_NORM_EPS,
            norm_groups=self.norm_groups,
            **common,
        )

        def res_block(h, out_ch=None, up=False, down=False):
            return ResBlock(out_ch=out_ch, up=up, down=down, **block_kw)(h, emb, train)

        def attention(h):
            return AttnBlock(
                num_heads=self._heads(h.shape[-1]),
                skip_rescale=False,
                init_style="torch",
                qkv_init_scale=1.0,
                out_init_scale=0.0,
                norm_eps=_NORM_EPS,
                norm_groups=self.norm_groups,
                **common,
            )(h)

        def downsample(h):
            if self.resblock_updown:
                return res_block(h, down=True)
            if self.conv_resample:  # PyTorch padding=1, stride 2.
                return conv2d(
                    h,
                    h.shape[-1],
                    3,
                    stride=2,
                    padding=((1, 1), (1, 1)),
                    init_style="torch",
                    **common,
                )
            return naive_downsample_2d(h)

        def upsample(h):
            if self.resblock_updown:
                return res_block(h, up=True)
            h = naive_upsample_2d(h)
            if self.conv_resample:
                h = conv2d(h, h.shape[-1], 3, init_style="torch", **common)
            return h

        h = conv2d(
            x.astype(self.dtype), int(self.channel_mult[0] * mc), 3, init_style="torch", **common
        )
        hs = [h]
        resolution = image_size
        for level, mult in enumerate(self.channel_mult):
            for _ in range(self.num_res_blocks):
                h = res_block(h, out_ch=int(mult * mc))
                if resolution in self.attention_resolutions:
                    h = attention(h)
                hs.append(h)
            if level != len(self.channel_mult) - 1:
                h = downsample(h)
                resolution //= 2
                hs.append(h)

        h = res_block(h)
        h = attention(h)
        h = res_block(h)

        for level, mult in reversed(list(enumerate(self.channel_mult))):
            for i in range(self.num_res_blocks + 1):
                h = res_block(jnp.concatenate([h, hs.pop()], axis=-1), out_ch=int(mult * mc))
                if resolution in self.attention_resolutions:
                    h = attention(h)
                if level and i == self.num_res_blocks:
                    h = upsample(h)
                    resolution *= 2
        assert not hs, "every skip connection must be consumed"

        # Output head in float32 (cm casts back to the input dtype before ``self.out``).
        h = h.astype(jnp.float32)
        h = nn.swish(
            group_norm(h, epsilon=_NORM_EPS, param_dtype=self.param_dtype, groups=self.norm_groups)
        )
        h = conv2d(h, channels, 3, init_style="torch", init_scale=0.0, param_dtype=self.param_dtype)
        return h.astype(jnp.float32)
