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
from collections.abc import Callable
from typing import Any

from bitserve.engine.heads import BatchRunner, model_half
from bitserve.engine.heads.classifier import HeadScoreRunner
from bitserve.engine.sched.scheduler import Scheduler
from bitserve.engine.worker.lora import LoraBank
from bitserve.engine.worker.model_runner import CausalLM
from bitserve.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
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
        # A sequence classifier's adapters (LoRA on its encoder, its own head per row).
        self.head_bank: LoraBank | None = None

    def score(
        self,
        prompts: list[list[int]],
        conts: list[list[list[int]]],
        model: str = "",
        adapters: list[str] | None = None,
    ) -> list[list[float] | str]:
        """Per prompt, its continuations' log-likelihoods through its LoRA adapter of `model`
        ("": the base), or an error code for that prompt alone (`per_adapter`)."""
        lm = self.lm
        if lm is None:
            raise InvalidArgument("this engine has no causal LM to score labels with")
        if not adapters or not any(adapters):
            return list(lm.score(prompts, conts))
        return self.per_adapter(
            lm.lora,
            [f"{model}:{a}" if a else "" for a in adapters],
            lambda rows, slots: lm.score([prompts[i] for i in rows], [conts[i] for i in rows], slots),
        )

    def run_batch(self, model: str, items: list[Any], adapters: list[str] | None = None) -> list[Any]:
        """A task head's batch; with `adapters` (a sequence classifier's), each item through its
        adapter of `model` ("": the base), or an error code for that item (`per_adapter`)."""
        runner = self.runners[model]
        if not adapters or not any(adapters):
            return runner.run_batch(items)
        if self.head_bank is None or not isinstance(runner, HeadScoreRunner):
            raise FailedPrecondition(f"model {model!r} serves no LoRA adapters")
        return self.per_adapter(
            self.head_bank,
            [f"{model}:{a}" if a else "" for a in adapters],
            lambda rows, slots: runner.run_batch([items[i] for i in rows], slots),
        )

    def per_adapter(
        self, bank: LoraBank | None, keys: list[str], run: Callable[[list[int], list[int]], list[Any]]
    ) -> list[Any]:
        """`run(rows, slots)` over the rows (indices into `keys`, each row's adapter as the bank
        knows it, "" = the base) with each row's adapter resident: rows of different adapters
        share one pass (the bank's stacked form costs the same whatever the mix); only adapters
        that cannot be resident together go to further passes. A row's result is an error code
        for it alone: NOT_FOUND (no such adapter), RESOURCE_EXHAUSTED (every slot is held by
        running generation rows)."""
        out: list[Any] = ["" for _ in keys]
        todo = []
        for i, k in enumerate(keys):
            if k and (bank is None or k not in bank.known):
                out[i] = NotFound.code
            else:
                todo.append(i)
        running = self.scheduler.adapters_in_use() if self.scheduler is not None else set()
        while todo:
            assert bank is not None
            held, slot_of, deferred = set(running), {"": 0}, set()
            rows: list[int] = []
            later: list[int] = []
            for i in todo:
                k = keys[i]
                if k not in slot_of and k not in deferred:
                    s = bank.acquire(k, held)
                    if s is None:
                        deferred.add(k)
                    else:
                        slot_of[k] = s
                        held.add(s)
                (rows if k in slot_of else later).append(i)
            if not rows:  # every slot is held by running generation rows
                for i in later:
                    out[i] = ResourceExhausted.code
                break
            for i, r in zip(rows, run(rows, [slot_of[keys[i]] for i in rows]), strict=True):
                out[i] = r
            todo = later
        return out

    # LoRA adapters (the Admin service) ----------------------------------------------------------
    @property
    def bank(self) -> LoraBank | None:
        """The adapters of this engine's model: the generation scheduler's causal LM, or a
        sequence classifier's head runners."""
        return self.lm.lora if self.lm is not None else self.head_bank

    def adapter_op(self, op: str, args: list[Any]) -> Any:
        """["load", model, name, path] | ["unload", model, name] | ["list", model]: between
        steps, on the engine's loop (running rows never see a half-loaded adapter)."""
        model = args[0]
        bank = self._bank(model)
        if op == "list":
            return adapter_list(bank, model)
        key = f"{model}:{args[1]}"
        in_use = self.scheduler.adapters_in_use() if self.scheduler is not None else set()
        if op == "load":
            ad = bank.register(key, args[2])
            slot = bank.acquire(key, in_use, ad)
            return {"resident": slot is not None, "rank": ad.rank, "bytes": ad.nbytes}
        if op == "unload":
            bank.forget(key)
            running = sum(1 for s in self.scheduler.running if s.adapter == key) if self.scheduler else 0
            bank.free_unused(in_use)
            return {"running": running}
        raise InvalidArgument(f"unknown adapter operation {op!r}")

    def _bank(self, model: str) -> LoraBank:
        if not any(m.name == model for m in self.models):
            raise NotFound(f"model {model!r} is not served by this engine")
        bank = self.bank
        if bank is None or (self.lm is None and not isinstance(self.runners.get(model), HeadScoreRunner)):
            raise FailedPrecondition(
                f"model {model!r} has its own task head that takes no adapter; LoRA adapters are "
                "served on causal LMs and sequence classifiers"
            )
        return bank

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
            "adapters": {m.name: adapter_list(self.bank, m.name) for m in self.models}
            if self.bank is not None
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
    w = Workers(loaded, models, runners, scheduler, lm)
    heads = [m for m in models if isinstance(runners.get(m.name), HeadScoreRunner)]
    for m in models:
        if m.adapters and m.name in runners and m not in heads:
            raise FailedPrecondition(
                f"model {m.name!r}: adapters are served on causal LMs and sequence classifiers; "
                "this entry's task head (seq2seq) takes none"
            )
    if heads:
        # A sequence classifier's bank: LoRA on the encoder, and each adapter's own classifier
        # (peft `modules_to_save`) per row.
        w.head_bank = LoraBank(
            loaded.model,
            capacity=max(m.max_resident_adapters for m in heads),
            max_rank=max(m.max_lora_rank for m in heads),
            heads=True,
        )
        for m in heads:
            for adapter, path in m.adapters.items():
                key = f"{m.name}:{adapter}"
                w.head_bank.acquire(key, set(), w.head_bank.register(key, path))
        for r in {id(runners[m.name]): runners[m.name] for m in heads}.values():
            assert isinstance(r, HeadScoreRunner)
            r.bank = w.head_bank
    return w


def adapter_list(bank: LoraBank, model: str) -> list[dict[str, Any]]:
    """The adapters of `model`: name, path, rank, resident."""
    prefix = f"{model}:"
    return [{**d, "name": d["name"][len(prefix) :]} for d in bank.describe() if d["name"].startswith(prefix)]
