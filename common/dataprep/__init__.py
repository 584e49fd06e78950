"""Data preparation a site operator can trust: check, clean, de-duplicate and redact records.

Everything runs on-site; reports hold counts and positions (file, line), never record contents.
"""

from common.dataprep.check import check_folder
from common.dataprep.onthefly import prepare_records
from common.dataprep.prepare import prepare_folder
from common.dataprep.report import CheckReport, PrepareReport

__all__ = [
    "CheckReport",
    "PrepareReport",
    "check_folder",
    "prepare_folder",
    "prepare_records",
]
