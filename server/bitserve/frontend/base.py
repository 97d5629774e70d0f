"""The engine interface: one small interface per task, and a registry keyed by task/backend.

An engine is the front half of one served model: it validates and tokenizes (off the event
loop), sends the work to the engine process that owns the weights (`self.core`), and turns what
comes back into results. The model half lives in the engine process (`bitserve.engine.heads`:
a task head's runner, or the shared generation scheduler). The servicer
resolves the engine for a request through `registry.ModelRegistry` and calls the one task
method below; it never sees torch.
"""

from __future__ import annotations

import abc
import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, ClassVar

from bitserve.errors import InvalidArgument
from bitserve.frontend.batching import BatchHooks, DynamicBatcher
from bitserve.metrics import Metrics
from bitserve.models.loaded import LoadedModel
from bitserve.settings import ModelSettings

if TYPE_CHECKING:
    from bitserve.ipc.client import EngineClient

from bitserve.types import (
    Generation,
    LabelScore,
    ModelInfo,
    SamplingParams,
    SentimentResult,
    StreamChunk,
    Task,
    TokenPrompt,
    Translation,
)


class Engine(abc.ABC):
    task: ClassVar[Task]
    backend: ClassVar[str] = "head"
    # True: the engine process serves this model with its shared generation scheduler (a
    # causal LM); False: with `runner(...)`, batches of this engine's items.
    uses_scheduler: ClassVar[bool] = False

    def __init__(self, settings: ModelSettings, loaded: LoadedModel, metrics: Metrics, core: EngineClient):
        """`loaded`: the front's view of the checkpoint (tokenizer and config, no weights)."""
        self.settings = settings
        self.loaded = loaded
        self.metrics = metrics
        self.core = core
        # LoRA adapters of this model as the engine last reported them (ListModels); the
        # engine itself decides what a request may use.
        self.adapters: list[dict[str, Any]] = []
        self.name = settings.name
        self.ready = False
        # Tokenization runs here, not on the event loop (but see `tokenize_checked`); one thread
        # per engine, since a fast tokenizer must not be used from two threads at once.
        self._tokenize_pool = _TokenizePool(f"tokenize-{settings.name}")
        self.max_input_tokens = min(settings.max_input_tokens or loaded.max_context, loaded.max_context)

    async def start(self) -> None:
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        self._tokenize_pool.shutdown(wait=False)

    async def off_loop(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` on this engine's tokenization thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn, *args)

    @property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer (front side: encode, chat templates, decode)."""
        return self.loaded.tokenizer

    @property
    def labels(self) -> list[str]:
        return []

    def info(self) -> ModelInfo:
        lm = self.loaded
        return ModelInfo(
            name=self.name,
            task=self.task,
            quantization=lm.quantization,
            dtype=str(lm.dtype).removeprefix("torch."),
            device=str(lm.device),
            parameter_count=lm.parameter_count,
            memory_bytes=lm.memory_bytes,
            labels=self.labels,
            architecture=lm.architecture,
            max_context=self.max_input_tokens,
            ready=self.ready and self.core.ready,
            path=lm.path,
            quality_report_json=lm.quality_report_json,
            engine=getattr(self.core, "id", ""),
            device_map=dict(lm.device_map),
            adapters=list(self.adapters),
        )

    def hooks(self) -> BatchHooks:
        return _MetricHooks(self.metrics, self.name, self.task.value)

    def resolve_max_new_tokens(self, requested: int | None) -> int:
        """A request's max_new_tokens (0/None: the model's default), checked against its limit."""
        n = requested or self.settings.default_max_new_tokens
        limit = self.settings.max_new_tokens_limit
        if n > limit:
            raise InvalidArgument(
                f"max_new_tokens must be <= {limit} (model {self.name!r} generates at most {limit} "
                f"new tokens per request), got {n}"
            )
        return n

    async def tokenize_checked(
        self, texts: Sequence[str | TokenPrompt], add_special_tokens: bool = True
    ) -> list[list[int]]:
        """Token ids per text (off the event loop; a TokenPrompt is tokenized already);
        INVALID_ARGUMENT naming the text when one is over the limit."""
        plain = [t for t in texts if isinstance(t, str)]
        if (
            plain
            and sum(map(len, plain)) <= INLINE_TOKENIZE_CHARS
            and self._tokenize_pool.idle()
            and _plain_backend(self.loaded.tokenizer) is not None
        ):
            # A short input through the Rust tokenizer encodes in microseconds, less than the hop
            # to the tokenization thread and back (bench/classify.py); with that thread idle,
            # nothing queued there is passed and no other thread uses the tokenizer meanwhile.
            encoded = iter(encode(self.loaded.tokenizer, plain, add_special_tokens))
        else:
            encoded = iter(
                await self.off_loop(encode, self.loaded.tokenizer, plain, add_special_tokens) if plain else ()
            )
        ids = [list(t.ids) if isinstance(t, TokenPrompt) else next(encoded) for t in texts]
        self.check_lengths(texts, ids)
        return ids

    def check_lengths(self, texts: Sequence[str | TokenPrompt], ids: list[list[int]]) -> None:
        for i, (text, t) in enumerate(zip(texts, ids, strict=True)):
            if len(t) > self.max_input_tokens:
                raise InvalidArgument(
                    f"{prompt_name(text, i)} is {len(t)} tokens; model {self.name!r} accepts at most "
                    f"{self.max_input_tokens} input tokens"
                )


# Inputs up to this many characters are tokenized on the event loop when the tokenization thread
# is idle: a few hundred tokens, tens of microseconds in the Rust tokenizer.
INLINE_TOKENIZE_CHARS = 2048


class _TokenizePool(ThreadPoolExecutor):
    """The one tokenization thread of an engine, knowing whether anything is queued or running."""

    def __init__(self, name: str):
        super().__init__(1, thread_name_prefix=name)
        self._lock = threading.Lock()
        self._pending = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            self._pending += 1
        try:
            fut = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._done(None)
            raise
        fut.add_done_callback(self._done)
        return fut

    def _done(self, _: Any) -> None:
        with self._lock:
            self._pending -= 1

    def idle(self) -> bool:
        return self._pending == 0


def prompt_name(text: str | TokenPrompt, i: int, what: str = "texts") -> str:
    """How an error names a request's i-th prompt: `texts[i]`, or what a TokenPrompt says."""
    return text.what if isinstance(text, TokenPrompt) else f"{what}[{i}]"


def encode(tokenizer: Any, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids of `texts`, as `tokenizer(texts)["input_ids"]` gives them.

    For fast tokenizers in their plain state (no padding/truncation set on the Rust backend) this
    calls the backend's `encode_batch` directly: the transformers wrapper around it costs most of
    the time, and the Rust call releases the GIL while it works.
    """
    backend = _plain_backend(tokenizer)
    if backend is not None:
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def _plain_backend(tokenizer: Any) -> Any:
    """A fast tokenizer's Rust backend when it is in its plain state (no padding/truncation set)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and backend.padding is None and backend.truncation is None:
        return backend
    return None


class BatchedEngine(Engine):
    """An engine whose model work goes through one DynamicBatcher: `process_batch` gets the
    items of many requests at once and returns one result per item (by default: the engine
    process runs them with this model's `runner`)."""

    def __init__(self, settings: ModelSettings, loaded: LoadedModel, metrics: Metrics, core: EngineClient):
        super().__init__(settings, loaded, metrics, core)
        self._batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
            self.process_batch,
            max_batch_size=settings.max_batch_size,
            max_batch_delay_ms=settings.max_batch_delay_ms,
            max_queue_size=settings.max_queue_size,
            name=settings.name,
            hooks=self.hooks(),
        )

    async def process_batch(self, batch: list[Any]) -> list[Any]:
        from bitserve.ipc import protocol

        return list(await self.core.call(protocol.BATCH, self.name, batch))

    async def start(self) -> None:
        self._batcher.start()
        await super().start()

    async def stop(self) -> None:
        await super().stop()
        await self._batcher.stop()


class ClassifyEngine(Engine):
    task = Task.CLASSIFY
    multi_label: bool = False

    @abc.abstractmethod
    async def classify(
        self,
        texts: list[str],
        *,
        top_k: int | None,
        candidate_labels: list[str],
        deadline: float | None,
        adapter: str = "",
    ) -> list[list[LabelScore]]: ...


class SentimentEngine(Engine):
    task = Task.SENTIMENT

    @abc.abstractmethod
    async def sentiment(
        self, texts: list[str], *, deadline: float | None, adapter: str = ""
    ) -> list[SentimentResult]: ...


class TranslateEngine(Engine):
    task = Task.TRANSLATE

    @abc.abstractmethod
    async def translate(
        self,
        texts: list[str],
        *,
        source_lang: str | None,
        target_lang: str | None,
        max_new_tokens: int | None,
        deadline: float | None,
        adapter: str = "",
    ) -> list[Translation]: ...


class GenerateEngine(Engine):
    task = Task.GENERATE

    @abc.abstractmethod
    async def generate(
        self, texts: Sequence[str | TokenPrompt], params: SamplingParams, *, deadline: float | None
    ) -> list[Generation]: ...

    @abc.abstractmethod
    def generate_stream(
        self, text: str | TokenPrompt, params: SamplingParams, *, deadline: float | None
    ) -> AsyncIterator[StreamChunk]: ...


class _MetricHooks(BatchHooks):
    def __init__(self, metrics: Metrics, model: str, task: str):
        self._batch = metrics.batch_size.labels(model, task)
        self._wait = metrics.queue_wait.labels(model, task)
        self._depth = metrics.queue_depth.labels(model, task)

    def on_batch(self, size: int) -> None:
        self._batch.observe(size)

    def on_queue_wait(self, seconds: float) -> None:
        self._wait.observe(seconds)

    def on_queue_depth(self, depth: int) -> None:
        self._depth.set(depth)


# registry -------------------------------------------------------------------------------------
EngineFactory = type[Engine]
_ENGINES: dict[tuple[Task, str], EngineFactory] = {}


def register(cls: EngineFactory) -> EngineFactory:
    """Class decorator: make an engine available for (its task, its backend)."""
    _ENGINES[(cls.task, cls.backend)] = cls
    return cls


def engine_class(task: Task, backend: str) -> EngineFactory:
    try:
        return _ENGINES[(task, backend)]
    except KeyError:
        known = sorted(f"{t.value}/{b}" for t, b in _ENGINES)
        raise InvalidArgument(
            f"no engine serves task {task.value!r} with backend {backend!r}; known: {known}"
        ) from None


def registered() -> dict[tuple[Task, str], EngineFactory]:
    return dict(_ENGINES)
