"""Plain typed functions behind ``fedtune data check`` and ``fedtune data prepare``.

Each returns the process exit code: 0 success (check: the folder is usable), 1 the folder is not
usable for training, 2 a user error (message printed, no traceback).
"""

from __future__ import annotations

import logging
from pathlib import Path

from rich.console import Console

from common.core.config import load_config
from common.core.errors import FedtuneError
from common.dataprep.check import check_folder
from common.dataprep.prepare import prepare_folder
from common.dataprep.report import render_check, render_prepare

logger = logging.getLogger(__name__)
OK, NOT_USABLE, USER_ERROR = 0, 1, 2


def data_check(dir: Path, config_path: Path | None = None, as_json: bool = False) -> int:
    """Print the check report of ``dir`` (rich tables or JSON); exit code says if usable."""
    try:
        report = check_folder(dir, load_config(config_path))
    except FedtuneError as err:
        Console(stderr=True).print(f"[red]error[/]: {err}", highlight=False)
        return USER_ERROR
    if as_json:
        print(report.to_json())
    else:
        render_check(report, Console())
    return OK if report.usable else NOT_USABLE


def data_prepare(
    dir: Path,
    out: Path,
    clean: bool = False,
    dedup: bool = False,
    redact: bool = False,
    config_path: Path | None = None,
) -> int:
    """Write the prepared copy of ``dir`` to ``out`` and print what changed."""
    try:
        report = prepare_folder(dir, out, clean, dedup, redact, load_config(config_path))
    except FedtuneError as err:
        Console(stderr=True).print(f"[red]error[/]: {err}", highlight=False)
        return USER_ERROR
    render_prepare(report, Console())
    return OK if report.records_out else NOT_USABLE
