"""The 2-D Gaussian-mixture toy (8 modes on a ring) with an exact answer.

  python -m consistency_jax.main --config=configs/toy.py:method=ct --workdir=/tmp/toy_ct
  python -m consistency_jax.main --config=configs/toy.py:method=cd --workdir=/tmp/toy_cd

method=cd (and cm_continuous_cd, scd) distils from the exact denoiser of the mixture; ct / ict /
cm_continuous_ct / sct train from scratch, and so does ect here (no EDM run to tune by default; give one
with --config.init.workdir=runs/toy_edm to tune it as ECT does).
"""

from consistency_jax import config as common
from consistency_jax import methods


def get_config(arg=None):
    args = common.parse_arg(arg, method="ct")
    c = common.base_config()
    c.data.name = "toy_ring"
    c.data.batch_size = 256
    c.model.name = "mlp"
    c.model.kwargs = dict(hidden=128, depth=3)
    c.optim.update(name="adam", lr=1e-3, warmup_steps=500, decay="cosine")
    c.train.update(num_steps=20_000, log_every=1000, eval_every=10_000, ema_rates=(0.999,))
    c.checkpoint.every = 10_000
    c.eval.two_step_time = 0.3
    spec = methods.get(args["method"])
    if spec.needs_teacher and spec.teacher is None:  # an EDM teacher at config.teacher.workdir
        c.teacher.workdir = "exact"  # the mixture's exact denoiser
    # The method's settings for the toy (its presets["toy"], beside the method).
    return methods.apply_preset(c, args["method"], "toy", args)
