"""What the commands share: one-line errors, log lines, and the final-error file of the launchers.

A mistake no restart can fix (a bad config key, a missing folder, a checkpoint of another run) must
stop a job once. Under torchrun a worker that exits non-zero makes the agent restart the whole group
(up to MAX_RESTARTS times), each restart failing the same way. So when launch/*.sh sets
TADA_DIST_ERROR_FILE, such an error is written there and the worker exits 0; the launcher then sees
the file, prints nothing more and exits 2. Without the launchers the worker exits 2.
"""

from __future__ import annotations

import logging
import os
import sys

ERROR_FILE_ENV = "TADA_DIST_ERROR_FILE"
USAGE_ERROR_EXIT = 2


def reporting_rank() -> bool:
    """Whether this process speaks for the job (rank 0, or a process outside torchrun)."""
    return os.environ.get("RANK", "0") == "0"


def fail(prog: str, error: BaseException | str) -> int:
    """Report a mistake that no restart can fix; the exit code to return (see the module docstring)."""
    message = f"{prog}: error: {error}"
    if reporting_rank():
        print(message, file=sys.stderr, flush=True)
    error_file = os.environ.get(ERROR_FILE_ENV)
    if error_file:
        if os.environ.get("LOCAL_RANK", "0") == "0":  # one writer per node
            with open(error_file, "w") as handle:
                handle.write(message + "\n")
        return 0
    return USAGE_ERROR_EXIT


class _LineFormatter(logging.Formatter):
    """`prog: message` for information, `prog: warning: message` for warnings and worse."""

    def __init__(self, prog: str):
        super().__init__()
        self.prog = prog

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"{self.prog}: {level}{record.getMessage()}"


def setup_logging(prog: str) -> None:
    """tada_dist's log records as plain lines on stderr (notices and warnings, never on stdout); MLflow's
    artifact progress bars off unless TADA_DIST_VERBOSE=1."""
    if os.environ.get("TADA_DIST_VERBOSE") != "1":
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LineFormatter(prog))
    package_logger = logging.getLogger("tada_dist")
    package_logger.handlers[:] = [handler]
    package_logger.setLevel(logging.INFO)
    package_logger.propagate = False
