"""The README: the commands CI runs and users copy first, its method table, its links to the guides.

Every command and code block of the README (and of docs/) is run by tests/test_docs.py.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI = ROOT / ".ci" / "run"


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), re.S)


def test_readme_opens_with_install_and_test_commands_that_ci_runs():
    install, test = [b.strip() for b in _blocks("bash")[:2]]
    assert "pip install" in install and "consistency_jax.main" in install
    assert "pytest" in test
    assert test in CI.read_text()  # CI runs exactly the README's test command


def test_readme_is_short():
    assert len(README.read_text().splitlines()) < 200


def test_readme_method_table_lists_every_registered_method():
    from consistency_jax import methods

    text = README.read_text()
    table = text[text.index("| method | paper |") :].split("\n\n")[0]
    rows = [r for r in table.splitlines()[2:] if r.startswith("|")]
    names = {n for r in rows for n in re.findall(r"`(\w+)`", r.rstrip(" |").rsplit("|", 1)[1])}
    assert names == set(methods.names())


def test_readme_links_every_guide():
    text = README.read_text()
    guides = {p.relative_to(ROOT).as_posix() for p in (ROOT / "docs").glob("*.md")}
    guides = {g for g in guides if not g.startswith("docs/_")}  # files waiting for a merge
    assert guides and all(f"]({g})" in text for g in guides), guides - set(
        re.findall(r"\]\(([^)#]+)", text)
    )
