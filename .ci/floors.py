"""Pins jdl's runtime dependencies to their floors, for testing the oldest versions promised.

    python .ci/floors.py > floors.txt              # a pip constraints file: name==floor
    python .ci/floors.py --test pytest torch       # those requirements of the test extra

`pip install -c floors.txt . $(python .ci/floors.py --test ...)` installs the oldest versions
pyproject.toml allows (each `name>=X` becomes `name==X`), with test tools as the test extra
pins them. A runtime dependency without a `>=` floor is an error: every one must state the
oldest version that was tested.
"""

from __future__ import annotations

import argparse
import pathlib
import re
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
FLOOR = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*>=\s*([^,;\s]+)")


def _project(pyproject: pathlib.Path) -> dict:
    return tomllib.loads(pyproject.read_text())["project"]


def floors(pyproject: pathlib.Path = ROOT / "pyproject.toml") -> list[str]:
    """`name==floor` for each of [project].dependencies, in order."""
    pins = []
    for requirement in _project(pyproject)["dependencies"]:
        match = FLOOR.match(requirement)
        if match is None:
            raise SystemExit(f"{requirement!r} has no '>=' floor: give the oldest tested version")
        pins.append(f"{match.group(1)}=={match.group(2)}")
    return pins


def extra_requirements(names: list[str], pyproject: pathlib.Path = ROOT / "pyproject.toml"):
    """The test extra's requirement strings for `names` (as written there), in that order."""
    extra = {
        NAME.match(r).group(1).lower(): r
        for r in _project(pyproject)["optional-dependencies"]["test"]
    }
    missing = [name for name in names if name.lower() not in extra]
    if missing:
        raise SystemExit(f"not in the test extra: {', '.join(missing)}")
    return [extra[name.lower()] for name in names]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--test", nargs="+", metavar="NAME", help="print these test requirements")
    args = parser.parse_args()
    lines = extra_requirements(args.test) if args.test else floors()
    sys.stdout.write("".join(line + "\n" for line in lines))
