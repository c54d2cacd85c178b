"""Which adapter answers in a channel: bindings (the store), versions (the registry), and the
engine that serves them. Every front (Discord, the console, the CLI) goes through here.

A channel resolves to its own binding, else its server's default, else the base model. A
binding names an adapter and optionally pins a version; unpinned, it follows the adapter's
promoted version. What cannot be served falls back visibly: a version made for another base
model answers from the base model (the reason shows in `/adapter info`, and the channel is
marked for retraining); a version that fails to load keeps the last version of that name that
did. The database and the adapters folder are the source of truth: a running bot polls both
every `poll_seconds`, so a switch or a promotion made by the CLI in another process is served
within a few seconds, and the new version is loaded into the engine before it is needed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.adapters import AdapterInfo, BaseShapes, Fingerprint, Registry, adapter_name, parse_ref
from core.errors import AdapterError
from core.model.engine import Engine
from core.model.requests import (
    AdapterRef,
    ChatMessage,
    GenerationParams,
    GenerationRequest,
    ResponseStream,
)
from core.store import AsyncQuoteStore, Binding, BoundChannel, ChannelRef

log = logging.getLogger(__name__)

BaseModel = tuple[BaseShapes, Fingerprint]


@dataclass(frozen=True)
class Served:
    """What answers in a channel: an adapter version (None: the base model), the binding it
    came from, and why it is not the bound adapter when it fell back."""

    adapter: AdapterRef | None
    binding: Binding
    reason: str | None = None

    def describe(self) -> str:
        return str(self.adapter) if self.adapter else "the base model"


@dataclass(frozen=True)
class AdapterReport:
    """`/adapter info`: what a channel is bound to, what serves it, and the version's record."""

    channel: ChannelRef
    served: Served
    promoted: str | None
    versions: tuple[str, ...]
    meta: dict[str, Any]


