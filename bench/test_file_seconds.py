"""Writes tests/file_seconds.json, the measured seconds of each test file in each tier, from the
JUnit XML of a default-tier run and of a slow-tier run:

    python -m pytest -q -n 2 --dist loadfile -m "not slow" tests --junitxml=/tmp/default.xml
    python -m pytest -q -n 2 --dist loadfile -m slow tests --junitxml=/tmp/slow.xml
    python bench/test_file_seconds.py --default=/tmp/default.xml --slow=/tmp/slow.xml

tests/conftest.py hands the files to the pytest-xdist workers heaviest first (longest processing
time first), so that no long file starts last while the other worker has nothing left to do.
The figures only order the files: a stale or missing entry changes the order, never a result.
"""

from __future__ import annotations

import argparse
import collections
import json
import pathlib
import xml.etree.ElementTree as ET

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "file_seconds.json"


def file_seconds(junit_xml: str) -> dict[str, float]:
    """Seconds per test file (setup, call and teardown of its tests) in one JUnit XML report."""
    seconds = collections.defaultdict(float)
    for case in ET.parse(junit_xml).getroot().iter("testcase"):
        module = case.get("classname", "").split(".")[-1]
        if module:
            seconds[f"{module}.py"] += float(case.get("time", 0.0))
    return dict(seconds)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--default", required=True, help="JUnit XML of a -m 'not slow' run")
    parser.add_argument("--slow", required=True, help="JUnit XML of a -m slow run")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    tiers = {"default": file_seconds(args.default), "slow": file_seconds(args.slow)}
    table = {
        name: {tier: round(tiers[tier].get(name, 0.0), 1) for tier in tiers}
        for name in sorted(set(tiers["default"]) | set(tiers["slow"]))
    }
    pathlib.Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    total = {tier: round(sum(s.values())) for tier, s in tiers.items()}
    print(f"{len(table)} files, seconds summed over tests: {total} -> {args.out}")


if __name__ == "__main__":
    main()
