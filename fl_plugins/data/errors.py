"""The one error type of the data layer.

Every :class:`DataError` message names the file or setting at fault and the bad value, so a site operator can fix
the data without reading a traceback (the CLI prints it as-is; the FLARE executor stops the job with it).
"""

from __future__ import annotations

__all__ = ["DataError"]


class DataError(ValueError):
    """Bad or missing data, datalist or site configuration.

    Subclasses :class:`ValueError` so callers that already handle configuration errors (``except ValueError``)
    also report data problems cleanly.
    """
