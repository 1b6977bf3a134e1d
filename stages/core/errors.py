"""The project's own error types.

Every failure a person can fix (bad config, bad corpus, missing artifact) raises a
``GptpipeError`` whose message is one line: what is wrong, where, and what to do.
The CLI prints that line and exits non-zero instead of showing a traceback.
"""


class GptpipeError(Exception):
    """Base class: a problem the user can act on, described in one line."""


class ConfigError(GptpipeError):
    """A recipe or override names an unknown field or holds a value that is not allowed."""


class DataError(GptpipeError):
    """A corpus or dataset cannot be used as given (empty, unreadable, malformed)."""


class ArtifactError(GptpipeError):
    """An artifact is missing, incomplete, or does not match its recorded hashes."""


class TrackingError(GptpipeError):
    """The MLflow tracking server cannot be reached (checked before any work starts).

    ``transient`` tells the orchestrator a later attempt may succeed: a server that is
    restarting answers again a minute later.
    """

    def __init__(self, message: str, transient: bool = True):
        super().__init__(message)
        self.transient = transient


class TrainingError(GptpipeError):
    """Training cannot continue (for example the loss became NaN)."""


class ContainerError(GptpipeError):
    """A stage sent to its own container (a flow run of its deployment) did not finish or hand back its output."""


class ParityError(GptpipeError):
    """An exported graph disagrees with the PyTorch model beyond the allowed tolerance."""
