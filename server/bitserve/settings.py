"""One validated settings object, built once at the CLI and passed down whole.

Precedence, lowest to highest: defaults < YAML file < environment (``BITSERVE_`` prefix, ``__``
between nested keys, list items by index: ``BITSERVE_SERVER__PORT=6000``,
``BITSERVE_MODELS__0__QUANTIZE=int8``) < command-line flags.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from bitserve.errors import ConfigError
from bitserve.types import Task

ENV_PREFIX = "BITSERVE_"
QuantizeMode = Literal["none", "int8", "nf4", "fp4"]
_TENANT_NAME = re.compile(r"[A-Za-z0-9._\-]{1,64}")
_SIZE = re.compile(r"\d+(\.\d+)?[KMG]i?B")  # what accelerate parses: 500MB, 1.5GiB


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TenantSettings(_Strict):
    """One tenant's limits (frontend/tenants.py enforces them); each is off when unset."""

    requests_per_second: float | None = Field(
        None, gt=0, description="Inference RPCs per second, every task (a moving window of `burst`)."
    )
    burst: int | None = Field(
        None,
        ge=1,
        description=(
            "Most RPCs at once within the rate: `burst` calls per burst/requests_per_second "
            "seconds (rounded up to whole seconds). Default: requests_per_second, rounded up."
        ),
    )
    max_concurrent_sequences: int | None = Field(
        None, ge=1, description="Generation sequences queued or running at once, across models."
    )
    prompt_tokens_per_minute: int | None = Field(
        None, ge=1, description="Prompt tokens admitted per minute (a fixed one-minute window)."
    )
    generated_tokens_per_minute: int | None = Field(
        None,
        ge=1,
        description=(
            "Generated tokens per minute: a request reserves texts x max_new_tokens when admitted, "
            "and what it did not generate is given back when it finishes."
        ),
    )
    queue_share: float | None = Field(
        None,
        gt=0,
        le=1,
        description=(
            "Fraction of each generation model's room (max_queue_size + max_concurrent_sequences) "
            "this tenant's sequences may take: the rest stays free for the others."
        ),
    )

    @model_validator(mode="after")
    def _check_burst(self) -> TenantSettings:
        if self.burst is not None and self.requests_per_second is None:
            raise ValueError("burst needs requests_per_second")
        return self


