"""Every command and code block of the README and of docs/ is run by a test.

- ```python blocks are executed, the blocks of one file in order in one namespace (like a session).
- ```bash blocks are split into commands (continuation lines joined, `&&` split). A command that
  needs what a test cannot have (downloaded weights or data, PyTorch, a GPU, a TPU pod, gcloud, a
  cluster, the network) carries a visible `# needs: WHAT` comment; `test_needs_marks_are_justified`
  checks that each mark is used only where the command really needs it, and that an unmarked
  command needs none of it.
- Default tier, for every command, marked or not: the flags of the package's commands parse with
  the command's own flag definitions (run in-process as `python -m` would, without calling its
  `main`); the training command's config loads and, unless marked, passes `build.validate`; the
  sampling command's request is built; `launch/run.sh` runs with `--dry_run`.
- `slow` tier: every unmarked command of the package runs in a subprocess in a temporary directory,
  with overrides appended that shrink its budget (two train steps, a handful of samples).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import pathlib
import re
import runpy
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = sorted(p.relative_to(ROOT).as_posix() for p in [ROOT / "README.md", *ROOT.glob("docs/*.md")])
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
NEEDS = re.compile(r"#\s*needs:\s*([a-z]+)")
CLI = re.compile(r"^consistency_jax\.(main|sample|evaluate|convert)$")

# What each `# needs:` mark means, as a test on the command: the mark is allowed only where it holds.
NEEDS_KINDS = {
    "network": lambda c: bool(
        re.search(r"pip install|curl |download_and_prepare|tfds build|--setup", c.text)
    ),
    "torch": lambda c: bool(re.search(r"\.pth?\b", c.text)),
    # the evaluation command always needs the FID Inception weights
    "weights": lambda c: (
        c.kind == "evaluate"
        or bool(re.search(r"--checkpoint=|INCEPTION_WEIGHTS|\.safetensors", c.text))
        or any(needs_of_run(r) for r in c.runs_read)
    ),
    "data": lambda c: (
        bool(re.search(r"configs/(cifar10|imagenet64|lsun256)\.py", c.text)) and not c.dry
    ),
    "gpu": lambda c: (
        "--config.mesh." in c.text
        and "xla_force_host_platform_device_count" not in c.env.get("XLA_FLAGS", "")
    ),
    "tpu": lambda c: "--tpu=" in c.text and not c.dry,
    "gcloud": lambda c: c.argv[:1] == ["gcloud"],
    "cluster": lambda c: "JAX_COORDINATOR_ADDRESS" in c.env,
    # a guide's example put in place first (a method of docs/adding_a_method.md, not registered)
    "example": lambda c: bool(c.method) and c.method not in registered_methods(),
}


@dataclasses.dataclass
class Command:
    doc: str
    line: int
    text: str  # the command as written (continuations joined, the comment removed)
    env: dict  # NAME=value words in front of it
    argv: list
    needs: str | None

    def __str__(self):
        return f"{self.doc}:{self.line}: {self.text}"

    @property
    def kind(self) -> str:
        a = self.argv
        if a[:2] == ["python", "-m"] and CLI.match(a[2]):
            return a[2].split(".")[1]
        if a[:1] == ["launch/run.sh"]:
            return "launch"
        if a[:2] == ["pip", "install"]:
            return "install"
        if a[:3] == ["python", "-m", "pytest"]:
            return "pytest"
        return a[0] if a[0] != "python" else " ".join(a[:2])

    @property
    def args(self) -> list:
        """The flags of the package's command (after `--` for launch/run.sh)."""
        if self.kind == "launch":
            return self.argv[self.argv.index("--") + 1 :]
        return self.argv[3:]

    @property
    def dry(self) -> bool:
        """launch/run.sh --dry_run: prints the commands it would run, needs nothing."""
        return self.kind == "launch" and "--dry_run" in self.launch_options

    @property
    def launch_options(self) -> list:
        return self.argv[1 : self.argv.index("--")]

    def flag(self, name: str) -> str | None:
        values = [a.split("=", 1)[1] for a in self.args if a.startswith(f"--{name}=")]
        return values[-1] if values else None

    @property
    def method(self) -> str | None:
        m = re.search(r"--config=\S*:(?:\S*,)?method=(\w+)", self.text)
        return m and m.group(1)

    @property
    def runs_read(self) -> list:
        """Run directories this command reads (not writes)."""
        names = ["config.teacher.workdir", "config.init.workdir"]
        if self.kind in ("sample", "evaluate"):
            names.append("workdir")
        out = [self.flag(n) for n in names]
        if self.kind == "evaluate" and (self.flag("samples") or "").startswith("run:"):
            out.append(self.flag("samples")[4:])
        return [r for r in out if r and r != "exact"]

    @property
    def run_written(self) -> str | None:
        return self.flag("workdir") if self.kind in ("main", "launch") else self.flag("out")


