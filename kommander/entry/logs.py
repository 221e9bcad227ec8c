"""``--log-format text|json`` and ``--log-level``: how a ``twistd kommander`` node logs.

twistd starts its log observer after ``makeService`` returned, and uses the application's
``ILogObserver`` component when it has one. The node's top service sets that component when it is
attached to the application, so both options work with twistd's own start-up and nothing logs
twice. JSON lines come from ``twisted.logger.jsonFileLogObserver`` (one event per line, every field
of the event, so the ``node``, ``p`` (partition) and ``term`` fields of Kommander's events are
there to filter on); text lines from ``textFileLogObserver``. Either goes to standard output; a
supervisor (systemd, a container runtime) collects it from there.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from twisted.application import service
from twisted.logger import (
    FilteringLogObserver,
    ILogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    jsonFileLogObserver,
    textFileLogObserver,
)

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warn", "error", "critical")


def make_observer(log_format: str, level: str, out: IO[str] | None = None) -> ILogObserver:
    """An observer writing events at ``level`` or above to ``out`` (standard output) in ``log_format``.

    :raises ValueError: an unknown format or level.
    """
    if log_format not in FORMATS:
        raise ValueError(f"log format {log_format!r}: use text or json")
    if level not in LEVELS:
        raise ValueError(f"log level {level!r}: use one of {', '.join(LEVELS)}")
    out = out if out is not None else sys.stdout
    # No record separator: plain JSON lines, as log shippers expect.
    base = jsonFileLogObserver(out, recordSeparator="") if log_format == "json" else textFileLogObserver(out)
    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.levelWithName(level))
    return FilteringLogObserver(base, [predicate])


class NodeServices(service.MultiService):
    """The node's top service; gives twistd's application the log observer, when one is asked for.

    :param observer: the observer to install, or ``None`` to leave twistd's own logging alone.
    """

    def __init__(self, observer: ILogObserver | None = None) -> None:
        super().__init__()
        self.observer = observer

    def setServiceParent(self, parent: Any) -> None:
        super().setServiceParent(parent)
        set_component = getattr(parent, "setComponent", None)
        if self.observer is not None and set_component is not None:
            set_component(ILogObserver, self.observer)
