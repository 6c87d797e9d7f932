"""The shape of the package: no import circles (counting imports inside functions too), and loading
a trained run needs no training code."""

import ast
import pathlib
import subprocess
import sys

PKG = pathlib.Path(__file__).resolve().parents[1] / "consistency_jax"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """module -> package modules it imports anywhere in its body (not under TYPE_CHECKING)."""
    modules = {_module_name(p): p for p in PKG.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
            for n in ast.walk(node)
        }
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                # "from pkg import sub" depends on pkg.sub; "from pkg import attr" on pkg.
                targets = [
                    f"{node.module}.{a.name}"
                    if f"{node.module}.{a.name}" in modules
                    else node.module
                    for a in node.names
                ]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                # Importing pkg.sub also runs pkg's __init__, unless the importer lives in pkg
                # (a package importing its own modules is no circle); the root package is the lazy
                # public facade and imports nothing when loaded.
                while t and t != "consistency_jax":
                    if t != name and not name.startswith(t + "."):
                        deps.add(t)
                    t = t.rpartition(".")[0]
        graph[name] = deps
    return graph


def _cycles(graph):
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


def test_no_import_circles():
    graph = _import_graph()
    assert "consistency_jax.methods.ct" in graph and graph["consistency_jax.experiment"]
    assert "consistency_jax.evaluators" in graph["consistency_jax.experiment"]
    assert _cycles(graph) == []
    # The detector finds a circle when there is one.
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def test_loading_a_run_imports_no_training_code():
    code = (
        "import sys, consistency_jax.loading\n"
        "heavy = [m for m in ('consistency_jax.losses', 'consistency_jax.methods', "
        "'consistency_jax.train', 'consistency_jax.experiment', 'consistency_jax.data') "
        "if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
        "import consistency_jax as cj\n"
        "assert callable(cj.make_train_step) and 'consistency_jax.train' in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "HEAVY []" in out.stdout, out.stdout
