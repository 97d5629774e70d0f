"""Python client for bitserve: `Client`, `AsyncClient`, typed results and errors.

from bitserve_client import Client
with Client("localhost:50051") as c:
    print(c.generate("Hello", max_new_tokens=16).text)
"""

from .client import (
    AsyncClient,
    Client,
    Generation,
    LabelScore,
    ModelInfo,
    Sentiment,
    StreamEvent,
    TokenLogprob,
    Translation,
)
from .errors import (
    BitserveError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)

__all__ = [
    "AsyncClient",
    "Client",
    "Generation",
    "LabelScore",
    "ModelInfo",
    "Sentiment",
    "StreamEvent",
    "TokenLogprob",
    "Translation",
    "BitserveError",
    "CancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
]
