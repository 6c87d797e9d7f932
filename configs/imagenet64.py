"""ImageNet 64×64 (class-conditional) as in CM (Appendix C and the cm launch scripts), ADM UNet.

Data: tfds imagenet_resized/64x64 (it has labels; downsampled_imagenet has none).
--config=configs/imagenet64.py:method=edm      the EDM teacher (lr 1e-4, batch 4096, dropout 0.1)
--config=configs/imagenet64.py:method=cd       CD, LPIPS (metric=l2 for the l2 variant), N = 40, μ = 0.95
--config=configs/imagenet64.py:method=ct       CT, s0 = 2, s1 = 200, μ0 = 0.95
--config=configs/imagenet64.py:method=ect      ECT (q = 4), tuning the EDM run (--config.init.workdir)
--config=configs/imagenet64.py:method=sct      sCT in TrigFlow (method=scd distils the EDM run)
"""

from consistency_jax import config as common
from consistency_jax import methods


def get_config(arg=None):
    args = common.parse_arg(arg, method="cd", metric="lpips")
    c = common.base_config()
    common.image_data(
        c, "imagenet_resized/64x64", 64, 3, random_flip=True, use_labels=True, batch_size=2048
    )
    c.model.name = "adm"
    c.model.kwargs = common.adm_imagenet64(dropout=0.0)
    c.sigmas.c_noise = "cm"  # the PyTorch code feeds 1000·0.25·ln t to its UNet
    # The method's paper settings on ImageNet 64 (its presets["imagenet64"]); a method without them
    # is refused, naming the methods that have some.
    return methods.apply_preset(c, args["method"], "imagenet64", args, required=True)
