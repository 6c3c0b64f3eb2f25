#!/usr/bin/env python3
"""Print the README's compatibility table from tox output.

    .venv/bin/tox -l > envs.txt
    python3 scripts/compat_table.py envs.txt matrix.log [more.log ...]

Reads tox's ``<env>: OK`` / ``<env>: FAIL`` lines (a later log wins for an env) and
prints one row per Python, one cell per Celery minor, one mark per redis-py major:
✔ passed, ✘ failed, · did not run; a dash where Celery does not support that Python.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ENV = re.compile(r"^py3(\d+)-celery5(\d)-redis(\d)$")
RESULT = re.compile(r"^[.\s]*(py3\d+-celery5\d-redis\d): (OK|FAIL)")


def main(envs_file: str, *logs: str) -> None:
    lines = Path(envs_file).read_text().split()
    envs = [line for line in lines if ENV.match(line)]
    results: dict[str, str] = {}
    for log in logs:
        for line in Path(log).read_text(errors="replace").splitlines():
            found = RESULT.match(line)
            if found:
                results[found[1]] = found[2]
    pythons = sorted({int(ENV.match(e)[1]) for e in envs})  # type: ignore[index]
    celerys = sorted({int(ENV.match(e)[2]) for e in envs})  # type: ignore[index]
    print("| Python | " + " | ".join(f"Celery 5.{c}" for c in celerys) + " |")
    print("|---" * (len(celerys) + 1) + "|")
    for py in pythons:
        cells = []
        for cel in celerys:
            marks = []
            for env in envs:
                m = ENV.match(env)
                if m and int(m[1]) == py and int(m[2]) == cel:
                    mark = {"OK": "✔", "FAIL": "✘"}.get(results.get(env, ""), "·")
                    marks.append(f"{m[3]}{mark}")
            cells.append(" ".join(marks) or "—")
        print(f"| 3.{py} | " + " | ".join(cells) + " |")
    counts = {k: sum(1 for e in envs if results.get(e) == k) for k in ("OK", "FAIL")}
    print(f"\n{counts['OK']} passed, {counts['FAIL']} failed, "
          f"{len(envs) - counts['OK'] - counts['FAIL']} not run, of {len(envs)} envs")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], *sys.argv[2:])
