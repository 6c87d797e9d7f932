"""The README's commands and its train-step example are what CI runs and what users copy."""

import pathlib
import re

import numpy as np

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
CI = pathlib.Path(__file__).resolve().parents[1] / ".ci" / "run"


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def test_readme_opens_with_install_and_test_commands_that_ci_runs():
    install, test = [b.strip() for b in _blocks("bash")[:2]]
    assert "pip install" in install and "consistency_jax.main" in install
    assert "pytest" in test
    assert test in CI.read_text()  # CI runs exactly the README's test command


def test_readme_train_step_example_runs_and_learns():
    (code,) = [b for b in _blocks("python") if "def my_net" in b]
    ns: dict = {}
    exec(compile(code, str(README), "exec"), ns)  # noqa: S102 - our own README
    from consistency_jax.metrics import sliced_wasserstein2

    data = ns["data"].sample(np.random.default_rng(5), 1000)
    floor = sliced_wasserstein2(ns["data"].sample(np.random.default_rng(6), 1000), data)
    for name in ("samples", "two_step"):
        x = np.asarray(ns[name])
        assert x.shape == (1000, 2) and np.isfinite(x).all()
        assert sliced_wasserstein2(x, data) < 6 * floor, name
