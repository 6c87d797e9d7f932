"""A network with a learned log-variance head: the adaptive loss weighting w_φ(t) of sCM (Lu & Song
2024, §4.2, Eq. 8), after EDM2's uncertainty-based weighting (Karras et al. 2024, §5).

``WithLogVar(net)`` is called exactly like ``net`` (same inputs, same output); its parameters are
``{"net": θ, "logvar_head": φ}``, trained jointly by one optimizer, kept in the same EMAs and
checkpoints. ``logvar(c_noise) -> (B,)`` evaluates w_φ on the network's time input: fixed sinusoidal
features, one hidden layer, and a zero-initialised output (w_φ ≡ 0, uniform weighting, at the start).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from consistency_jax.networks.layers import sinusoidal_embedding


class WithLogVar(nn.Module):
    """``net`` plus the weighting head w_φ(c_noise).

    Attributes:
      net: the denoiser network F_θ (any module of this package).
      features: width of the head's sinusoidal features and hidden layer.
    """

    net: nn.Module
    features: int = 128

    def setup(self):
        self.logvar_hidden = nn.Dense(self.features)
        self.logvar_out = nn.Dense(1, kernel_init=nn.initializers.zeros)

    def __call__(self, x, c_noise, y=None, train: bool = False):
        out = self.net(x, c_noise, y, train=train)
        if self.is_initializing():  # create the head's parameters with the network's
            self.logvar(c_noise)
        return out

    def logvar(self, c_noise: jax.Array) -> jax.Array:
        """w_φ(c_noise) for each example: (B,) -> (B,), float32."""
        h = sinusoidal_embedding(jnp.asarray(c_noise, jnp.float32), self.features)
        return self.logvar_out(nn.silu(self.logvar_hidden(h)))[:, 0]


def make_logvar_fn(module: WithLogVar):
    """``logvar_fn(params, c_noise) -> (B,)`` of a ``WithLogVar`` module's parameters."""

    def logvar_fn(params, c_noise):
        return module.apply({"params": params}, c_noise, method=WithLogVar.logvar)

    return logvar_fn
