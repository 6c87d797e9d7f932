"""A second time input for flow-map networks (MeanFlow: the network sees (t, t − r), MeanFlow §4.3
and Table 1c).

``SecondTimeEmbedding`` embeds the second time like the network's own noise-level embedding (the same
sinusoidal or Fourier features, two dense layers) and the network adds it to its time embedding. Its
last layer is zero-initialised, so at initialisation the network computes exactly what it computes
without the second input: a flow-matching or EDM network gains the input and starts unchanged. Its
submodules have explicit names, so adding it renames none of the network's own parameters (an EDM
run's parameters load into the same paths; the new ones are the ``second_time`` subtree).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from consistency_jax.networks.layers import (
    GaussianFourierProjection,
    check_noise_levels,
    sinusoidal_embedding,
)

Array = jax.Array
# The parameter subtree the second time input adds to a network.
PARAM_NAME = "second_time"


class SecondTimeEmbedding(nn.Module):
    """emb₂(c₂) = W₂·swish(W₁·φ(c₂) + b₁) + b₂ with W₂ = b₂ = 0 at init.

    Attributes:
      features: the width of the network's time embedding (the output size).
      dim: the size of the features φ(c₂).
      kind: "sinusoidal" (``sin_first``/``endpoint`` as the host network's) or "fourier".
      fourier_scale: the frequencies' scale for "fourier".
      endpoint, sin_first: the sinusoidal convention of the host network.
    """

    features: int
    dim: int
    kind: str = "sinusoidal"
    fourier_scale: float = 16.0
    endpoint: bool = False
    sin_first: bool = False
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, c2: Array) -> Array:
        if self.kind == "fourier":
            feats = GaussianFourierProjection(
                embedding_size=self.dim // 2, scale=self.fourier_scale, name="fourier"
            )(c2)
        elif self.kind == "sinusoidal":
            feats = sinusoidal_embedding(
                c2, self.dim, endpoint=self.endpoint, sin_first=self.sin_first
            )
        else:
            raise ValueError(f"Unknown second-time embedding {self.kind!r}.")
        h = nn.Dense(self.features, param_dtype=self.param_dtype, name="dense0")(feats)
        return nn.Dense(
            self.features,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            param_dtype=self.param_dtype,
            name="dense1",
        )(nn.swish(h))


def add_second_time(
    temb: Array,
    c2: Array | None,
    enabled: bool,
    net: str,
    initializing: bool = False,
    **embedding_kwargs,
) -> Array:
    """``temb`` plus the embedding of the second time when the network has the input (initialising
    a network without giving the second time, as the library's generic init does, uses zeros).

    Raises:
      ValueError: a second time given to a network without the input, or missing for one with it.
    """
    if not enabled:
        if c2 is not None:
            raise ValueError(
                f"{net} has no second time input (second_time=False), but one was given."
            )
        return temb
    if c2 is None and initializing:
        c2 = jnp.zeros(temb.shape[:1], jnp.float32)
    if c2 is None:
        raise ValueError(f"{net} was built with second_time=True: pass the second time c_noise_2.")
    c2 = check_noise_levels(c2, temb.shape[0])
    emb = SecondTimeEmbedding(features=temb.shape[-1], name=PARAM_NAME, **embedding_kwargs)(c2)
    return temb + emb.astype(temb.dtype)
