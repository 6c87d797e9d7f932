"""LSUN 256×256 (unconditional) as in CM (Appendix C and the cm launch scripts), ADM UNet.

--config=configs/lsun256.py:method=cd,metric=lpips,category=bedroom   (metric=l2 also)
--config=configs/lsun256.py:method=ct,category=cat
--config=configs/lsun256.py:method=edm,category=bedroom   the EDM teacher (dropout 0.1, batch 256)
"""

from consistency_jax import config as common

EMAS = (0.9999, 0.99994, 0.9999432189950708)


def get_config(arg=None):
    args = common.parse_arg(arg, method="cd", metric="lpips", category="bedroom")
    method, metric, category = args["method"], args["metric"], args["category"]
    if method not in ("edm", "cd", "ct"):
        raise ValueError(f"configs/lsun256.py has methods edm, cd, ct; got {method!r}.")
    if category not in ("bedroom", "cat"):
        raise ValueError(f"LSUN category must be bedroom or cat, got {category!r}.")
    c = common.base_config()
    common.set_method(c, method)
    common.image_data(c, f"lsun/{category}", 256, 3, random_flip=True, batch_size=256)
    c.model.name = "adm"
    c.model.kwargs = common.adm_lsun256(dropout=0.0)
    c.sigmas.c_noise = "cm"
    if method == "edm":
        # cm's LSUN teachers (its launch script): Adam 1e-4, batch 256, dropout 0.1, lognormal σ,
        # Karras weighting, the ImageNet EMA rates; sampled with Heun, 40 steps. The number of
        # steps is not stated (unconfirmed: 600k, as CD).
        c.model.kwargs = common.adm_lsun256(dropout=0.1)
        common.paper_schedule(
            c,
            optimizer="adam",
            lr=1e-4,
            num_steps=600_000,
            ema_rates=(0.999, 0.9999, 0.9999432189950708),
        )
        c.eval.edm_steps = 40
    elif method == "cd":
        c.loss.distance = metric
        c.curriculum.update(kind="constant", num_scales=40, mu0=0.95)
        common.paper_schedule(c, optimizer="adam", lr=1e-5, num_steps=600_000, ema_rates=EMAS)
        c.eval.two_step_indices = (0, 17, 39) if metric == "lpips" else (0, 18, 39)
    else:
        c.loss.distance = "lpips"
        c.curriculum.update(kind="cm", s0=2, s1=150, mu0=0.95)
        common.paper_schedule(c, optimizer="adam", lr=5e-5, num_steps=1_000_000, ema_rates=EMAS)
        c.eval.two_step_indices = (0, 67, 150) if category == "bedroom" else (0, 62, 150)
    return c
