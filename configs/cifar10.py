"""CIFAR-10 as in CM (Appendix C) and iCT (§4), NCSN++ (about 56M parameters).

  --config=configs/cifar10.py:method=edm                  the EDM teacher (jcm cifar10_k_ve.py)
  --config=configs/cifar10.py:method=cd,metric=lpips      CD (also metric=l2 or l1, the ablations)
  --config=configs/cifar10.py:method=ct                   CT with the adaptive curriculum
  --config=configs/cifar10.py:method=ict                  iCT

CD needs --config.teacher.workdir=DIR (the EDM run); LPIPS needs --config.loss.lpips_weights=FILE.
"""
import math

from consistency_jax import config as common

BATCH = 512


def get_config(arg=None):
    args = common.parse_arg(arg, method="cd", metric="lpips")
    method, metric = args["method"], args["metric"]
    c = common.base_config()
    common.set_method(c, method)
    common.image_data(c, "cifar10", 32, 3, random_flip=True, batch_size=BATCH)
    c.model.name = "ncsnpp"
    c.model.kwargs = common.ncsnpp_cifar10(dropout=0.0)
    warmup = 10_000_000 // BATCH  # "warmup 10M images"
    if method == "edm":
        # jcm configs/cifar10_k_ve.py: Adam 1e-3, dropout 0.13, 400k steps, EMA half-life 0.5M images.
        c.model.kwargs = common.ncsnpp_cifar10(dropout=0.13)
        ema = math.exp(math.log(0.5) / (0.5e6 / BATCH))
        common.paper_schedule(c, optimizer="adam", lr=1e-3, num_steps=400_000, ema_rates=(ema,),
                              warmup_steps=warmup)
    elif method == "cd":
        lr = {"lpips": 4e-4, "l1": 2e-4, "l2": 4e-4}[metric]
        c.loss.distance = metric
        common.paper_schedule(c, optimizer="radam", lr=lr, num_steps=800_000, ema_rates=(0.9999,),
                              warmup_steps=warmup)
        c.curriculum.update(num_scales=18, mu0=0.0)
    elif method == "ct":
        c.loss.distance = metric
        common.paper_schedule(c, optimizer="radam", lr=4e-4, num_steps=800_000, ema_rates=(0.9999,))
        c.curriculum.update(s0=2, s1=150, mu0=0.9)
    elif method == "ict":
        # iCT §3–4: pseudo-Huber, no target EMA, N from 10 doubling to 1280, lognormal n, λ = 1/Δt,
        # dropout 0.3, eval EMA 0.99993. Batch, lr and length are iCT's values as
        # we read them (batch 1024, 400k steps, RAdam 1e-4); check against the paper before relying on them.
        c.model.kwargs = common.ncsnpp_cifar10(dropout=0.3)
        c.data.batch_size = 1024
        common.paper_schedule(c, optimizer="radam", lr=1e-4, num_steps=400_000, ema_rates=(0.99993,))
    return c
