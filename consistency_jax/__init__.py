"""consistency_jax: Consistency Models (CD, CT, iCT) in JAX/Flax.

The public API. The maths follows Song et al., "Consistency Models" (2023), and Song & Dhariwal,
"Improved Techniques for Training Consistency Models" (2023); see the README and docstrings.
"""
from consistency_jax.losses import (LossConfig, default_huber_c, l1_distance, l2_distance,
                                    make_consistency_loss, make_distance, make_edm_loss,
                                    network_teacher, pseudo_huber_distance, sample_index, weighting)
from consistency_jax.networks import get_network, make_apply_fn
from consistency_jax.parameterization import (SigmaConfig, c_noise, consistency_fn,
                                              consistency_scalings, denoiser_fn,
                                              denoiser_to_score, edm_scalings)
from consistency_jax.sampling import (edm_heun_sample, make_sampler, multistep_sample,
                                      onestep_sample, times_from_indices)
from consistency_jax.schedules import (Curriculum, cm_num_scales, cm_target_mu, ict_num_scales,
                                       karras_sigmas, karras_time)
from consistency_jax.solvers import euler_step, heun_step
from consistency_jax.train import make_multi_step, make_train_step
from consistency_jax.train_state import TrainState, ema_update

__version__ = "0.1.0"
