"""LSUN 256×256 (unconditional) as in CM (Appendix C and the cm launch scripts), ADM UNet.

--config=configs/lsun256.py:method=cd,metric=lpips,category=bedroom   (metric=l2 also)
--config=configs/lsun256.py:method=ct,category=cat
--config=configs/lsun256.py:method=edm,category=bedroom   the EDM teacher (dropout 0.1, batch 256)
"""

from consistency_jax import config as common
from consistency_jax import methods


def get_config(arg=None):
    args = common.parse_arg(arg, method="cd", metric="lpips", category="bedroom")
    if args["category"] not in ("bedroom", "cat"):
        raise ValueError(f"LSUN category must be bedroom or cat, got {args['category']!r}.")
    c = common.base_config()
    common.image_data(c, f"lsun/{args['category']}", 256, 3, random_flip=True, batch_size=256)
    c.model.name = "adm"
    c.model.kwargs = common.adm_lsun256(dropout=0.0)
    c.sigmas.c_noise = "cm"
    # The method's paper settings on LSUN 256 (its presets["lsun256"]: edm, cd, ct).
    return methods.apply_preset(c, args["method"], "lsun256", args, required=True)