def blocks(doc: str):
    """(language, first line number, text) of every fenced block of a document."""
    text = (ROOT / doc).read_text()
    for m in FENCE.finditer(text):
        yield m.group(1), text.count("\n", 0, m.start(2)) + 1, m.group(2)


def commands_of(doc: str) -> list[Command]:
    out = []
    for lang, first, body in blocks(doc):
        if lang != "bash":
            continue
        lines, joined, start = body.split("\n"), "", None
        for i, line in enumerate(lines):
            if not joined and (not line.strip() or line.lstrip().startswith("#")):
                continue
            start = first + i if not joined else start
            if line.rstrip().endswith("\\"):
                joined += line.rstrip()[:-1] + " "
                continue
            joined += line
            needs = NEEDS.search(joined)
            words = shlex.split(joined, comments=True)
            joined = ""
            parts = [[]]
            for w in words:
                parts.append([]) if w == "&&" else parts[-1].append(w)
            for part in parts:
                env = {}
                while part and re.match(r"^[A-Z_]+=", part[0]):
                    k, v = part.pop(0).split("=", 1)
                    env[k] = v
                out.append(
                    Command(doc, start, shlex.join(part), env, part, needs and needs.group(1))
                )
    return out


ALL = [c for d in DOCS for c in commands_of(d)]


@functools.cache
def registered_methods() -> tuple:
    from consistency_jax import methods

    return tuple(methods.names())


def producers() -> dict:
    """The command that writes each run directory (the first one in the docs)."""
    out: dict = {}
    for c in ALL:
        if c.run_written and c.kind in ("main", "launch", "convert", "sample"):
            out.setdefault(c.run_written, c)
    return out


def needs_of_run(run: str) -> str | None:
    p = producers().get(run)
    return p and (p.needs or next((needs_of_run(r) for r in p.runs_read if needs_of_run(r)), None))


# --------------------------------------------------------------------------------------------
# The shape of the docs.


def test_every_fenced_block_is_python_bash_or_text_and_text_hides_no_command():
    seen = 0
    for doc in DOCS:
        for lang, line, body in blocks(doc):
            seen += 1
            assert lang in ("python", "bash", "text", "json"), f"{doc}:{line}: a ```{lang} block"
            if lang not in ("python", "bash"):
                assert "python -m" not in body and "launch/" not in body, f"{doc}:{line}"
    assert seen > 20 and len(ALL) > 30


def test_every_command_is_one_the_tests_know():
    known = {"main", "sample", "evaluate", "convert", "launch", "install", "pytest"}
    for c in ALL:
        assert c.kind in known or c.needs, f"{c}: no test runs this command (mark it # needs: ...)"


def test_needs_marks_are_justified():
    for c in ALL:
        if c.needs:
            assert c.needs in NEEDS_KINDS, (
                f"{c}: unknown '# needs: {c.needs}' ({sorted(NEEDS_KINDS)})"
            )
            assert NEEDS_KINDS[c.needs](c), f"{c}: marked '# needs: {c.needs}' but does not need it"
        elif c.kind not in ("install", "pytest"):
            wrong = [k for k, holds in NEEDS_KINDS.items() if holds(c)]
            assert not wrong, f"{c}: needs {wrong} but is not marked (tests would run it)"
    marked = {c.needs for c in ALL if c.needs}
    assert {"weights", "torch", "tpu", "gcloud", "network"} <= marked  # the docs show these


def test_runs_that_commands_read_are_made_by_a_documented_command():
    made = producers()
    for c in ALL:
        for run in c.runs_read:
            if not run.startswith(("gs://", "/shared")) and not c.needs:
                assert run in made, f"{c}: reads {run}, which no documented command writes"


def test_relative_links_of_the_docs_exist():
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" not in target:
                assert (ROOT / doc).parent.joinpath(target).exists(), f"{doc}: link to {target}"


def test_names_of_the_package_in_the_docs_exist():
    """Every `consistency_jax.X.Y` the prose names is a module, or an attribute of one, of today's
    package (modules are found without running them: the commands define flags when imported)."""
    import importlib
    import importlib.util

    checked = 0
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for name in sorted(set(re.findall(r"`(consistency_jax(?:\.\w+)+)", text))):
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                module = ".".join(parts[:i])
                with contextlib.suppress(ModuleNotFoundError):  # a parent that is no package
                    if importlib.util.find_spec(module) is not None:
                        break
            rest = parts[i:]
            if rest:
                obj = importlib.import_module(module)
                for attr in rest:
                    assert hasattr(obj, attr), f"{doc}: `{name}`: {module} has no {attr!r}"
                    obj = getattr(obj, attr)
            checked += 1
    assert checked > 10


