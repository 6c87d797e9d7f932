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
    common.set_method(c, args["method"])
    c.data.name = "toy_ring"
    c.data.batch_size = 256
    c.model.name = "mlp"
    c.model.kwargs = dict(hidden=128, depth=3)
    c.optim.update(name="adam", lr=1e-3, warmup_steps=500, decay="cosine")
    c.train.update(num_steps=20_000, log_every=1000, eval_every=10_000, ema_rates=(0.999,))
    c.checkpoint.every = 10_000
    c.eval.two_step_time = 0.3
    if methods.get(args["method"]).needs_teacher:
        c.teacher.workdir = "exact"  # the mixture's exact denoiser
    if args["method"] == "cd":
        # iCT's pseudo-Huber distance and λ = 1/Δt also help CD here: with l2 / uniform weighting the
        # one-step map error after 20k steps was 0.065 against 0.019 (bench/RESULTS.md).
        c.loss.update(distance="pseudo_huber", weighting="ict")
    if args["method"] in ("ct", "cm_continuous_ct"):
        # CM's CT (l2, adaptive N and μ) needs more data than iCT/CD to reach 2× the noise floor at one
        # step: 20k steps at batch 256 gave 2.4×, 40k at batch 512 gave 1.6× (bench/RESULTS.md); its
        # continuous-time limit likewise: 2.51× and 1.89× (bench/RESULTS.md §6).
        c.data.batch_size = 512
        c.train.update(num_steps=40_000, eval_every=20_000)
        c.checkpoint.every = 20_000
    if args["method"] == "cm_continuous_cd":
        # The true objective ‖df/dt‖ (stopgrad=False): its gradient is normalised per example, like
        # sCM's tangent normalisation. With the pseudo-objective f·sg(G·df/dt) the model stayed near
        # the identity at small σ (one-step map error 0.240·σ_d); with ‖df/dt‖ 0.049·σ_d and ≤ 0.047·σ_d
        # at every σ of a probe (bench/RESULTS.md §6).
        c.loss.stopgrad = False
    if args["method"] in ("sct", "scd"):
        # From scratch the tangent warm-up must be long: with r < 1 the objective is mostly flow
        # matching, and F first learns the (teacher's) velocity. With a 2k warm-up of 20k steps sCD's F
        # never learned it at small t (f ≈ identity for σ ≤ 0.2, one-step map error 0.30·σ_d); half the
        # run as warm-up, 40k steps and lr 5e-4 give 0.050·σ_d, and sCT's one-step sw2 0.76× the
        # floor instead of 1.81× (bench/RESULTS.md §6).
        c.train.update(num_steps=40_000, eval_every=20_000)
        c.checkpoint.every = 20_000
        c.optim.lr = 5e-4
        c.loss.tangent_warmup = 20_000
    if args["method"] == "scd":
        # Batch 512: the one-step map error over seeds 0 / 1 was 0.049 / 0.041·σ_d, against 0.050 /
        # 0.056 at batch 256 (bench/RESULTS.md §6).
        c.data.batch_size = 512
    if args["method"] == "ect":
        # ECT's q = 2, k = 8, b = 1, c = 0 (ECT §4) with a stage every 2.5k of the 20k steps: Δt/t
        # halves 7 times (at batch 256 on 2-D points; ECT's 25k steps per stage are for CIFAR-10).
        c.ect.stage_steps = 2500
    if args["method"] == "edm":
        c.train.ema_rates = (0.999,)
    return c
