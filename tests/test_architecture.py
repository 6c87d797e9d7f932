"""The shape of the package, checked from its source: which module may import which (a layer table
below, data a reader can change in one place), no private name of a module used by another, no
import circles (counting imports inside functions too), and loading a trained run needs no training
code.

The checker is generic: it reads any package tree, and a planted violation in a small fake package
(written into tmp_path) is reported, so a green result here means something.
"""

from __future__ import annotations

import ast
import functools
import pathlib
import subprocess
import sys

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "consistency_jax"

# ---------------------------------------------------------------------------------------------------
# The rules, as data. Names are module names relative to the package; a name covers the module and,
# when it is a package, every module inside it ("methods" is methods/__init__.py and methods/*.py).

# The layers, lowest first. A module of a layer imports only modules of its own layer and of the
# layers below it (the top layer, the loop, may import anything): core maths <- methods <- train <-
# loop. A module listed in no layer is free of this rule (the other rules still hold for it); a new
# module imported from a layer is reported until it is put in one.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Leaf utilities: files, processes, signals, leases. They import nothing of the package but
    # each other.
    ("base", ("fs", "distributed", "preemption", "writer", "workdir_lock", "export")),
    # The maths: parameterisation, schedules, ODE solvers, losses, networks, samplers, the toy
    # mixture, the train state pytree.
    (
        "core",
        (
            "config",  # the schema and the loader: data (ONLY below narrows what it may import)
            "parameterization",
            "schedules",
            "solvers",
            "trigflow",
            "losses",
            "networks",
            "toy",
            "trees",
            "train_state",
            "samplers",
            "editing",
            "guidance",
        ),
    ),
    ("methods", ("methods",)),
    ("train", ("train", "sharding")),
    ("loop", ("experiment", "main")),
)

# Modules that may import only the listed layers (and themselves): the configuration is data, its
# schema and its loader; it imports nothing of the package above it (no builder, no checkpoint, no
# evaluation: each builder checks its own slice of the config).
ONLY: dict[str, tuple[str, ...]] = {
    "config": ("base", "core"),
}

# Further edges that must not exist: (importer, imported, why). An imported name ending in ".*"
# stands for the modules inside that package but not the package itself (its public face).
NEVER: tuple[tuple[str, str, str], ...] = (
    ("evaluators", "methods.*", "evaluation does not import method internals"),
    ("evaluate", "methods.*", "evaluation does not import method internals"),
    ("sample", "methods.*", "the sampling command does not import method internals"),
    ("metrics", "data", "metrics do not import data"),
    ("sharding", "train", "sharding does not import train"),
)

# What today's tree still violates: (rule, importer, imported). The list must only shrink: a new
# violation fails test_the_package_keeps_its_layers_and_private_names, a violation that is gone
# fails test_every_known_violation_still_exists until it is struck from here.
KNOWN_VIOLATIONS: frozenset[tuple[str, str, str]] = frozenset()


# ---------------------------------------------------------------------------------------------------
# The checker (generic: any package directory, any table).


