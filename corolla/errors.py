"""Named errors a person can act on. Every message says what was wrong and, where possible, what to do."""


class CorollaError(Exception):
    """Base class of all errors raised by Corolla on purpose."""


class NotAModelError(CorollaError):
    """A path given as a model is not a Hugging Face-format model directory."""


class UnsupportedModelError(CorollaError):
    """The model's `model_type` has no adapter in corolla/models."""


class MissingBlocksError(CorollaError):
    """No server in the swarm serves some blocks (within the configured wait)."""

    def __init__(self, missing: list[tuple[int, int]], waited_s: float, message: str | None = None):
        self.missing = missing
        ranges = ", ".join(f"{a}..{b - 1}" for a, b in missing)
        if message is None:
            message = (f"no server in the swarm serves blocks {ranges} (waited {waited_s:.1f} s); start a server "
                       f"for them, e.g. `corolla server MODEL --blocks {missing[0][0]}:{missing[0][1]}`")
        else:
            message = f"{message} (waited {waited_s:.1f} s)"
        super().__init__(message)


class RemoteError(CorollaError):
    """A server answered a request with an error, or failed while serving it."""

    def __init__(self, peer: str, blocks: tuple[int, int], message: str):
        self.peer, self.blocks = peer, blocks
        super().__init__(f"server {peer} (blocks {blocks[0]}..{blocks[1] - 1}): {message}")


class BadRequestError(CorollaError):
    """A request or message failed validation. Raised on the server, sent back to the client as an error."""


class CacheFullError(CorollaError):
    """The server's attention cache has no room for this session within the allowed wait."""


class EditError(CorollaError):
    """A hidden-state edit (client/edits.py) does not fit the request: its layer, positions or values."""
