"""The default real-data job: scikit-learn's bundled 8×8 handwritten digits (1797 images, no download).

  python -m consistency_jax.main --config=configs/digits.py:method=ict --workdir=runs/digits_ict
  python -m consistency_jax.main --config=configs/digits.py:method=edm --workdir=runs/digits_edm
  python -m consistency_jax.main --config=configs/digits.py:method=cd --workdir=runs/digits_cd \
      --config.teacher.workdir=runs/digits_edm
  python -m consistency_jax.main --config=configs/digits.py:method=ct --workdir=runs/digits_ct

Continuous time (the *_cd ones add --config.teacher.workdir=runs/digits_edm; ect and scd take the EDM run
as their initialisation with --config.init.workdir=runs/digits_edm): method=sct, scd, ect,
cm_continuous_ct, cm_continuous_cd.
  python -m consistency_jax.main --config=configs/digits.py:method=ect --workdir=runs/digits_ect \
      --config.init.workdir=runs/digits_edm
  python -m consistency_jax.main --config=configs/digits.py:method=scd --workdir=runs/digits_scd \
      --config.teacher.workdir=runs/digits_edm --config.init.workdir=runs/digits_edm

ECT tunes the EDM run's EMA (config.init.workdir, the same network); without it, it trains from
scratch.

A small DDPM++ (the NCSN++ code with positional embeddings and plain resampling) that trains on a CPU in
minutes; evaluation writes sample grids and digits-FD (Fréchet distance to the held-out digits in the
features of a fixed classifier, ``consistency_jax.evaluators.digits``).
"""

from consistency_jax import config as common
from consistency_jax import methods


def get_config(arg=None):
    args = common.parse_arg(arg, method="ict", size=8)
    c = common.base_config()
    c.data.update(
        name="sklearn_digits",
        image_size=args["size"],
        num_channels=1,
        random_flip=False,
        use_labels=False,
        batch_size=64,
    )
    c.model.name = "ddpmpp"
    c.model.kwargs = dict(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), dropout=0.0)
    c.optim.update(name="adam", lr=1e-3, warmup_steps=200, decay="cosine", grad_clip=1.0)
    c.train.update(num_steps=3000, log_every=250, eval_every=1500, ema_rates=(0.999,))
    c.checkpoint.every = 1000
    c.eval.num_samples = 1000
    c.eval.two_step_time = 0.5
    # The method's settings for the digits (its presets["digits"], beside the method).
    return methods.apply_preset(c, args["method"], "digits", args)
