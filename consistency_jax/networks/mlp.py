"""A small MLP denoiser for low-dimensional data (the 2-D toy problem)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from consistency_jax.networks.layers import sinusoidal_embedding
from consistency_jax.networks.second_time import add_second_time


class MLP(nn.Module):
    """F_θ(x, c_noise) for vectors x of shape (B, D): time features are added to every hidden layer.

    Attributes:
      hidden: width of the hidden layers.
      depth: number of hidden layers.
      emb_dim: size of the sinusoidal embedding of c_noise (scaled by ``emb_scale`` first, since
        c_noise = 0.25·ln t spans only about [−1.6, 1.1]).
      num_classes: if set, a label embedding is added to the time embedding.
      dropout: dropout rate on hidden activations (active with train=True).
      dtype: compute dtype.
      second_time: the network takes a second time input ``c_noise_2`` (MeanFlow's t − r),
        embedded like c_noise and added after the first layer of the time embedding, zero-initialised
        (``networks.second_time``).
    """

    hidden: int = 128
    depth: int = 3
    emb_dim: int = 64
    emb_scale: float = 100.0
    num_classes: int | None = None
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    second_time: bool = False

    @nn.compact
    def __call__(self, x, c_noise, y=None, train: bool = False, c_noise_2=None):
        if x.ndim != 2:
            raise ValueError(f"MLP expects inputs of shape (B, D), got {x.shape}.")
        emb = sinusoidal_embedding(c_noise * self.emb_scale, self.emb_dim)
        emb = nn.silu(nn.Dense(self.hidden, dtype=self.dtype)(emb))
        c2 = None if c_noise_2 is None else c_noise_2 * self.emb_scale
        emb = add_second_time(
            emb,
            c2,
            self.second_time,
            "MLP",
            self.is_initializing(),
            dim=self.emb_dim,
            sin_first=False,
        )
        if self.num_classes is not None:
            if y is None:
                raise ValueError("This MLP is class-conditional: pass labels y.")
            emb = emb + nn.Embed(self.num_classes, self.hidden, dtype=self.dtype)(y)
        elif y is not None:
            raise ValueError("This MLP is unconditional but labels were given.")
        h = nn.Dense(self.hidden, dtype=self.dtype)(x)
        for _ in range(self.depth):  # pre-norm residual blocks, time added inside each
            a = nn.LayerNorm(dtype=self.dtype)(h) + nn.Dense(self.hidden, dtype=self.dtype)(emb)
            a = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(a))
            h = h + nn.Dense(self.hidden, dtype=self.dtype)(a)
        h = nn.silu(nn.LayerNorm(dtype=self.dtype)(h))
        return nn.Dense(x.shape[-1], dtype=self.dtype)(h).astype(jnp.float32)