# --------------------------------------------------------------------------------------------
# Python blocks.


QUICK_LOOPS = 20


def short_range(*args):
    """`range` for the default tier: a documented training loop runs its first few steps only."""
    return range(*args)[:QUICK_LOOPS]


@functools.cache
def python_namespace(doc: str, quick: bool) -> dict:
    """Runs the ```python blocks of a document in order in one namespace; `quick`: every `range`
    loop of theirs stops after QUICK_LOOPS steps (the whole run is the slow tier's)."""
    ns: dict = {"__name__": f"doc_{pathlib.Path(doc).stem}"}
    if quick:
        ns["range"] = short_range
    for lang, line, body in blocks(doc):
        if lang == "python":
            code = "\n" * (line - 1) + body
            exec(compile(code, str(ROOT / doc), "exec"), ns)  # noqa: S102 - our own docs
    return ns


# A guide whose ```python blocks another test file runs itself (registering a method, say) when
# that file reads the guide: not run a second time here.
RUN_ELSEWHERE = {"docs/adding_a_method.md": "tests/test_adding_a_method.py"}


def run_here(doc: str) -> bool:
    other = ROOT / RUN_ELSEWHERE.get(doc, "-")
    return not (other.is_file() and pathlib.Path(doc).name in other.read_text())


PYTHON_DOCS = [d for d in DOCS if run_here(d) and any(b[0] == "python" for b in blocks(d))]


@pytest.mark.parametrize("doc", PYTHON_DOCS)
def test_python_blocks_run_quickly(doc):
    python_namespace(doc, quick=True)


@pytest.mark.slow
@pytest.mark.parametrize("doc", PYTHON_DOCS)
def test_python_blocks_run(doc):
    python_namespace(doc, quick=False)


def test_train_step_example_runs():
    """docs/training.md's example, its training loop cut short: samples of the right shape."""
    import numpy as np

    ns = python_namespace("docs/training.md", quick=True)
    assert int(ns["state"].step) == QUICK_LOOPS
    for name in ("samples", "two_step"):
        x = np.asarray(ns[name])
        assert x.shape == (1000, 2) and np.isfinite(x).all()


@pytest.mark.slow
def test_train_step_example_learns():
    """docs/training.md's example: its samples are about as close to the data as fresh data is."""
    import numpy as np

    from consistency_jax.metrics import sliced_wasserstein2

    ns = python_namespace("docs/training.md", quick=False)
    data = ns["data"].sample(np.random.default_rng(5), 1000)
    floor = sliced_wasserstein2(ns["data"].sample(np.random.default_rng(6), 1000), data)
    for name in ("samples", "two_step"):
        x = np.asarray(ns[name])
        assert x.shape == (1000, 2) and np.isfinite(x).all()
        assert sliced_wasserstein2(x, data) < 6 * floor, name


# --------------------------------------------------------------------------------------------
# Default tier: each command's flags parse with the command's own definitions.


@contextlib.contextmanager
def isolated_flags():
    """absl's global FLAGS as if no module of the package had defined any, restored afterwards.

    Modules that define flags when imported (a command's module inside a package) are imported
    afresh inside, so that their flags are defined again, and put back afterwards."""
    from absl import flags

    fv = flags.FLAGS
    by_module = fv.flags_by_module_dict()
    absl_names = {
        name
        for module, defined in by_module.items()
        if module.startswith("absl")
        for flag in defined
        for name in (flag.name, flag.short_name)
    }
    ours = {name: fv[name] for name in fv if name not in absl_names}
    owners = [
        (m, f) for m, defined in by_module.items() if not m.startswith("absl") for f in defined
    ]
    modules = {m: sys.modules.pop(m, None) for m in by_module if m.startswith("consistency_jax.")}
    modules = {m: mod for m, mod in modules.items() if mod is not None}
    for m in modules:  # `from package import module` must import it afresh too
        parent, _, child = m.rpartition(".")
        if parent in sys.modules and hasattr(sys.modules[parent], child):
            delattr(sys.modules[parent], child)
    was_parsed = fv.is_parsed()
    for name in ours:
        delattr(fv, name)
    before = set(fv)
    try:
        yield fv
    finally:
        for m in fv.flags_by_module_dict():
            if m.startswith("consistency_jax.") and m in sys.modules:
                sys.modules.pop(m)  # defined flags that are removed below
                parent, _, child = m.rpartition(".")
                if parent in sys.modules and hasattr(sys.modules[parent], child):
                    delattr(sys.modules[parent], child)
        for name in set(fv) - before:
            delattr(fv, name)
        fv.unparse_flags()
        for name, flag in ours.items():
            if name == flag.name:
                fv[name] = flag
        for module, flag in owners:
            fv.register_flag_by_module(module, flag)
        for m, mod in modules.items():
            sys.modules[m] = mod
            parent, _, child = m.rpartition(".")
            if parent in sys.modules:
                setattr(sys.modules[parent], child, mod)
        if was_parsed:
            fv.mark_as_parsed()