class ServerSettings(_Strict):
    host: str = Field("0.0.0.0", description="Address the gRPC server binds.")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port; 0 picks a free port.")
    metrics_port: int = Field(
        8000, ge=-1, le=65535, description="Prometheus HTTP port; 0 picks a free one, -1 disables."
    )
    openai_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description=(
            "Port of the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, "
            "/v1/models) on `host`; unset (the default) turns it off, 0 picks a free port."
        ),
    )
    max_texts_per_request: int = Field(256, ge=1, description="Most texts one request may carry.")
    max_text_chars: int = Field(100_000, ge=1, description="Longest text accepted, in characters.")
    grace_period_s: float = Field(
        30.0,
        ge=0,
        description=(
            "On shutdown, time given to accepted requests to finish; meanwhile health answers "
            "NOT_SERVING and new inference calls get UNAVAILABLE (30 s, as Kubernetes' default)."
        ),
    )
    # Per-request limits, checked before any work (INVALID_ARGUMENT naming the limit).
    max_request_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1,
        description="Largest serialized request, in bytes: bounds texts x characters of one request.",
    )
    max_candidate_labels: int = Field(
        32, ge=2, description="Most candidate_labels one zero-shot Classify request may carry."
    )
    max_label_chars: int = Field(200, ge=1, description="Longest candidate label, in characters.")
    # Security.
    tls_cert_file: str | None = Field(None, description="PEM certificate chain: serve gRPC over TLS.")
    tls_key_file: str | None = Field(None, description="PEM private key of tls_cert_file.")
    tls_client_ca_file: str | None = Field(
        None, description="PEM CA bundle: require client certificates signed by it (mutual TLS)."
    )
    auth_tokens_file: str | None = Field(
        None, description="File of accepted bearer tokens, one per line: calls without one are refused."
    )
    auth_tokens_env: str | None = Field(
        None, description="Environment variable holding accepted bearer tokens (comma-separated)."
    )
    # Tenants (frontend/tenants.py): a token file line `<token> <tenant>` (an env item the same)
    # puts the token's callers in that tenant; without tenants everything behaves as before.
    tenants: dict[str, TenantSettings] = Field(
        default_factory=dict,
        description="Tenant name -> its limits; tokens name their tenant in auth_tokens_file/env.",
    )
    default_tenant: str | None = Field(
        None, description="Tenant of the tokens that name none (default: no tenant, no limits)."
    )
    auth_health: bool = Field(
        False, description="Require a token for grpc.health.v1 too (default: health stays open for probes)."
    )
    reflection: bool = Field(True, description="Serve gRPC server reflection.")
    expose_model_paths: bool = Field(True, description="Report checkpoint paths in ListModels' `path`.")
    metrics_host: str | None = Field(
        None, description="Address the Prometheus endpoint binds; default: the same as `host`."
    )
    workers: int = Field(32, ge=1, description="Threads for gRPC handlers' blocking work (tokenization).")
    log_level: str = Field("INFO", description="Python logging level.")
    engine_nice: int = Field(
        0,
        ge=0,
        le=19,
        description=(
            "Niceness the engine processes add to themselves at start (0: none): on a machine with "
            "few cores the front - health checks, refusals of a full queue, streaming - then gets "
            "a core first when both want one, and the engines take every cycle it leaves."
        ),
    )
    # Request limits that keep the front's event loop free (issue 17).
    max_stop_chars: int = Field(
        4096,
        ge=1,
        description="Most characters all of one request's `parameters.stop` strings may have together.",
    )
    max_chat_messages: int = Field(
        1024, ge=1, description="Most messages one Chat request may carry (counted before any rendering)."
    )
    # The engine watchdog (issue 17): every engine process is pinged; one that does not answer
    # (between two of its steps) is NOT_SERVING, and one that stays silent is killed and restarted.
    engine_heartbeat_s: float = Field(1.0, gt=0, description="How often the front pings each engine process.")
    engine_unresponsive_s: float = Field(
        30.0,
        gt=0,
        description=(
            "An engine process silent this long (no answer, no tokens) turns its models NOT_SERVING "
            "and new calls get UNAVAILABLE; generous, since it answers only between two steps and one "
            "long prefill on a small CPU takes seconds."
        ),
    )
    engine_hung_s: float = Field(
        120.0, gt=0, description="An engine process silent this long is killed and restarted like a dead one."
    )
    engine_max_restarts: int = Field(
        3, ge=0, description="Restarts of one engine process within engine_restart_window_s before giving up."
    )
    engine_restart_window_s: float = Field(
        600.0, gt=0, description="The window engine_max_restarts counts in."
    )
    exit_on_engine_failure: bool = Field(
        False,
        description=(
            "Exit the server (code 3) when an engine process has used up its restarts, so that an "
            "orchestrator replaces the pod; otherwise it keeps serving its other models, NOT_SERVING."
        ),
    )

    @model_validator(mode="after")
    def _check_watchdog(self) -> ServerSettings:
        if not self.engine_heartbeat_s < self.engine_unresponsive_s <= self.engine_hung_s:
            raise ValueError(
                "engine_heartbeat_s < engine_unresponsive_s <= engine_hung_s must hold, got "
                f"{self.engine_heartbeat_s}, {self.engine_unresponsive_s}, {self.engine_hung_s}"
            )
        return self

    @model_validator(mode="after")
    def _check_tls(self) -> ServerSettings:
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file and tls_key_file")
        for name in self.tenants:
            if not _TENANT_NAME.fullmatch(name):
                raise ValueError(f"tenants.{name}: a tenant name is letters, digits, '.', '_' or '-'")
        if self.default_tenant is not None and self.default_tenant not in self.tenants:
            raise ValueError(
                f"default_tenant: {self.default_tenant!r} is not defined in server.tenants "
                f"(defined: {', '.join(sorted(self.tenants)) or 'none'})"
            )
        return self


ADAPTER_NAME = re.compile(r"[A-Za-z0-9._\-]{1,128}")
# The adapter name a request gives for the base model itself (where a default_adapter is set).
BASE_ADAPTER = "base"


