"""What the user sees of a run's Flower log (`flwr run --stream`): every line but two kinds.

1. Lines Flower 1.41's simulation process prints on every run that do not apply to `fedtune
   simulate` (which sets the number of simulated sites from the scenario). Each is matched whole,
   by its exact text: no other line is dropped.
2. The traceback Flower logs when the ServerApp raises a fedtune user error (a FedtuneError), and
   the exit notice after it: the CLI states that error in one paragraph instead, as for any user
   error. Tracebacks of anything else (a bug) are shown. The full log is kept in a file beside.
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field

from common.core.errors import FedtuneError

ANSI = re.compile(r"\x1b\[[0-9;]*m")
KNOWN_HARMLESS = tuple(
    re.compile(p)
    for p in (
        # flwr/simulation/app.py logs these unconditionally; the scenario sets the size.
        r"^WARNING\s*:\s+Since flwr 1\.32, default simulated SuperNodes changed from 10 to 2\.$",
        r"^INFO\s*:\s+To change federation size, use the following command:$",
        r"^INFO\s*:\s+flwr federation simulation-config \S+ <superlink> --num-supernodes <N>$",
        # flwr/simulation/ray_transport/ray_actor.py, when the run ends and its actors stop (in
        # Flower's format or in that of the root handler opacus installs in each site process).
        r"^\(ClientAppActor pid=\d+\) (WARNING\s*:\s+|[\d/]+ [\d:]+:WARNING:)"
        r"Manually terminating ClientAppActor$",
    )
)
# What flwr-simulation prints as it exits after a ServerApp exception (exit code 700): after a
# fedtune user error, which the CLI states itself, it is dropped too.
AFTER_USER_ERROR = tuple(
    re.compile(p)
    for p in (
        r"^ERROR\s*:\s+Exit Code: 700$",
        r"^$",
        r"^An unhandled exception occurred when running the simulation\.$",
        r"^For more information, visit: <https://flower\.ai/docs/framework/[\w.]+/en/"
        r"ref-exit-codes/700\.html>$",
    )
)
# An ERROR record that a traceback may follow: Flower's console format, or the one of the root
# handler opacus installs at import (`logging.basicConfig` in opacus/utils/module_utils.py).
ERROR_RECORD = re.compile(r"^(ERROR\s*:|\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:ERROR:)")
CHAIN = ("During handling of the above exception", "The above exception was the direct cause")
EXCEPTION_LINE = re.compile(r"^(?P<cls>[A-Za-z_][\w.]*): (?P<msg>.*)$")
FEDTUNE_PACKAGES = ("common.", "server.", "client.", "simulations.")


def plain(line: str) -> str:
    """The line without terminal colours or its newline."""
    return ANSI.sub("", line).rstrip("\r\n")


def fedtune_error(qualified: str) -> type[FedtuneError] | None:
    """The FedtuneError subclass a traceback names (``common.core.errors.ModelError``), if any."""
    module, _, name = qualified.rpartition(".")
    if not module.startswith(FEDTUNE_PACKAGES) and module not in ("common", "server"):
        return None
    try:
        cls = getattr(importlib.import_module(module), name, None)
    except ImportError:
        return None
    return cls if isinstance(cls, type) and issubclass(cls, FedtuneError) else None


@dataclass
class FlowerLog:
    """Feed it the log's lines (:meth:`feed`, then :meth:`finish`); it returns those to show.

    ``user_error`` is the FedtuneError class of a withheld traceback and ``user_message`` what
    it says; ``failure`` the last line of a shown one (what a bug raised).
    """

    user_error: type[FedtuneError] | None = None
    user_message: str = ""
    failure: str = ""
    _held: list[str] = field(default_factory=list)  # an ERROR record, then its traceback
    _traceback: bool = False
    _raised: bool = False  # the traceback reached its exception line

    def feed(self, line: str) -> list[str]:
        text = plain(line)
        if self._traceback:
            if self._continues(text):
                self._held.append(line)
                return []
            return self._end_traceback() + self.feed(line)
        if text == "Traceback (most recent call last):":
            self._traceback, self._raised = True, False
            self._held.append(line)
            return []
        shown, self._held = self._held, []  # an ERROR record with no traceback after it
        if any(p.match(text) for p in KNOWN_HARMLESS):
            return shown
        if self.user_error and any(p.match(text) for p in AFTER_USER_ERROR):
            return shown
        if ERROR_RECORD.match(text):
            return shown + self._hold(line)
        return [*shown, line]

    def finish(self) -> list[str]:
        shown = self._end_traceback() if self._traceback else []
        shown, self._held = shown + self._held, []
        return shown

    def _hold(self, line: str) -> list[str]:
        self._held = [line]
        return []

    def _continues(self, text: str) -> bool:
        """Frames are indented; a message may go on indented; chained tracebacks restart."""
        if not text or text[0].isspace() or text.startswith(CHAIN):
            return True
        if text == "Traceback (most recent call last):":
            self._raised = False
            return True
        if not self._raised and EXCEPTION_LINE.match(text):
            self._raised = True
            return True
        return False

    def _end_traceback(self) -> list[str]:
        block, self._held, self._traceback = self._held, [], False
        lines = [plain(line) for line in block]
        raised = [(i, m) for i, text in enumerate(lines) if (m := EXCEPTION_LINE.match(text))]
        if not raised:
            return block
        at, last = raised[-1]  # the outermost of a chain is printed last
        cls = fedtune_error(last["cls"])
        if cls is None:
            self.failure = last.group(0)
            return block
        self.user_error = cls
        self.user_message = "\n".join([last["msg"], *lines[at + 1 :]]).rstrip()
        return []