def parse_cli(module: str, args: list, then=None):
    """Runs `python -m consistency_jax.MODULE ARGS` in-process up to its app.run and parses its
    flags with its own definitions, without calling its main; then `then(flags, main's globals)`
    while the flags are still defined. Returns the flags' values."""
    from absl import app

    seen = {}

    def fake_run(main, argv=None, **_):
        seen["main"] = main
        seen["flags"](sys.argv)

    with isolated_flags() as fv, pytest.MonkeyPatch.context() as mp:
        seen["flags"] = fv
        mp.setattr(app, "run", fake_run)
        mp.setattr(sys, "argv", [f"consistency_jax.{module}", *args])
        mp.chdir(ROOT)
        runpy.run_module(f"consistency_jax.{module}", run_name="__main__", alter_sys=True)
        assert "main" in seen, f"consistency_jax.{module} did not call app.run"
        if then is not None:
            then(fv, seen["main"].__globals__)
        return {name: fv[name].value for name in fv}


def expand(args: list, home: str) -> list:
    return [a.replace("$HOME", home).replace("$PWD", str(ROOT)) for a in args]


def check_main(c: Command):
    """The flags parse, the config loads, and, for a command the slow tier runs in a process of
    its own (no mark, no dry run, no fake devices), the config passes validation."""
    from consistency_jax import (
        build as config_lib,
    )  # build.validate: every builder checks its slice

    args = expand(c.args, os.path.expanduser("~"))
    if c.needs == "example":  # the guide's method is not registered here: its flags with another
        args = [
            re.sub(r"method=\w+", "method=ct", a) if a.startswith("--config=") else a for a in args
        ]
    values = parse_cli("main", args)
    cfg = values["config"]
    assert values["workdir"] and cfg.method, c
    if c.needs or c.dry or "XLA_FLAGS" in c.env:
        return
    if not c.runs_read:
        config_lib.validate(cfg)
        return
    # It reads a run that another documented command writes; that run does not exist here, so
    # validation gets as far as reading it and says which one is missing.
    with pytest.raises(Exception) as e:
        config_lib.validate(cfg)
    assert any(r in str(e.value) for r in c.runs_read), f"{c}: {e.value}"


def check_sample(c: Command):
    def request(fv, main_globals):
        if "request_from_flags" in main_globals:
            r = main_globals["request_from_flags"](fv)
            assert (r.workdir, r.out) == (c.flag("workdir"), c.flag("out")), c
            assert r.num_samples == int(c.flag("num_samples")), c

    values = parse_cli("sample", expand(c.args, "/tmp"), then=request)
    assert values["workdir"] and values["out"], c


