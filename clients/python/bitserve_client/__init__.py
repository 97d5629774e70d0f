"""Python client for bitserve: `Client`, `AsyncClient`, typed results and errors.

from bitserve_client import Client
with Client("localhost:50051") as c:
    print(c.generate("Hello", max_new_tokens=16).text)

The generated stubs of the contract are the `bitserve_proto` package of the same distribution.
"""

from .calls import ClassifyOptions, GenerationOptions, Message, SentimentOptions, TranslateOptions
from .client import AsyncClient, Client
from .contract import REVISION as CONTRACT_REVISION
from .contract import client_version
from .errors import (
    BitserveError,
    CancelledError,
    DeadlineExceededError,
    FailedPreconditionError,
    IncompatibleServerError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
    UnimplementedError,
)
from .results import (
    AdapterInfo,
    Generation,
    LabelScore,
    ModelInfo,
    Sentiment,
    ServerInfo,
    StreamEvent,
    TokenLogprob,
    TopLogprob,
    Translation,
)
from .tokens import Tokens

__version__ = client_version()

__all__ = [
    "CONTRACT_REVISION",
    "AsyncClient",
    "Client",
    "ClassifyOptions",
    "GenerationOptions",
    "Message",
    "SentimentOptions",
    "TranslateOptions",
    "AdapterInfo",
    "Generation",
    "LabelScore",
    "ModelInfo",
    "Sentiment",
    "ServerInfo",
    "StreamEvent",
    "TokenLogprob",
    "TopLogprob",
    "Tokens",
    "Translation",
    "BitserveError",
    "CancelledError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "IncompatibleServerError",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "ResourceExhaustedError",
    "UnauthenticatedError",
    "UnavailableError",
    "UnimplementedError",
]