class ModelSettings(_Strict):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._\-]+$", description="Name clients use.")
    task: Task = Field(description="generate | classify | sentiment | translate.")
    path: str = Field(
        min_length=1,
        description="Local checkpoint directory, or a .gguf file (or a directory plus gguf_file).",
    )
    gguf_file: str | None = Field(None, description="GGUF file name inside `path`.")
    backend: Literal["auto", "head", "instruct"] = Field(
        "auto",
        description=(
            "How the task is served: 'head' uses the checkpoint's own task head "
            "(classifier, seq2seq); 'instruct' prompts an instruction-tuned causal LM; "
            "'auto' picks from the checkpoint's architecture."
        ),
    )
    quantize: QuantizeMode = Field("none", description="none | int8 | nf4 | fp4 (bitsandbytes).")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights/compute dtype; auto: bfloat16 on CUDA, float32 on CPU."
    )
    device: str = Field("auto", description="auto | cpu | cuda | cuda:N.")
    max_memory: dict[int | str, int | str] | None = Field(
        None,
        description=(
            "With device: auto, spread the model over devices with accelerate's device map, at most "
            "this much on each: GPU index (or cuda:N) or 'cpu' -> bytes or a size ('70GiB'), e.g. "
            "{0: 70GiB, 1: 70GiB, cpu: 200GiB}. Layers that fit nowhere are offloaded to disk "
            "(offload_dir). Unset: the whole model on one device."
        ),
    )
    offload_dir: str | None = Field(
        None, description="Where max_memory's disk overflow goes; default: the cache directory."
    )
    max_batch_size: int = Field(32, ge=1, description="Largest batch one forward pass takes.")
    max_batch_delay_ms: float = Field(5.0, ge=0, description="How long a batch waits to fill before it runs.")
    max_queue_size: int = Field(
        1024, ge=1, description="Texts waiting for this model beyond which requests are refused."
    )
    max_input_tokens: int | None = Field(
        None, ge=1, description="Longest input in tokens; default: the model's context."
    )
    # Generation (continuous batching) knobs.
    max_concurrent_sequences: int = Field(
        64, ge=1, description="Sequences decoding together in the running batch."
    )
    prefill_token_budget: int = Field(
        4096, ge=1, description="Prompt tokens admitted into the running batch per step."
    )
    max_waiting_ms: float = Field(
        0.0,
        ge=0,
        description="Longest a new request waits so that more can join its prefill (0: none).",
    )
    # The engine's persistent batch (slots written in place) and its KV-token budget.
    persistent_batch: bool = Field(
        True,
        description=(
            "Decode in the persistent batch (preallocated KV slots written in place) where the model "
            "allows it (SDPA, full attention); false: the copying batch for every model."
        ),
    )
    kv_cache_tokens: int = Field(
        0,
        ge=0,
        description=(
            "Most KV-cache tokens (slots x columns) the running batch may reserve; admission keeps "
            "within it. 0: max_concurrent_sequences x the model's context. On the CPU the buffers "
            "are allocated at this size at once as lazily zeroed memory (address space; pages "
            "become resident as rows write them: Linux's default overcommit), on a GPU they grow."
        ),
    )
    prefill_chunk_tokens: int = Field(
        512,
        ge=1,
        description=(
            "Prompts longer than this are prefilled in chunks of at most it, a decode step of the "
            "running rows between chunks (persistent batch only), so a long prompt does not stall "
            "them; beside running rows a chunk is sized so that its pass costs about one of their "
            "decode steps (at least 16 tokens)."
        ),
    )
    compile_decode: Literal["auto", "on", "off"] = Field(
        "auto",
        description=(
            "torch.compile the persistent batch's decode step (CPU: inductor, dynamic shapes; CUDA: "
            "CUDA graphs over bucketed batch sizes), compiled at start-up before the engine is "
            "ready. auto: only where bench/results/step-compile-cpu.json measured a gain (see "
            "docs/generation.md); bitsandbytes models stay eager."
        ),
    )
    default_max_new_tokens: int = Field(64, ge=1, description="max_new_tokens when unset.")
    max_new_tokens_limit: int = Field(1024, ge=1, description="Largest max_new_tokens a request may ask for.")
    # LoRA adapters served unmerged on this model's weights (docs/adapters.md).
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description=(
            "LoRA adapters: name -> directory (a `quantize finetune --method lora|qlora` output or a "
            "peft adapter: adapter_config.json + adapter_model.safetensors). A request names one in "
            "its `adapter` field; more are loaded at run time with the Admin service."
        ),
    )
    default_adapter: str = Field(
        "",
        description=(
            "One of `adapters`: what a request naming no adapter runs with (empty: the base model). "
            f"A request reaches the base model then by naming the reserved adapter {BASE_ADAPTER!r}."
        ),
    )
    max_resident_adapters: int = Field(
        8,
        ge=1,
        description=(
            "Adapters held on the device at once; beyond it the least recently used one no running "
            "row uses is evicted (a request for it reloads it from its directory)."
        ),
    )
    max_lora_rank: int = Field(64, ge=1, description="Largest LoRA rank r an adapter may have.")
    # Instruction-model adapters.
    labels: list[str] = Field(
        default_factory=list, description="Default labels for an instruct classify model."
    )

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, v: dict[str, str]) -> dict[str, str]:
        for name in v:
            if not ADAPTER_NAME.fullmatch(name):
                raise ValueError(f"adapter name {name!r}: use letters, digits, '.', '_' and '-'")
            if name == BASE_ADAPTER:
                raise ValueError(
                    f"adapter name {name!r} is reserved: a request naming it gets the base model"
                )
        return v

    @field_validator("max_memory", mode="before")
    @classmethod
    def _max_memory(cls, v: Any) -> Any:
        """Keys as accelerate wants them (GPU index int, or "cpu"); sizes checked here, not at load."""
        if not isinstance(v, Mapping):
            return v
        out: dict[int | str, int | str] = {}
        for key, size in v.items():
            k = str(key).strip().lower().removeprefix("cuda:")
            if not (k.isdigit() or k == "cpu"):
                raise ValueError(f"key {key!r} must be a GPU index (0, 1, ... or cuda:N) or 'cpu'")
            if isinstance(size, bool) or not (
                (isinstance(size, int) and size > 0)
                or (isinstance(size, str) and _SIZE.fullmatch(size.strip()))
            ):
                raise ValueError(f"{key}: {size!r} is not a size; use bytes or e.g. '500MB', '1.5GiB'")
            out[int(k) if k.isdigit() else k] = size.strip() if isinstance(size, str) else size
        if not out:
            raise ValueError("give at least one device, e.g. {0: 70GiB, cpu: 100GiB}")
        return out

    @model_validator(mode="after")
    def _check(self) -> ModelSettings:
        if self.device != "auto" and not (
            self.device == "cpu" or self.device == "cuda" or self.device.startswith("cuda:")
        ):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.max_memory is not None and self.device != "auto":
            raise ValueError(
                f"max_memory spreads the model over devices: it needs device: auto, not {self.device!r}"
            )
        if self.default_adapter and self.default_adapter not in self.adapters:
            raise ValueError(
                f"default_adapter: {self.default_adapter!r} is not one of this model's adapters "
                f"(configured: {', '.join(sorted(self.adapters)) or 'none'})"
            )
        return self