@pytest.mark.parametrize("command", ALL, ids=lambda c: f"{c.doc}:{c.line}")
def test_command_parses(command):
    c = command
    if c.kind == "main":
        check_main(c)
    elif c.kind == "sample":
        check_sample(c)
    elif c.kind in ("evaluate", "convert"):
        parse_cli(c.kind, expand(c.args, "/tmp"))
    elif c.kind == "launch":
        options = [o for o in c.launch_options if o != "--setup" or not (ROOT / ".venv").exists()]
        dry = [
            "launch/run.sh",
            "--dry_run",
            *[o for o in options if o != "--dry_run"],
            "--",
            *c.args,
        ]
        env = {**os.environ, **c.env, "PYTHON": sys.executable}
        env.pop("CONSISTENCY_JAX_DISTRIBUTED", None)
        r = subprocess.run(dry, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, f"{c}: {r.stderr}"
        assert "consistency_jax.main" in r.stdout and ("gcloud" in r.stdout) == (
            "--tpu=" in c.text
        ), r.stdout
        if "--tpu=" in c.text:
            assert "--worker=all" in r.stdout and "CONSISTENCY_JAX_DISTRIBUTED=1" in r.stdout, (
                r.stdout
            )
        check_main(c)
    elif c.kind == "install":
        extras = re.findall(r'"\.\[([\w,]+)\]"', shlex.join(c.argv))
        setup = (ROOT / "setup.py").read_text() if (ROOT / "setup.py").exists() else ""
        setup += (ROOT / "pyproject.toml").read_text() if (ROOT / "pyproject.toml").exists() else ""
        for extra in ",".join(extras).split(","):
            assert re.search(rf'"?{extra}"?\s*[:=]\s*\[', setup), f"{c}: no extra {extra!r}"
    elif c.kind == "pytest":
        ci = [
            shlex.split(x, comments=True) for x in (ROOT / ".ci" / "run").read_text().splitlines()
        ]
        assert c.argv in ci, f"{c}: CI does not run it"
    elif c.kind == "python tools/convert_inception_weights.py":
        tool = (ROOT / c.argv[1]).read_text()
        assert all(f'"{a.split("=")[0]}"' in tool for a in c.argv[2:] if a.startswith("--")), c
    else:
        assert c.needs, c  # gcloud, curl, tfds, export, python -c: checked by their marks


# --------------------------------------------------------------------------------------------
# Slow tier: the commands themselves, with tiny budgets.

SHRINK = {
    "main": [
        "--config.train.num_steps=2",
        "--config.train.log_every=1",
        "--config.train.eval_every=2",
        "--config.checkpoint.every=2",
        "--config.eval.num_samples=64",
    ],
    "sample": ["--num_samples=4", "--per_device_batch=4", "--examples_per_shard=4"],
}


def in_tmp(value: str, tmp: pathlib.Path) -> str:
    return str(tmp / "abs" / value.lstrip("/")) if value.startswith("/") else value


def run_command(c: Command, tmp: pathlib.Path, done: set):
    made = producers()
    for run in c.runs_read:
        if run not in done:
            run_command(made[run], tmp, done)
    args = expand(c.args, str(tmp / "home"))
    rewrite = ("--workdir=", "--out=", "--config.teacher.workdir=", "--config.init.workdir=")
    args = [
        a.split("=", 1)[0] + "=" + in_tmp(a.split("=", 1)[1], tmp) if a.startswith(rewrite) else a
        for a in args
    ]
    kind = "main" if c.kind == "launch" else c.kind
    args += SHRINK.get(kind, [])
    if c.kind == "launch":
        argv = ["launch/run.sh", *c.launch_options, "--", *args]
        cwd = ROOT
    else:
        argv = [sys.executable, "-m", f"consistency_jax.{c.kind}", *args]
        cwd = tmp
    env = {
        **os.environ,
        **c.env,
        "PYTHON": sys.executable,
        "PYTHONPATH": str(ROOT),
        "JAX_PLATFORMS": "cpu",
        "TFDS_DATA_DIR": os.environ.get("TFDS_DATA_DIR", str(tmp / "tfds")),
    }
    r = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{c}\n{r.stderr[-4000:]}"
    if c.run_written:
        done.add(c.run_written)
    return r


RUNNABLE = ("main", "sample", "evaluate", "convert", "launch")


@pytest.fixture(scope="module")
def docs_runs(tmp_path_factory):
    """(directory, runs written, commands run): shared by the guides' command tests."""
    root = tmp_path_factory.mktemp("docs_runs")
    (root / "configs").symlink_to(ROOT / "configs")
    return root, set(), set()


@pytest.mark.slow
@pytest.mark.parametrize(
    "doc",
    [
        d
        for d in DOCS
        if any(not c.needs and not c.dry and c.kind in RUNNABLE for c in commands_of(d))
    ],
)
def test_commands_run(doc, docs_runs):
    # One directory for the whole module: a command that several guides show (the digits EDM
    # teacher, the toy CD run, ...) runs once, and the digits data and classifier are built once.
    tmp_path, done, seen = docs_runs
    ran = 0
    for c in commands_of(doc):
        if c.needs or c.dry or c.kind not in RUNNABLE:  # a dry run: the default tier
            continue
        key = (c.kind, tuple(c.args), tuple(c.launch_options) if c.kind == "launch" else ())
        if key not in seen:
            run_command(c, tmp_path, done)
            seen.add(key)
        ran += 1
        written = c.run_written and tmp_path / in_tmp(c.run_written, tmp_path)
        if c.kind in ("main", "launch"):
            assert (written / "metrics.jsonl").exists(), c
        elif c.kind == "sample":
            assert any((written / f).exists() for f in ("samples.npz", "edit.npz")), c
    assert ran