def _module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: pathlib.Path) -> dict[str, pathlib.Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    return {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
        for n in ast.walk(node)
    }


def _top_level_nodes(tree: ast.Module) -> list[ast.AST]:
    """The statements run when the module is imported: not inside a function (a class body runs)."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        out.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return out


def _absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The module a ``from ... import`` names, relative imports resolved against the importer."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


@functools.cache
def _imports(root: pathlib.Path, top_level_only: bool = False):
    """Per module: the package modules it imports (targets), and the private names of other package
    modules it uses, as (module, name) pairs: ``from m import _x`` and ``m._x`` with m bound to a
    package module by an import. Imports under ``if TYPE_CHECKING`` are not counted."""
    modules = _modules(root)
    package = root.name
    result = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = _type_checking_nodes(tree)
        nodes = _top_level_nodes(tree) if top_level_only else list(ast.walk(tree))
        is_package = path.name == "__init__.py"
        targets, private, aliases = set(), set(), {}
        for node in nodes:
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name in modules:
                        targets.add(a.name)
                        if a.asname:
                            aliases[a.asname] = a.name
            elif isinstance(node, ast.ImportFrom):
                source = _absolute(node, name, is_package)
                if not (source == package or source.startswith(package + ".")):
                    continue
                for a in node.names:
                    sub = f"{source}.{a.name}"
                    if sub in modules:  # "from pkg import sub" depends on pkg.sub
                        targets.add(sub)
                        aliases[a.asname or a.name] = sub
                    else:  # "from pkg import attr" depends on pkg
                        targets.add(source)
                        if _is_private(a.name):
                            private.add((source, a.name))
        for node in nodes:
            if (
                id(node) not in skip
                and isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _is_private(node.attr)
                and f"{aliases[node.value.id]}.{node.attr}" not in modules
            ):
                private.add((aliases[node.value.id], node.attr))
        result[name] = (targets, private)
    return modules, result


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _closure(target: str, modules) -> set[str]:
    """Importing pkg.a.b runs pkg.a.b, pkg.a's __init__ (not the root package's: it is the lazy
    public facade and imports nothing when loaded)."""
    out = set()
    while target and target not in modules:
        target = target.rpartition(".")[0]
    while target.count("."):
        out.add(target)
        target = target.rpartition(".")[0]
    return out


def import_graph(root: pathlib.Path, top_level_only: bool = False) -> dict[str, set[str]]:
    """module -> the package modules importing it runs (its own package's modules excluded when the
    importer lives inside that package: a package importing its own modules is no circle)."""
    modules, found = _imports(root, top_level_only)
    graph = {}
    for name, (targets, _) in found.items():
        deps = set()
        for t in targets:
            deps |= {d for d in _closure(t, modules) if d != name and not name.startswith(d + ".")}
        graph[name] = deps
    return graph


def _covers(prefix: str, module: str) -> bool:
    """Whether the table's name ``prefix`` (relative, maybe ending in .*) covers ``module``."""
    if prefix.endswith(".*"):
        return module.startswith(prefix[:-2] + ".")
    return module == prefix or module.startswith(prefix + ".")


def _layer_of(module: str, layers) -> int | None:
    for i, (_, names) in enumerate(layers):
        if any(_covers(n, module) for n in names):
            return i
    return None


def check(root: pathlib.Path, layers=LAYERS, only=ONLY, never=NEVER) -> set[tuple[str, str, str]]:
    """Every violation of the table in the package at ``root``: (rule, importer, imported), names
    relative to the package; rule is "layer", "only", "never" or "private"."""
    package = root.name
    rel = lambda m: m[len(package) + 1 :] if m.startswith(package + ".") else m
    modules, found = _imports(root)
    graph = import_graph(root)
    layer_names = [n for n, _ in layers]
    out = set()
    for full, deps in graph.items():
        importer = rel(full)
        if full == package:
            continue
        mine = _layer_of(importer, layers)
        for dep in map(rel, deps):
            if importer.split(".")[0] == dep.split(".")[0]:
                continue  # a package's modules among themselves
            theirs = _layer_of(dep, layers)
            if mine is not None and mine < len(layers) - 1 and (theirs is None or theirs > mine):
                out.add(("layer", importer, dep))
            for who, allowed in only.items():
                if _covers(who, importer):
                    ok = any(
                        _covers(n, dep)
                        for layer in allowed
                        for n in layers[layer_names.index(layer)][1]
                    )
                    if not ok:
                        out.add(("only", importer, dep))
            for who, what, _ in never:
                if _covers(who, importer) and _covers(what, dep):
                    out.add(("never", importer, dep))
        private = set(found[full][1])
        for target in found[full][0]:  # a private module of another package: pkg._mod
            parent, _, last = target.rpartition(".")
            if _is_private(last):
                private.add((parent, last))
        for source, attr in private:
            src = rel(source)
            # A package's modules may share private names among themselves.
            if src.split(".")[0] != importer.split(".")[0] or src == package:
                out.add(("private", importer, f"{src}.{attr}"))
    return out


