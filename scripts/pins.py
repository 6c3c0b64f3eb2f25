#!/usr/bin/env python3
"""The pinned versions each tox env installs (constraints/<env>.txt), written and compared.

    python scripts/pins.py write .tox/lock     # scripts/test lock: freeze every env built there
    python scripts/pins.py diff .tox/latest    # scripts/test latest: what moved since the pins
    python scripts/pins.py table               # the README's "tested versions" table

Runs with the .venv's Python (scripts/test uses it); the envs are read with the uv that
tox-uv installed there.
"""

from __future__ import annotations

import datetime
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PINS = ROOT / "constraints"
UV = Path(sys.executable).parent / "uv"
OURS = "celery-resilience"
ENV = re.compile(r"^py3(\d+)-celery5(\d)-redis(\d)$")


def freeze(env_dir: Path) -> dict[str, str]:
    """name -> version of what is installed in a tox env (our own package left out)."""
    out = subprocess.run(
        [str(UV), "pip", "freeze", "--python", str(env_dir / "bin" / "python")],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return dict(_parse(out.splitlines()))


def _parse(lines: list[str]) -> list[tuple[str, str]]:
    pins = []
    for line in lines:
        name, sep, version = line.strip().partition("==")
        if sep and not line.startswith("#") and name.lower() != OURS:
            pins.append((name.lower(), version))
    return pins


def pinned(env: str) -> dict[str, str]:
    path = PINS / f"{env}.txt"
    return dict(_parse(path.read_text().splitlines())) if path.exists() else {}


def envs_in(workdir: Path) -> list[Path]:
    return sorted(p for p in workdir.iterdir() if (p / "bin" / "python").exists()
                  and not p.name.startswith("."))  # fmt: skip


def write(workdir: Path) -> None:
    PINS.mkdir(exist_ok=True)
    today = datetime.date.today().isoformat()
    for env_dir in envs_in(workdir):
        versions = freeze(env_dir)
        lines = [f"# {env_dir.name}: pinned by `scripts/test lock` on {today}"]
        lines += [f"{name}=={version}" for name, version in sorted(versions.items())]
        (PINS / f"{env_dir.name}.txt").write_text("\n".join(lines) + "\n")
        print(f"pins: {env_dir.name}: {len(versions)} packages")
    # scripts/test's own tox and tox-uv, for .venv (installed with pip -c).
    tools = subprocess.run(
        [str(UV), "pip", "compile", "-", "--python", sys.executable, "--quiet",
         "--no-header", "--no-annotate"],
        input="tox>=4.11\ntox-uv>=1.11\n", check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    (PINS / "tox.txt").write_text(f"# scripts/test's tox: pinned by `scripts/test lock` on {today}\n"
                                  + tools)  # fmt: skip


def diff(workdir: Path) -> int:
    moved = 0
    for env_dir in envs_in(workdir):
        now, then = freeze(env_dir), pinned(env_dir.name)
        changes = [f"{name} {then.get(name, '-')} -> {now.get(name, '-')}"
                   for name in sorted(set(now) | set(then)) if now.get(name) != then.get(name)]  # fmt: skip
        moved += bool(changes)
        print(f"latest: {env_dir.name}: " + ("; ".join(changes) or "as pinned"))
    print(f"latest: {moved} env(s) ran on releases newer than their pins"
          + (" (a finding: `scripts/test lock` once they pass)" if moved else ""))  # fmt: skip
    return 0


def table() -> None:
    """Per Celery minor: the kombu release and, per redis-py major, the release tested."""
    cells: dict[int, dict[str, set[str]]] = {}
    for path in sorted(PINS.glob("py3*-celery5*-redis*.txt")):
        match = ENV.match(path.stem)
        if match is None:
            continue
        pins = pinned(path.stem)
        cell = cells.setdefault(int(match[2]), {"celery": set(), "kombu": set(), "redis": set()})
        for name in cell:
            cell[name].add(pins[name])
    print("| Celery | celery | kombu | redis-py |")
    print("|---|---|---|---|")
    for minor, cell in sorted(cells.items()):
        row = [", ".join(sorted(cell[name], key=_key)) for name in ("celery", "kombu", "redis")]
        print(f"| 5.{minor} | " + " | ".join(row) + " |")


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version))


if __name__ == "__main__":
    command, *args = sys.argv[1:] or ["help"]
    if command == "write" and len(args) == 1:
        write(Path(args[0]))
    elif command == "diff" and len(args) == 1:
        sys.exit(diff(Path(args[0])))
    elif command == "table" and not args:
        table()
    else:
        sys.exit(__doc__)
