"""The job's own log: the lines a user reads in the UI (here, one file per job).

Seed 001's real cause went only to a module logger; this log is where it must show.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def log_dir() -> Path:
    return Path(os.environ.get("PIPELINE_LOG_DIR", "/tmp/pipeline-jobs"))


def path(job_id: int) -> Path:
    return log_dir() / f"job-{job_id}.log"


def write(job_id: int, level: str, message: str) -> None:
    """Append one line; O_APPEND keeps lines whole across prefork children."""
    log_dir().mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%H:%M:%S")
    with open(path(job_id), "a", encoding="utf-8") as fh:
        fh.write(f"{stamp} {level} {message}\n")


def read(job_id: int) -> list[str]:
    try:
        return path(job_id).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
