"""What an engine process runs for the models it serves, built from its spec.

One checkpoint is loaded once. Every model entry on it that a causal LM answers (generate, and
the instruct adapters: classify/sentiment label scoring, translate) shares one generation
scheduler; an entry with its own task head (a sequence classifier, a seq2seq translator) gets a
batch runner (`Engine.runner`).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from bitserve.engine.heads import BatchRunner, model_half
from bitserve.engine.sched.scheduler import Scheduler
from bitserve.engine.worker.lora import LoraBank
from bitserve.engine.worker.model_runner import CausalLM
from bitserve.errors import FailedPrecondition, InvalidArgument, NotFound
from bitserve.models.backends import resolve_backend
from bitserve.models.loaded import front_info
from bitserve.models.loading import LoadedModel, load_checkpoint
from bitserve.settings import ModelSettings

log = logging.getLogger(__name__)


class Workers:
    def __init__(
        self,
        loaded: LoadedModel,
        models: list[ModelSettings],
        runners: dict[str, BatchRunner],
        scheduler: Scheduler | None,
        lm: CausalLM | None,
    ):
        self.loaded = loaded
        self.models = models
        self.runners = runners
        self.scheduler = scheduler
        self.lm = lm

    def score(self, prompts: list[list[int]], conts: list[list[list[int]]]) -> list[list[float]]:
        if self.lm is None:
            raise InvalidArgument("this engine has no causal LM to score labels with")
        return self.lm.score(prompts, conts)

    def run_batch(self, model: str, items: list[Any]) -> list[Any]:
        return self.runners[model].run_batch(items)

    # LoRA adapters (the Admin service) ----------------------------------------------------------
    def adapter_op(self, op: str, args: list[Any]) -> Any:
        """["load", model, name, path] | ["unload", model, name] | ["list", model]: between
        steps, on the engine's loop (running rows never see a half-loaded adapter)."""
        model = args[0]
        bank = self._bank(model)
        if op == "list":
            return adapter_list(bank, model)
        key = f"{model}:{args[1]}"
        if op == "load":
            ad = bank.register(key, args[2])
            assert self.scheduler is not None
            slot = bank.acquire(key, self.scheduler.adapters_in_use(), ad)
            return {"resident": slot is not None, "rank": ad.rank, "bytes": ad.nbytes}
        if op == "unload":
            assert self.scheduler is not None
            bank.forget(key)
            in_use = self.scheduler.adapters_in_use()
            running = sum(1 for s in self.scheduler.running if s.adapter == key)
            bank.free_unused(in_use)
            return {"running": running}
        raise InvalidArgument(f"unknown adapter operation {op!r}")

    def _bank(self, model: str) -> LoraBank:
        if not any(m.name == model for m in self.models):
            raise NotFound(f"model {model!r} is not served by this engine")
        if self.lm is None or self.lm.lora is None:
            raise FailedPrecondition(
                f"model {model!r} has its own task head; LoRA adapters are served on causal LMs"
            )
        return self.lm.lora

    def info(self) -> dict[str, Any]:
        lm = self.loaded
        return {
            "path": lm.path,
            "pid": os.getpid(),
            "memory_bytes": lm.memory_bytes,
            "parameter_count": lm.parameter_count,
            "dtype": str(lm.dtype).removeprefix("torch."),
            "device": str(lm.device),
            "quantization": lm.quantization,
            "architecture": lm.architecture,
            "max_context": lm.max_context,
            "checkpoint_dir": lm.source or lm.path,
            "quality_report_json": lm.quality_report_json,
            "device_map": lm.device_map,
            "batch_path": self.scheduler.path if self.scheduler is not None else None,
            "adapters": {m.name: adapter_list(self.lm.lora, m.name) for m in self.models}
            if self.lm is not None and self.lm.lora is not None
            else {},
            "compiled_decode": self.lm is not None and self.lm.compiled is not None,
            **front_info(lm.model, lm.tokenizer),
        }


def load(settings: ModelSettings) -> LoadedModel:
    """The checkpoint of `settings`, loaded with the model class its task and backend need."""
    return load_checkpoint(
        settings.path,
        model_half(settings.task, resolve_backend(settings)).model_class(),
        quantize=settings.quantize,
        dtype=settings.dtype,
        device=settings.device,
        gguf_file=settings.gguf_file,
        max_memory=settings.max_memory,
        offload_dir=settings.offload_dir,
    )


def build_workers(spec: dict[str, Any]) -> Workers:
    models = [ModelSettings(**m) for m in spec["models"]]
    return workers_for(load(models[0]), models, spec["engine"])


def workers_for(loaded: LoadedModel, models: list[ModelSettings], name: str = "engine") -> Workers:
    """The workers for `models`, all served from the already loaded `loaded`."""
    runners: dict[str, BatchRunner] = {}
    sched_models: list[ModelSettings] = []
    for m in models:
        half = model_half(m.task, resolve_backend(m))
        if half.runner is None:
            sched_models.append(m)
        else:
            runners[m.name] = half.runner(loaded)
    scheduler = lm = None
    if sched_models:
        lm = CausalLM(loaded.model, loaded.tokenizer, loaded.device, max_context=loaded.max_context)
        scheduler = Scheduler(
            lm,
            max_concurrent=max(m.max_concurrent_sequences for m in sched_models),
            prefill_token_budget=max(m.prefill_token_budget for m in sched_models),
            max_waiting_ms=max(m.max_waiting_ms for m in sched_models),
            name=name,
            persistent=all(m.persistent_batch for m in sched_models),
            kv_cache_tokens=max(m.kv_cache_tokens for m in sched_models),
            prefill_chunk_tokens=max(m.prefill_chunk_tokens for m in sched_models),
        )
        lm.lora = LoraBank(
            loaded.model,
            capacity=max(m.max_resident_adapters for m in sched_models),
            max_rank=max(m.max_lora_rank for m in sched_models),
        )
        for m in sched_models:
            for adapter, path in m.adapters.items():
                key = f"{m.name}:{adapter}"
                ad = lm.lora.register(key, path)
                lm.lora.acquire(key, set(), ad)  # the first `capacity` stay resident
        if scheduler.slots is not None:
            modes = {m.compile_decode for m in sched_models}
            setting = "on" if "on" in modes else "auto" if "auto" in modes else "off"
            why = lm.use_compiled(setting, loaded.quantization)
            if lm.compiled is not None:
                t0 = time.monotonic()
                try:
                    lm.warm_up(scheduler.slots)  # before READY: no request waits for a compile
                except Exception:
                    # E.g. no C++ compiler for inductor (the runtime image ships none): serve eager.
                    log.exception("%s: compiling the decode step failed; it runs eager", name)
                    lm.compiled = None
                    scheduler.slots = lm.new_slots(scheduler.slots.max_slots, scheduler.slots.kv_tokens)
                else:
                    log.info(
                        "%s: compiled decode step ready in %.1f s (%s)", name, time.monotonic() - t0, why
                    )
            else:
                log.info("%s: eager decode step (%s)", name, why)
    for m in models:
        if m.adapters and m.name in runners:
            raise FailedPrecondition(
                f"model {m.name!r}: adapters are served on causal LMs; this entry has its own task head"
            )
    return Workers(loaded, models, runners, scheduler, lm)


def adapter_list(bank: LoraBank, model: str) -> list[dict[str, Any]]:
    """The adapters of `model`: name, path, rank, resident."""
    prefix = f"{model}:"
    return [{**d, "name": d["name"][len(prefix) :]} for d in bank.describe() if d["name"].startswith(prefix)]
