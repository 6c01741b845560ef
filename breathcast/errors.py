"""The project's exceptions. Their messages are one line that says what was wrong and what to do."""

__all__ = ["BreathcastError", "DatasetError", "PlanRejected"]


class BreathcastError(Exception):
    """Bad input or a failed precondition; the CLI prints the message alone and exits with code 2."""


class DatasetError(BreathcastError):
    """A dataset on disk is missing a file or holds something inconsistent; the message names the file."""


class PlanRejected(BreathcastError):
    """A planning CT outside what the model knows (lungs missing or cut, implausible HU, unknown orientation).

    The message is the reason; the daemon holds the gate with reason ``plan_rejected`` and reports it in status.
    """