class ChannelAdapters:
    """Resolves channels to adapter versions and keeps the engine's adapters in step.

    `engine` is None in the CLI: there the bindings and the registry change, and the running
    bot (if any) picks the change up. `base` gives the served model's shapes and fingerprint.
    """

    def __init__(
        self,
        store: AsyncQuoteStore,
        registry: Registry,
        engine: Engine | None,
        base: Callable[[], BaseModel],
        *,
        poll_seconds: float = 2.0,
    ) -> None:
        self.store = store
        self.registry = registry
        self.engine = engine
        self._base_of = base
        self._base: BaseModel | None = None
        self.poll_seconds = poll_seconds
        self._fits: dict[AdapterRef, str | None] = {}
        self._failed: dict[AdapterRef, str] = {}
        self._last_good: dict[str, AdapterRef] = {}
        self._marked: set[tuple[ChannelRef, AdapterRef]] = set()
        self._loads: dict[AdapterRef, asyncio.Future[None]] = {}
        self._stamp: object = None

    @property
    def base(self) -> BaseModel:
        if self._base is None:
            self._base = self._base_of()
        return self._base

    # -- resolution --------------------------------------------------------------------------
    async def resolve(self, channel: ChannelRef) -> Served:
        """The version that should answer in `channel` now (not loaded by this call)."""
        binding = await self.store.binding(channel)
        if binding.adapter is None:
            return Served(None, binding)
        ref, reason = await asyncio.to_thread(self._target, binding)
        if ref is None:
            return Served(None, binding, reason)
        misfit = await self._misfit(ref)
        if misfit is not None:
            if (channel, ref) not in self._marked:
                self._marked.add((channel, ref))
                await self.store.mark_retrain(channel, True)
                log.warning("%s falls back to the base model: %s", channel, misfit)
            return Served(None, binding, f"{ref} cannot serve: {misfit}")
        return Served(ref, binding)

    def _target(self, binding: Binding) -> tuple[AdapterRef | None, str | None]:
        """The version a binding names: pinned, else promoted (registry reads: in a thread)."""
        assert binding.adapter is not None
        name = binding.adapter
        try:
            info = self.registry.info(name)
        except AdapterError:
            return None, f"adapter {name} no longer exists"
        version = binding.version or info.promoted
        if version is None:
            return None, f"adapter {name} has no promoted version yet"
        if version not in info.versions:
            return None, f"{name}@{version} no longer exists"
        return AdapterRef(name, version), None

    async def _misfit(self, ref: AdapterRef) -> str | None:
        """Why `ref` was made for another base model than the one served, or None. (A damaged
        file is not a misfit: loading refuses it, and the last good version answers.)"""
        if ref not in self._fits:
            _, served = self.base
            try:
                meta = await asyncio.to_thread(self.registry.meta, ref.name, ref.version)
            except AdapterError:
                meta = {}  # unreadable: loading it fails and says why
            made_on = Fingerprint.from_dict(meta.get("fingerprint"))
            self._fits[ref] = made_on.mismatch(served) if made_on else None
        return self._fits[ref]

    async def served(self, channel: ChannelRef | None) -> Served:
        """What answers in `channel` (None: a DM, the base model), loaded in the engine.

        A version that fails to load answers with the last version of its name that did."""
        if channel is None:
            return Served(None, Binding(None, None, "none"))
        served = await self.resolve(channel)
        ref = served.adapter
        if ref is None or self.engine is None:
            return served
        try:
            await self.ensure_loaded(ref)
        except AdapterError as e:
            previous = self._last_good.get(ref.name)
            if previous is not None and self._loaded(previous):
                return Served(previous, served.binding, f"{ref} could not be loaded: {e}")
            return Served(None, served.binding, f"{ref} could not be loaded: {e}")
        self._last_good[ref.name] = ref
        return served

    def _loaded(self, ref: AdapterRef) -> bool:
        assert self.engine is not None
        return any(s.ref == ref and not s.unloading for s in self.engine.adapters())

    async def ensure_loaded(self, ref: AdapterRef) -> None:
        """Load `ref` into the engine unless it is there (one load per version at a time; a
        version that failed is not tried again until the registry changes)."""
        assert self.engine is not None
        if ref in self._failed:
            raise AdapterError(self._failed[ref])
        if self._loaded(ref):
            return
        pending = self._loads.get(ref)
        if pending is None:
            pending = self._loads[ref] = asyncio.ensure_future(self._load(ref))
            pending.add_done_callback(lambda _: self._loads.pop(ref, None))
        await asyncio.shield(pending)

    async def _load(self, ref: AdapterRef) -> None:
        assert self.engine is not None
        shapes, fingerprint = self.base
        try:
            spec = await asyncio.to_thread(
                self.registry.check, ref.name, ref.version, shapes, fingerprint
            )
            await self.engine.load_adapter(ref, spec.path)
        except AdapterError as e:
            self._failed[ref] = str(e)
            log.warning("adapter %s cannot be served: %s", ref, e)
            raise

    async def submit(
        self,
        channel: ChannelRef | None,
        messages: Sequence[ChatMessage],
        params: GenerationParams,
    ) -> tuple[ResponseStream, Served]:
        """Ask in `channel` with its adapter; returns the stream and what serves it."""
        assert self.engine is not None
        for attempt in range(2):
            served = await self.served(channel)
            try:
                stream = await self.engine.submit(
                    GenerationRequest(tuple(messages), served.adapter, params)
                )
            except AdapterError:
                if attempt:  # unloaded between resolving and queueing: resolve once more
                    raise
                continue
            log.debug("answering in %s with %s", channel, served.describe())
            return stream, served
        raise AssertionError("unreachable")

    # -- keeping a running bot in step -------------------------------------------------------
    async def watch(self) -> None:
        """Poll the bindings and the registry; on a change, load what is now bound and unload
        what no longer is (runs until cancelled)."""
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("could not refresh the channels' adapters", exc_info=True)
            await asyncio.sleep(self.poll_seconds)

    async def refresh(self, *, force: bool = False) -> bool:
        """One poll: True when something had changed and the engine was brought in step."""
        if self.engine is None:
            return False
        stamp = (
            await self.store.bindings_stamp(),
            await asyncio.to_thread(self.registry.state_stamp),
        )
        if stamp == self._stamp and not force:
            return False
        self._stamp = stamp
        self._fits.clear()
        self._failed.clear()
        wanted: set[AdapterRef] = set()
        bindings = await self.store.bindings()
        for bound in bindings:
            channel = bound.channel_ref
            if channel is None or bound.adapter is None:
                continue
            served = await self.served(channel)
            if served.adapter is not None:
                wanted.add(served.adapter)
        for default in await self.store.server_defaults():
            if default.adapter is None:
                continue
            binding = Binding(default.adapter, default.version, "server")
            ref, _ = await asyncio.to_thread(self._target, binding)
            if ref is not None and await self._misfit(ref) is None:
                try:
                    await self.ensure_loaded(ref)
                    wanted.add(ref)
                except AdapterError:
                    pass  # logged by the load; channels on it fall back when they ask
        for status in self.engine.adapters():
            if status.ref not in wanted and not status.unloading:
                await self.engine.unload_adapter(status.ref)
        await self._prune(bindings)
        return True

    async def _prune(self, bindings: Sequence[BoundChannel]) -> None:
        """Retention, in the process that knows what is in flight: per name, versions beyond
        the newest `keep_versions` go, except promoted, pinned and loaded (in-flight) ones."""
        assert self.engine is not None
        keep: dict[str, set[str]] = {}
        for bound in bindings:
            if bound.adapter and bound.version:
                keep.setdefault(bound.adapter, set()).add(bound.version)
        for status in self.engine.adapters():
            keep.setdefault(status.ref.name, set()).add(status.ref.version)
        for info in await asyncio.to_thread(self.registry.list, None):
            if len(info.versions) > self.registry.keep_versions:
                gone = await asyncio.to_thread(
                    self.registry.prune, info.name, protected=keep.get(info.name, set())
                )
                if gone:
                    log.info("adapter %s: deleted old versions %s", info.name, ", ".join(gone))

    # -- commands ----------------------------------------------------------------------------
    def _owned(self, name: str, server: str) -> AdapterInfo:
        """`name`'s registry entry if it belongs to `server`; another server's adapter is
        refused exactly like a missing one, so names do not leak between servers."""
        try:
            info = self.registry.info(name)
        except AdapterError:
            info = None
        if info is None or info.server != server:
            raise AdapterError(f"there is no adapter named {name} in this server")
        return info

    async def _choose(
        self, server: str, choice: str
    ) -> tuple[str | None, str | None, AdapterRef | None]:
        """`name[@version]` (or `base`) of `server`, checked and, in a running bot, loaded:
        (name, pinned version, the version that will answer); all None for the base model."""
        name, version = parse_ref(choice)
        if name == "base":
            if version is not None:
                raise AdapterError("the base model has no versions")
            return None, None, None
        name = adapter_name(name)
        info = await asyncio.to_thread(self._owned, name, server)
        target = version or info.promoted
        if target is None:
            raise AdapterError(
                f"adapter {name} has no promoted version; name one, e.g. {name}@{info.versions[-1]}"
                if info.versions
                else f"adapter {name} has no versions"
            )
        if target not in info.versions:
            raise AdapterError(f"adapter {name} has no version {target}")
        if target in info.rejected:
            raise AdapterError(f"{name}@{target} was rejected ({info.rejected[target]})")
        ref = AdapterRef(name, target)
        shapes, fingerprint = self.base
        await asyncio.to_thread(self.registry.check, name, target, shapes, fingerprint)
        if self.engine is not None:
            self._failed.pop(ref, None)
            await self.ensure_loaded(ref)
        return name, version, ref

    async def switch(self, channel: ChannelRef, choice: str, *, by: str | None = None) -> Served:
        """Bind `channel` to `name[@version]` of its server (`base` for none). The version is
        checked (and, in a running bot, loaded) before the binding changes, so a refused
        adapter leaves the channel answering as before."""
        name, version, _ = await self._choose(channel.server, choice)
        await self.store.bind(channel, name, version, by=by)
        return await self.served(channel)

    async def set_default(self, server: str, choice: str | None, *, by: str | None = None) -> str:
        """The adapter of `server`'s channels that have no binding of their own: `name[@version]`,
        `base`, or None to clear it (then they answer from the base model). Checked like a
        switch. Returns what the default is now, in words."""
        if choice is None:
            await self.store.clear_server_default(server)
            return "no default (the base model)"
        name, version, ref = await self._choose(server, choice)
        await self.store.set_server_default(server, name, version, by=by)
        return str(ref) if ref else "the base model"

    async def reset(self, channel: ChannelRef, *, by: str | None = None) -> Served:
        """Answer in `channel` from the base model."""
        return await self.switch(channel, "base", by=by)

    async def rollback(self, channel: ChannelRef) -> tuple[AdapterRef, AdapterRef | None]:
        """Move the channel's adapter back to its previous promoted version; the version left
        is marked rejected, so no later run promotes it again. A channel pinned to the version
        left follows the promoted one from then on."""
        binding = await self.store.binding(channel)
        if binding.adapter is None:
            raise AdapterError("this channel answers from the base model; nothing to roll back")
        name = binding.adapter
        await asyncio.to_thread(self._owned, name, channel.server)
        left, now = await asyncio.to_thread(self.registry.rollback, name)
        if binding.version == left and binding.source == "channel":
            await self.store.bind(channel, name, None)
        self._stamp = None
        return AdapterRef(name, left), AdapterRef(name, now) if now else None

    async def listing(self, server: str | None) -> list[dict[str, Any]]:
        """The server's adapters (every adapter for None) with their versions and channels."""
        infos = await asyncio.to_thread(self.registry.list, server)
        rows = []
        for info in infos:
            channels = await self.store.channels_using(info.name)
            eval_loss = None
            if info.promoted:
                meta = await asyncio.to_thread(self.registry.meta, info.name, info.promoted)
                eval_loss = meta.get("eval_loss")
            rows.append(
                {
                    "name": info.name,
                    "server": info.server,
                    "versions": list(info.versions),
                    "promoted": info.promoted,
                    "rejected": dict(info.rejected),
                    "channels": [c.channel for c in channels],
                    "eval_loss": eval_loss,
                }
            )
        return rows

    async def names(self, server: str) -> list[str]:
        """`name` and `name@version` choices for autocomplete, this server's only."""
        infos = await asyncio.to_thread(self.registry.list, server)
        choices = ["base"]
        for info in infos:
            choices.append(info.name)
            choices += [f"{info.name}@{v}" for v in reversed(info.versions)]
        return choices

    async def info(self, channel: ChannelRef) -> AdapterReport:
        served = await self.served(channel)
        name = served.binding.adapter
        promoted: str | None = None
        versions: tuple[str, ...] = ()
        meta: dict[str, Any] = {}
        if name is not None:
            try:
                found = await asyncio.to_thread(self.registry.info, name)
                promoted, versions = found.promoted, tuple(found.versions)
                if served.adapter is not None:
                    meta = await asyncio.to_thread(
                        self.registry.meta, served.adapter.name, served.adapter.version
                    )
            except AdapterError:
                pass
        return AdapterReport(channel, served, promoted, versions, meta)


def served_model_base(model_dir: Path, weights_sha256: str | None = None) -> BaseModel:
    """The shapes and fingerprint of the model in `model_dir`."""
    return BaseShapes.of_model(model_dir), Fingerprint.of_model(model_dir, weights_sha256)