class Settings(_Strict):
    server: ServerSettings = Field(default_factory=ServerSettings)
    models: list[ModelSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique_names(self) -> Settings:
        if not self.models:
            raise ValueError("models: at least one model is required (a server with none serves nothing)")
        seen: set[str] = set()
        for m in self.models:
            if m.name in seen:
                raise ValueError(f"duplicate model name {m.name!r}")
            seen.add(m.name)
        return self

    def check_paths(self, base: Path | None = None) -> None:
        """Fail early, before any model loads, when a checkpoint path does not exist."""
        for i, m in enumerate(self.models):
            p = Path(m.path)
            if not p.is_absolute() and base is not None:
                p = base / p
                m.path = str(p)
            if not p.exists():
                raise ConfigError(f"models.{i}.path: {m.path!r} does not exist")
            if m.gguf_file and not (p / m.gguf_file).is_file():
                raise ConfigError(f"models.{i}.gguf_file: {m.gguf_file!r} not found in {m.path}")
            for name, ap in list(m.adapters.items()):
                q = Path(ap)
                if not q.is_absolute() and base is not None:
                    q = base / q
                    m.adapters[name] = str(q)
                if not (q / "adapter_config.json").is_file():
                    raise ConfigError(f"models.{i}.adapters.{name}: {str(q)!r} has no adapter_config.json")


def _deep_merge(base: Any, over: Any) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _deep_merge(out.get(k), v) if k in out else v
        return out
    if isinstance(base, list) and isinstance(over, dict) and all(str(k).isdigit() for k in over):
        out_list = list(base)
        for k, v in over.items():
            idx = int(k)
            if idx >= len(out_list):
                raise ConfigError(f"models.{idx}: no such model entry to override")
            out_list[idx] = _deep_merge(out_list[idx], v)
        return out_list
    return over


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in environ.items():
        if not key.startswith(ENV_PREFIX) or key == ENV_PREFIX + "CONFIG":
            continue
        parts = [p.lower() for p in key[len(ENV_PREFIX) :].split("__")]
        if parts[0] not in Settings.model_fields:
            continue  # other BITSERVE_* variables (e.g. BITSERVE_CACHE_DIR) are not settings
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        # YAML parsing gives env values the same types as the file ("8001" -> 8001).
        node[parts[-1]] = yaml.safe_load(value) if value != "" else ""
    return out


def _format_error(err: ValidationError) -> str:
    """Every problem on one line, each naming its key."""
    out = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        out.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(out)


def build_settings(
    config_path: str | Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    config_data: Mapping[str, Any] | None = None,
    check_paths: bool = True,
) -> Settings:
    """File (or `config_data`) + env + flag overrides -> validated Settings, or ConfigError."""
    environ = os.environ if environ is None else environ
    base_dir: Path | None = None
    data: Any = dict(config_data or {})
    if config_path is not None:
        path = Path(config_path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {str(path)!r} not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(
                f"config file {str(path)!r} is not valid YAML: {e}".replace("\n", " ")
            ) from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r}: top level must be a mapping")
        base_dir = path.parent.resolve()
    data = _deep_merge(data, _env_overrides(environ))
    if overrides:
        data = _deep_merge(data, dict(overrides))
    try:
        settings = Settings.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_error(e)) from None
    if check_paths:
        settings.check_paths(base_dir)
    return settings
