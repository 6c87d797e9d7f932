"""CIFAR-10 as in CM (Appendix C) and iCT (§4), NCSN++ (about 56M parameters).

  --config=configs/cifar10.py:method=edm                  the EDM teacher (jcm cifar10_k_ve.py)
  --config=configs/cifar10.py:method=cd,metric=lpips      CD (also metric=l2 or l1, the ablations)
  --config=configs/cifar10.py:method=ct                   CT with the adaptive curriculum
  --config=configs/cifar10.py:method=ict                  iCT
  --config=configs/cifar10.py:method=ect                  ECT, tuning the EDM run

CD needs --config.teacher.workdir=DIR (the EDM run); LPIPS needs --config.loss.lpips_weights=FILE;
ECT starts from the EDM run with --config.init.workdir=DIR (without it, from scratch).
  --config=configs/cifar10.py:method=sct                  sCT (TrigFlow; method=scd distils the EDM run)
  --config=configs/cifar10.py:method=cm_continuous_cd     CM's continuous-time CD (also _ct), l2
"""

from consistency_jax import config as common
from consistency_jax import methods

BATCH = 512


def get_config(arg=None):
    args = common.parse_arg(arg, method="cd", metric="lpips")
    c = common.base_config()
    common.image_data(c, "cifar10", 32, 3, random_flip=True, batch_size=BATCH)
    c.model.name = "ncsnpp"
    c.model.kwargs = common.ncsnpp_cifar10(dropout=0.0)
    # The method's paper settings on CIFAR-10 (its presets["cifar10"]: schedule, lr, EMA, dropout).
    return methods.apply_preset(c, args["method"], "cifar10", args, required=True)