def cycles(graph):
    seen, stack, found = set(), [], []

    def visit(node):
        if node in stack:
            found.append(stack[stack.index(node) :] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for dep in sorted(graph[node]):
            visit(dep)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    return found


def _explain(violations) -> str:
    why = {(w, i): r for w, i, r in NEVER}
    lines = []
    for rule, importer, imported in sorted(violations):
        if rule == "layer":
            reason = "imports a module of a higher layer, or of none (see LAYERS)"
        elif rule == "only":
            reason = "may import only " + ", ".join(
                ONLY[next(k for k in ONLY if _covers(k, importer))]
            )
        elif rule == "never":
            reason = next((r for (w, i), r in why.items() if _covers(w, importer)), "NEVER")
        else:
            reason = "uses a private name of another module"
        lines.append(f"  {(rule, importer, imported)!r},  # {reason}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# The tests.


def test_the_package_keeps_its_layers_and_private_names():
    found = check(PKG)
    new = found - KNOWN_VIOLATIONS
    assert not new, "New violations of the layer table in tests/test_architecture.py:\n" + _explain(
        new
    )


def test_every_known_violation_still_exists():
    """KNOWN_VIOLATIONS only shrinks: a violation that is fixed must be struck from the list."""
    gone = KNOWN_VIOLATIONS - check(PKG)
    assert not gone, "Fixed; strike from KNOWN_VIOLATIONS:\n" + _explain(gone)


def test_the_table_names_modules_that_exist():
    modules = {m.partition(".")[2] for m in _modules(PKG)}
    named = {n for _, names in LAYERS for n in names} | set(ONLY) | {w for w, _, _ in NEVER}
    named |= {i.removesuffix(".*") for _, i, _ in NEVER}
    missing = sorted(n for n in named if not any(_covers(n, m) for m in modules))
    assert not missing, f"The layer table names modules that do not exist: {missing}"


def _write_tree(root: pathlib.Path, files: dict[str, str]) -> pathlib.Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


# A small package with the shape of the real one: allowed imports and one planted violation of each
# rule (marked BAD); the checker must report exactly the BAD lines.
_FAKE = {
    "__init__.py": "",
    "fs.py": "import os\n",
    # A core module importing a module that no layer lists (BAD layer, until it is given one).
    "parameterization.py": (
        "from fakepkg import scratch  # BAD layer\ndef _scale(x):\n    return x\n"
    ),
    "trees.py": "def flatten(tree):\n    return tree\n",
    "scratch.py": "X = 1\n",
    # core importing a method: upward (BAD).
    "losses.py": (
        "from fakepkg import parameterization\n"
        "def loss():\n"
        "    from fakepkg.methods import ct  # BAD layer\n"
        "    return ct\n"
    ),
    "methods/__init__.py": "from fakepkg.methods.base import Method\n",
    "methods/base.py": "from fakepkg import losses\nclass Method:\n    pass\n",
    "methods/discrete.py": "from fakepkg.methods.base import Method\n_GRID = 3\n",
    # Same package: private names may be shared inside methods/ (not reported).
    "methods/ct.py": (
        "from fakepkg.methods import discrete\n"
        "from fakepkg.methods.discrete import _GRID\n"
        "from . import base\n"
        "N = discrete._GRID\n"
    ),
    "train.py": "from fakepkg import methods\nfrom fakepkg import losses\n",
    # sharding importing train (BAD never), through a relative import.
    "sharding.py": "from . import train  # BAD never\n",
    "checkpoint.py": "import json\n_DATA = 'data'\n",
    # Private names of other modules, by import and by attribute (BAD private x2).
    "loading.py": (
        "from fakepkg.checkpoint import _DATA  # BAD private\n"
        "from fakepkg import checkpoint as ckpt\n"
        "from fakepkg import parameterization\n"
        "x = ckpt._DATA  # BAD private (same name, reported once)\n"
        "y = parameterization._scale  # BAD private\n"
        "z = ckpt.__name__\n"
        "import fakepkg.data._cache  # BAD private (a private module of another package)\n"
    ),
    # config importing a builder (BAD only), once only for type checking (not reported).
    "config.py": (
        "from typing import TYPE_CHECKING\n"
        "from fakepkg import fs, parameterization\n"
        "if TYPE_CHECKING:\n"
        "    from fakepkg import experiment\n"
        "def validate(c):\n"
        "    from fakepkg import build  # BAD only\n"
        "    return build\n"
    ),
    "build.py": "from fakepkg import config, train, sharding\n",
    "data/__init__.py": "from fakepkg.data.readers import read\nfrom fakepkg.data import _cache\n",
    "data/_cache.py": "X = 1\n",
    "data/readers.py": "def read():\n    pass\n",
    # evaluation reaching into a method's module (BAD never), the registry is fine.
    "evaluators/__init__.py": "",
    "evaluators/samples.py": (
        "from fakepkg import methods\nfrom fakepkg.methods.discrete import _GRID  # BAD never+private\n"
    ),
    # metrics importing data (BAD never).
    "metrics/__init__.py": "",
    "metrics/digits.py": "import fakepkg.data.readers as readers  # BAD never\n",
    "experiment.py": (
        "from fakepkg import build, checkpoint, config, evaluation, train\n"
        "import fakepkg.sharding\n"
    ),
    "main.py": "from fakepkg import experiment\n",
}


def test_the_checker_reports_planted_violations(tmp_path):
    root = _write_tree(tmp_path / "fakepkg", _FAKE)
    want = {
        ("layer", "losses", "methods"),
        ("layer", "losses", "methods.ct"),
        ("layer", "parameterization", "scratch"),
        ("layer", "config", "build"),
        ("never", "sharding", "train"),
        ("private", "loading", "checkpoint._DATA"),
        ("private", "loading", "parameterization._scale"),
        ("private", "loading", "data._cache"),
        ("only", "config", "build"),
        ("never", "evaluators.samples", "methods.discrete"),
        ("private", "evaluators.samples", "methods.discrete._GRID"),
        ("never", "metrics.digits", "data"),
        ("never", "metrics.digits", "data.readers"),
    }
    assert check(root) == want
    # Every rule of the real table is exercised by the fake tree.
    assert {rule for rule, _, _ in want} == {"layer", "only", "never", "private"}
    # Fixing the planted violations leaves nothing to report.
    fixed = dict(_FAKE)
    for rel, text in _FAKE.items():
        fixed[rel] = "\n".join(ln for ln in text.splitlines() if "# BAD" not in ln) + "\n"
    fixed["losses.py"] = "from fakepkg import parameterization\n"
    clean = _write_tree(tmp_path / "clean" / "fakepkg", fixed)
    assert check(clean) == set()


def test_no_import_circles():
    graph = import_graph(PKG)
    assert "consistency_jax.methods.ct" in graph and graph["consistency_jax.experiment"]
    assert "consistency_jax.evaluators" in graph["consistency_jax.experiment"]
    assert cycles(graph) == []
    # The detector finds a circle when there is one.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_the_checker_finds_a_planted_circle(tmp_path):
    root = _write_tree(
        tmp_path / "fakepkg",
        {
            "__init__.py": "",
            "a.py": "from fakepkg import b\n",
            "b.py": "def f():\n    from fakepkg import c\n",  # inside a function: still counted
            "c.py": "import fakepkg.a\n",
        },
    )
    assert cycles(import_graph(root)) == [["fakepkg.a", "fakepkg.b", "fakepkg.c", "fakepkg.a"]]


_TRAINING = (
    "consistency_jax.losses",
    "consistency_jax.methods",
    "consistency_jax.train",
    "consistency_jax.experiment",
    "consistency_jax.data",
)


def _runs_on_import(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


def test_loading_a_run_imports_no_training_code_by_its_import_graph():
    """The quick form of the subprocess check below: what importing ``loading`` runs (its imports at
    module level, followed through the package) holds no training module."""
    graph = import_graph(PKG, top_level_only=True)
    runs = _runs_on_import(graph, "consistency_jax.loading")
    assert "consistency_jax.checkpoint" in runs  # the walk follows imports
    heavy = sorted(m for m in runs if any(_covers(t, m) for t in _TRAINING))
    assert heavy == []
    # ... and it would see a training module if one were imported.
    assert "consistency_jax.train" in _runs_on_import(graph, "consistency_jax.experiment")


@pytest.mark.slow
def test_loading_a_run_imports_no_training_code():
    code = (
        "import sys, consistency_jax.loading\n"
        f"heavy = [m for m in {_TRAINING!r} if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
        "import consistency_jax as cj\n"
        "assert callable(cj.make_train_step) and 'consistency_jax.train' in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout, out.stdout
