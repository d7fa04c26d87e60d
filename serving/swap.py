"""Hot swap: the served version of each model is one reference, replaced only once the next is warm.

All loading happens on one swap thread, never on the request path: read and check the
version's weights, put them into an idle model instance, run it once per batch shape it
will see, then replace the reference. A request leases the version it starts with and
keeps it until its forward pass is done, so it finishes on that version whatever swaps
happen meanwhile; nothing a request does waits for a swap.

Memory does not grow with the number of swaps: a version that stops being served is
kept, once no request holds it, as the spare instance the next swap loads into (its
compiled inference function is reused too, so a swap costs a weights copy, not a model
build). The first spare is built and warmed right after the first version is served, so even
the first swap is a copy. Beyond the serving, draining and one spare instance, old ones are dropped.

What to serve is the registry's ``champion`` unless an admin pinned a version; a version
that fails to load is recorded, not retried until asked (``reload``) or superseded, and
the previous version keeps serving.

Other versions answer too, when asked for by number or by alias (TF Serving's ``/versions/V`` and
``/labels/L`` routes) and, with canary or shadow traffic on, the ``candidate``: each is loaded once on
the swap thread and kept, so a pinned older version keeps answering whatever the champion does.
Memory stays bounded: with the champion at most ``max_loaded`` instances answer per model, the least
recently used other version making room (it becomes the spare, or is dropped once idle).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from pipeline.registry import Registry, RegistryError
from pipeline.spec import ModelSpec
from serving.metrics import Metrics

log = logging.getLogger(__name__)

SPARES = 1
"""Idle model instances kept per model for the next swap to load into."""


class UnknownModel(LookupError):
    """This server does not serve the model."""


class NotReady(RuntimeError):
    """The model has no warmed version yet."""


class NotLoaded(LookupError):
    """The version asked for is not loaded now; :meth:`ModelHost.load` brings it."""


class Served:
    """One loaded, warmed version of a model; requests lease it while they use it."""

    __slots__ = ("model", "version", "bundle", "meta", "leases", "_lock")

    def __init__(self, model: str, version: int, bundle, meta: dict, lock: threading.Lock):
        self.model, self.version, self.bundle, self.meta = model, version, bundle, meta
        self.leases, self._lock = 0, lock

    @property
    def spec(self) -> ModelSpec:
        return self.bundle.spec

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.bundle.predict_proba(x)

    def release(self) -> None:
        with self._lock:
            self.leases -= 1


class LoadFailure(NamedTuple):
    """Why a model could not be brought to ``version`` (None: the target itself was not found)."""

    version: int | None
    reason: str


class HostState(NamedTuple):
    """Where one model stands on this host."""

    served: Served | None  # the version answering requests
    loading: int | None  # the version being loaded now
    failure: LoadFailure | None  # the last failure, until a swap succeeds
    pinned: int | None  # the version pinned by an admin, whatever the champion
    others: tuple[int, ...] = ()  # other versions loaded to answer (/versions, /labels, canary, shadow)


class ModelHost:
    """The served version of each of ``models``, kept on the champion (or a pinned version).

    ``warm_rows`` is the largest batch a forward pass will see; warming runs one row and
    that many, so neither size is traced or tuned on a live request. ``max_loaded`` bounds the
    instances answering per model (the served one included); with ``load_candidate`` the
    ``candidate`` is loaded as soon as it moves, for canary and shadow traffic.
    """

    def __init__(
        self,
        registry: Registry,
        models: Iterable[str],
        metrics: Metrics,
        warm_rows: int,
        max_loaded: int = 3,
        load_candidate: bool = False,
    ):
        self.registry, self.metrics, self.warm_rows = registry, metrics, warm_rows
        self.max_loaded, self.load_candidate = max_loaded, load_candidate
        self.models = tuple(dict.fromkeys(models))
        self._lock = threading.Lock()
        self._current: dict[str, Served] = {}
        self._others: dict[str, OrderedDict[int, Served]] = {m: OrderedDict() for m in self.models}
        self._aliases: dict[str, dict[str, int]] = {m: {} for m in self.models}
        self._loads: dict[tuple[str, int], Future] = {}
        self._retired: dict[str, list[Served]] = {m: [] for m in self.models}
        self._pinned: dict[str, int] = {}
        self._loading: dict[str, int] = {}
        self._failed: dict[str, LoadFailure] = {}
        self._queued: dict[str, Future] = {}
        self._swapper = ThreadPoolExecutor(1, thread_name_prefix="streamfit-swap")

    # ----------------------------------------------------------------------------------- request path

    def acquire(self, model: str, version: int | None = None) -> Served:
        """Lease the version of ``model`` served now, or ``version``; the caller must ``release`` it.

        Raises :class:`NotLoaded` for a ``version`` that is not loaded (:meth:`load` it first)."""
        with self._lock:
            served = self._current.get(model)
            if version is not None and (served is None or served.version != version):
                others = self._others.get(model)
                served = others.get(version) if others is not None else None
                if served is None and model in self.models:
                    raise NotLoaded(f"model {model!r} version {version} is not loaded")
                if others is not None and served is not None:
                    others.move_to_end(version)
            if served is not None:
                served.leases += 1
                return served
        if model not in self.models:
            raise UnknownModel(f"model {model!r} is not served here; served: {', '.join(self.models)}")
        loading = self._loading.get(model)
        failed = self._failed.get(model)
        raise NotReady(
            f"model {model!r} has no version loaded yet"
            + (f" (loading version {loading})" if loading else f" ({failed.reason})" if failed else "")
        )

    def acquire_candidate(self, model: str) -> Served | None:
        """Lease the loaded ``candidate`` of ``model`` if it is not the version served now, else None."""
        with self._lock:
            served, version = self._current.get(model), self._aliases[model].get("candidate")
            candidate = self._others[model].get(version) if version is not None else None
            if candidate is None or served is None or served.version == version:
                return None
            candidate.leases += 1
            return candidate

    def alias(self, model: str, label: str) -> int | None:
        """The version ``label`` named when the swap thread last read the registry's aliases (None: not then)."""
        self.current(model)  # UnknownModel
        return self._aliases[model].get(label)

    def load(self, model: str, version: int) -> Future:
        """Load ``version`` of ``model`` on the swap thread to answer beside the served one (kept while
        recently used); the future fails with :class:`~pipeline.registry.RegistryError` for an unknown version.
        Calls for the same version while it loads share one load."""
        self.current(model)  # UnknownModel
        with self._lock:
            key = (model, version)
            loading = self._loads.get(key)
            if loading is None or loading.done():
                self._loads = {k: f for k, f in self._loads.items() if not f.done()}  # no record of every version
                loading = self._loads[key] = self._swapper.submit(self._load_other, model, version)
            return loading

    def current(self, model: str) -> Served | None:
        if model not in self.models:
            raise UnknownModel(f"model {model!r} is not served here; served: {', '.join(self.models)}")
        return self._current.get(model)

    def ready(self) -> bool:
        return all(model in self._current for model in self.models)

    def state(self, model: str) -> HostState:
        """The served version, the version loading now, the last failure, the pin."""
        return HostState(
            self.current(model),
            self._loading.get(model),
            self._failed.get(model),
            self._pinned.get(model),
            tuple(self._others[model]),
        )

    # ----------------------------------------------------------------------------------- control

    def refresh(self, model: str, *, retry: bool = False, reload: bool = False) -> Future:
        """Bring ``model`` to its target version on the swap thread; the future gives the served version.

        A plain call made while another is still queued shares it (that one resolves the target when
        it runs, so it sees every move made until then). ``retry`` tries a version that failed
        before again; ``reload`` loads the target even if it is the version served.
        """
        with self._lock:
            queued = self._queued.get(model)
            if queued is not None and not (retry or reload):
                return queued
            future = self._swapper.submit(self._sync, model, retry, reload)
            if not (retry or reload):
                self._queued[model] = future
            return future

    def refresh_all(self) -> None:
        for model in self.models:
            self.refresh(model)

    def pin(self, model: str, version: int) -> Future:
        """Serve ``version`` until ``unpin``, whatever the champion."""
        self.registry.meta(model, version)  # RegistryError if there is no such version
        self._pinned[model] = version
        return self.refresh(model, retry=True)

    def unpin(self, model: str) -> Future:
        self._pinned.pop(model, None)
        return self.refresh(model, retry=True)

    def close(self) -> None:
        self._swapper.shutdown(wait=True, cancel_futures=True)

    # ----------------------------------------------------------------------------------- swap thread

    def _sync(self, model: str, retry: bool, reload: bool) -> int | None:
        with self._lock:
            queued = self._queued.get(model)
            if queued is not None and queued.running():  # this very call: later ones must queue anew
                del self._queued[model]
        current = self._current.get(model)
        try:
            self._aliases[model] = aliases = self.registry.aliases(model)
            target = self._pinned.get(model) or self.registry.resolve(model, "champion")
        except RegistryError as exc:
            self._fail(model, None, str(exc))
            raise
        candidate = aliases.get("candidate")
        if self.load_candidate and candidate not in (None, target) and candidate not in self._others[model]:
            self.load(model, candidate)  # queued behind this call: the champion comes first
        failure = self._failed.get(model)
        failed_before = failure is not None and failure.version == target
        if not reload and ((current is not None and current.version == target) or (failed_before and not retry)):
            return current.version if current else None
        self._swap(model, target)
        return target

    def _fail(self, model: str, version: int | None, reason: str) -> None:
        """Record why ``model`` cannot be brought to ``version``; logged once per distinct reason."""
        failure = LoadFailure(version, reason)
        if self._failed.get(model) != failure:
            served = self._current.get(model)
            log.error("%s: %s; serving %s", model, reason, f"v{served.version}" if served else "nothing yet")
        self._failed[model] = failure

    def _swap(self, model: str, version: int) -> None:
        started = time.perf_counter()
        self._loading[model] = version
        with self._lock:
            loaded = self._others[model].pop(version, None)  # a candidate promoted: no load needed
        try:
            served = loaded or self._load(model, version)
        except Exception as exc:  # a bad version must never take serving down: the previous one stays
            self.metrics.swap_failures.labels(model).inc()
            self._fail(model, version, f"version {version} could not be loaded: {exc}")
            raise
        finally:
            self._loading.pop(model, None)
        with self._lock:
            previous = self._current.get(model)
            self._current[model] = served
            if previous is not None:
                self._retire(model, previous)
            bundles = self._instances(model)
        self._failed.pop(model, None)
        seconds = time.perf_counter() - started
        self.metrics.swaps.labels(model).inc()
        self.metrics.swap_duration.labels(model).observe(seconds)
        self.metrics.version.labels(model).set(version)
        self.metrics.bundles.labels(model).set(bundles)
        log.info(
            "%s: now serving v%d (was %s; loaded and warmed in %.0f ms)",
            model,
            version,
            f"v{previous.version}" if previous else "none",
            seconds * 1000,
        )
        if previous is None:  # build the spare now, so even the first swap is a weights copy, not a model build
            self._swapper.submit(self._build_spare, served)

    def _load_other(self, model: str, version: int) -> Served:
        """``version`` loaded beside the served one (a no-op if it is loaded), the least recently used
        other version retired when that makes more than ``max_loaded``."""
        with self._lock:
            current, loaded = self._current.get(model), self._others[model].get(version)
        if loaded is not None or (current is not None and current.version == version):
            return loaded or current  # type: ignore[return-value]  # one of them is set
        served = self._load(model, version)
        with self._lock:
            others = self._others[model]
            others[version] = served
            while len(others) > self.max_loaded - 1:
                self._retire(model, others.popitem(last=False)[1])
            bundles = self._instances(model)
        self.metrics.version_loads.labels(model).inc()
        self.metrics.bundles.labels(model).set(bundles)
        log.info("%s: v%d loaded to answer beside the served version", model, version)
        return served

    def _instances(self, model: str) -> int:
        """Model instances held for ``model``: served, other loaded versions, retired ones (under the lock)."""
        return int(model in self._current) + len(self._others[model]) + len(self._retired[model])

    def _build_spare(self, served: Served) -> None:
        from pipeline.bundle import ModelBundle

        bundle = ModelBundle(served.spec, version=0)
        self._warm(bundle)
        with self._lock:
            self._retired[served.model].append(Served(served.model, 0, bundle, {}, self._lock))

    def _load(self, model: str, version: int) -> Served:
        """Version ``version`` of ``model`` in an idle instance (the spare if there is one), warmed."""
        spec = self.registry.spec(model)
        version, weights = self.registry.weights(model, version)
        meta = self.registry.meta(model, version)
        bundle = self._spare(model, spec)
        if bundle is None:
            from pipeline.bundle import ModelBundle

            bundle = ModelBundle(spec, version=version)
        bundle.set_weights(weights)
        bundle.version = version
        self._warm(bundle)
        return Served(model, version, bundle, meta, self._lock)

    def _warm(self, bundle) -> None:
        """One forward pass per batch size the batcher makes at the extremes, so none is traced on a request."""
        for rows in sorted({1, self.warm_rows}):
            bundle.predict_proba(np.zeros((rows, bundle.spec.n_features), np.float32))

    def _spare(self, model: str, spec: ModelSpec):
        """An idle retired instance of the same spec, taken out of the retired list, or None."""
        with self._lock:
            retired = self._retired[model]
            for i, served in enumerate(retired):
                if served.leases == 0:
                    del retired[i]
                    self._forget(served)
                    return served.bundle if served.spec == spec else None
        return None

    def _retire(self, model: str, served: Served) -> None:
        """Keep ``served`` for reuse; beyond ``SPARES`` idle instances the oldest are dropped.

        The caller holds the lock.
        """
        retired = self._retired[model]
        retired.append(served)
        idle = [s for s in retired if s.leases == 0]
        for old in idle[: max(0, len(idle) - SPARES)]:
            retired.remove(old)
            self._forget(old)

    def _forget(self, served: Served) -> None:
        """Drop the metric series of a dropped instance's version unless another instance answers for it."""
        current = self._current.get(served.model)
        if served.version not in self._others[served.model] and (current is None or current.version != served.version):
            self.metrics.forget(served.model, served.version)
