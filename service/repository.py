"""Watches the model repository and swaps models without downtime.

Layout (Triton's): ``<repository>/<name>/<version>/model.onnx``. With the ``latest`` policy the
service serves the newest version that loads and passes its checks, never going below a version
it serves while that version still exists (deleting the newest version rolls back). With
``pinned`` it serves exactly one version.

A candidate is loaded beside the serving model (in a worker thread), checked and warmed up by
:func:`service.runtime.load_model`, and only then swapped in by one assignment. Requests hold
the model they started with, so in-flight work finishes on the old one. A candidate that fails
is recorded with its file's status fingerprint (inode, size, mtime, ctime: a rewrite, an atomic
replace or a ``chmod`` all change it) and not retried until the file changes (or
``POST /admin/reload`` forces it); the failure shows in ``/v1/models`` until the version loads,
its file changes or its directory is deleted.

Versions are meant to be immutable, but a serving version whose file changes anyway is treated
as a new candidate of the same number: swapped in if it passes the checks, otherwise the copy
already loaded keeps serving and the serving row of ``/v1/models`` says what is wrong on disk.

A new file may be seen half-written by a poll (a ``cp`` or ``rsync --inplace`` into the version
folder still running). A poll's load that fails on a file modified less than :data:`SETTLE_S`
seconds before it (by its mtime, a future one included) or during it is held back, not
recorded: one INFO line for the series, and it is tried again when the file changes. Once the
file has stayed as it is for :data:`SETTLE_S` seconds of this process's clock (whatever its
mtime says), the failure is recorded without loading the same bytes again; a file that keeps
changing is recorded anyway after :data:`SETTLE_CAP_S`. The first scan and
``POST /admin/reload`` report every failure at once.

Everything that touches the disk (listing the versions, the fingerprints) runs in a worker
thread, so a repository of thousands of versions, or a slow network file system, never holds up
the event loop that answers requests; the state it feeds is only changed on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from models.contract import (
    MODEL_FILENAME,
    ignored_version_folders,
    model_path,
    model_versions,
)
from service.metrics import Metrics
from service.runtime import (
    DeviceUnavailableError,
    ModelLoadError,
    OnnxModel,
    RunControl,
    load_model,
)
from service.settings import Settings

logger = logging.getLogger(__name__)

Loader = Callable[..., OnnxModel]
Fingerprint = tuple[int, int, int, int]

# Seconds a file must have stayed as it is before a poll records its load failure.
SETTLE_S = 2.0
# Seconds a series of held-back failures of one version may last (a file that keeps changing).
SETTLE_CAP_S = 60.0


@dataclass(frozen=True)
class _Unsettled:
    """A poll's held-back load failure (the file may still be being written)."""

    error: str
    fingerprint: Fingerprint | None  # the bytes that failed; None if they changed meanwhile
    tried_at: float  # time.monotonic() of that load
    series_start: float  # time.monotonic() of the series' first held-back failure


@dataclass(frozen=True)
class LoadFailure:
    """A version that could not be served."""

    version: int
    error: str
    fingerprint: Fingerprint | None
    at: float


@dataclass(frozen=True)
class RefreshResult:
    """What one repository scan did."""

    changed: bool
    serving_version: int | None
    errors: tuple[str, ...] = ()  # this scan's load failures, newest version first

    @property
    def error(self) -> str | None:
        """The scan's failures joined by "; " (None when there were none)."""
        return "; ".join(self.errors) or None


@dataclass(frozen=True)
class _DiskScan:
    """What one scan read from the disk, in a worker thread."""

    versions: list[int] | None  # None: the model folder could not be listed
    ignored: dict[str, str]  # version-like folder names that are not read, and why
    list_error: OSError | None
    fingerprints: dict[int, Fingerprint | None]  # of the versions the scan looks at


def _read_disk(repository: Path, name: str, watched: Callable[[list[int]], set[int]]) -> _DiskScan:
    """List the versions of ``name`` and fingerprint those ``watched`` picks from the list."""
    try:
        versions = model_versions(repository, name)
        ignored = ignored_version_folders(repository, name)
    except OSError as err:
        return _DiskScan(None, {}, err, {})
    fingerprints = {
        version: _fingerprint(model_path(repository, name, version))
        for version in sorted(watched(versions))
    }
    return _DiskScan(versions, ignored, None, fingerprints)


def _fingerprint(path: Path) -> Fingerprint | None:
    """The file's status: any rewrite, atomic replace or permission change alters it."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _modified_ago(fingerprint: Fingerprint) -> float:
    """Seconds since the file's content last changed (its mtime)."""
    return time.time() - fingerprint[2] / 1e9


def _same_content(a: Fingerprint | None, b: Fingerprint | None) -> bool:
    """Whether two fingerprints show the same file content: inode, size and mtime. A change
    of ctime alone (a hard link, a chown, a backup tool's touch) is no reason to load the
    serving model a second time; for a failed version it is (a chmod may have fixed it)."""
    if a is None or b is None:
        return a is b
    return a[:3] == b[:3]


class ModelManager:
    """Owns the serving model and its refresh.

    Args:
        settings: Repository, policy, device and warm-up settings.
        metrics: Where to publish the model info and load outcomes.
        loader: The function that loads and checks a model (``load_model``).
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        loader: Loader = load_model,
        on_fatal: Callable[[str], None] | None = None,
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        self._loader = loader
        self._load_control: RunControl | None = None
        self._on_fatal = on_fatal
        self._initial_scan: asyncio.Task[None] | None = None
        self._loading: int | None = None  # the version being loaded, if any
        self._current: OnnxModel | None = None
        self._current_fingerprint: Fingerprint | None = None  # its file's, when it was loaded
        self._serving_gone_logged = False  # the serving version left the repository
        self._ignored_logged: set[str] = set()  # version-like folder names already warned of
        self._loaded_at: float | None = None
        self._failures: dict[int, LoadFailure] = {}
        # Poll load failures on files modified just before: not reported until they settle.
        self._unsettled: dict[int, _Unsettled] = {}
        self._scan_error: str | None = None  # the model folder itself could not be listed
        self._last_error: str | None = None
        self._last_refresh: float | None = None
        self._lock = asyncio.Lock()
        self._poller: asyncio.Task[None] | None = None

    @property
    def current(self) -> OnnxModel | None:
        """The model new requests use (None until one has loaded)."""
        return self._current

    async def start(self) -> None:
        """Start the initial scan in the background, then polling.

        The server answers meanwhile: ``/healthz`` is alive and ``/readyz`` says which version
        is loading, so a liveness probe does not kill a replica that loads a large model.
        ``DINO_DEVICE=cuda`` with a CUDA provider that cannot be bound is reported to
        ``on_fatal`` (the server exits); without one it is recorded like any load failure.
        """
        self._initial_scan = asyncio.create_task(self._first_scan(), name="model-first-scan")

    @property
    def initial_scan_done(self) -> bool:
        """Whether the scan at start has finished (loaded a model or found none that loads)."""
        return self._initial_scan is not None and self._initial_scan.done()

    async def _first_scan(self) -> None:
        try:
            await self.refresh(fatal_device_errors=self._on_fatal is not None)
        except DeviceUnavailableError as err:
            assert self._on_fatal is not None
            logger.error("%s", err)
            self._on_fatal(str(err))
            return
        except Exception:  # a bug: logged, and the polls below may still recover
            logger.exception("the first repository scan failed")
        if self._current is None:
            logger.warning("no servable model yet; not ready (%s)", await self.not_ready_reason())
        if self._settings.poll_interval_s > 0:
            self._poller = asyncio.create_task(self._poll(), name="model-poller")

    async def stop(self) -> None:
        """Stop the first scan if it still runs, and polling (and a load's checks in flight)."""
        if self._load_control is not None:  # its thread would otherwise run to the end
            self._load_control.terminate()
        for task in (self._initial_scan, self._poller):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._poller = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self._settings.poll_interval_s)
            try:
                await self.refresh(settle=True)
            except Exception:
                logger.exception("repository poll failed")

    def _candidates(self, versions: list[int]) -> list[int]:
        settings = self._settings
        if settings.version_policy == "pinned":
            return [v for v in versions if v == settings.model_version]
        current = self._current
        ordered = sorted(versions, reverse=True)
        if current is not None and current.version in versions:
            # Newer versions, then the serving one (reloaded only if its file changed).
            return [v for v in ordered if v >= current.version]
        return ordered

    async def refresh(
        self, *, force: bool = False, fatal_device_errors: bool = False, settle: bool = False
    ) -> RefreshResult:
        """Scan the repository and swap in a better version if one loads.

        Args:
            force: Retry versions that failed before even if their file did not change.
            fatal_device_errors: Raise :class:`DeviceUnavailableError` instead of recording it.
            settle: Hold back the failure of a file modified less than :data:`SETTLE_S`
                seconds ago (it may still be being copied); the polls pass it.

        Returns:
            Whether the serving model changed, which version serves, and the load error of
            this scan (None when every load it tried succeeded or it tried none).
        """
        settings = self._settings
        async with self._lock:
            self._last_refresh = time.time()
            watched = set(self._failures) | set(self._unsettled)  # the loop's state, read here
            scan = await asyncio.to_thread(
                _read_disk,
                settings.model_repository,
                settings.model_name,
                lambda versions: watched | set(self._candidates(versions)),
            )
            versions = self._apply_listing(scan)
            if versions is None:
                serving = self._current.version if self._current is not None else None
                listing = (self._scan_error,) if self._scan_error else ()
                return RefreshResult(False, serving, listing)
            self._forget_stale_failures(versions, scan.fingerprints)
            self._note_serving_version(versions)
            errors: list[str] = []  # this scan's failures, newest version first
            candidates = self._candidates(versions)
            if settle:
                errors += self._settle(candidates, scan.fingerprints)
            for version in candidates:
                fingerprint = scan.fingerprints[version]
                if (
                    self._current is not None
                    and version == self._current.version
                    and _same_content(fingerprint, self._current_fingerprint)
                ):
                    break  # nothing newer loaded and the serving file is as it was loaded
                failure = self._failures.get(version)
                if failure is not None and failure.fingerprint == fingerprint and not force:
                    continue
                unsettled = self._unsettled.pop(version, None)
                if (
                    unsettled is not None
                    and not force
                    and fingerprint is not None
                    and unsettled.fingerprint == fingerprint
                ):
                    self._unsettled[version] = unsettled  # not settled yet (see _settle)
                    continue
                path = model_path(settings.model_repository, settings.model_name, version)
                # Taken again just before its load: the scan's may be older than the loads of
                # newer candidates, and a file replaced meanwhile would be recorded under the
                # old one (a second load, and a false "changed on disk" warning, next time).
                fingerprint = await asyncio.to_thread(_fingerprint, path)
                self._loading = version
                self._load_control = RunControl()
                try:
                    model = await asyncio.to_thread(
                        self._loader,
                        path,
                        name=settings.model_name,
                        version=version,
                        device=settings.device,
                        intra_op_threads=settings.intra_op_threads,
                        cpu_memory_arena=settings.cpu_memory_arena,
                        intra_op_spinning=settings.intra_op_spinning,
                        warmup_batch_sizes=settings.warmup_batch_sizes,
                        max_attention_bytes=settings.max_batch_attention_bytes,
                        timeout_s=settings.load_timeout_s,
                        control=self._load_control,
                    )
                except DeviceUnavailableError as err:
                    if fatal_device_errors:
                        raise
                    errors.append(self._record_failure(version, fingerprint, err))
                except ModelLoadError as err:
                    if settle:
                        after = await asyncio.to_thread(_fingerprint, path)
                        if self._hold_back(version, fingerprint, after, err, unsettled):
                            continue
                    errors.append(self._record_failure(version, fingerprint, err))
                except Exception as err:  # a file that breaks the loader is still just refused
                    logger.exception("unexpected error loading version %d of %s", version, path)
                    errors.append(
                        self._record_failure(
                            version, fingerprint, ModelLoadError(f"cannot load {path}: {err!r}")
                        )
                    )
                else:
                    if not await asyncio.to_thread(path.is_file):  # removed while it loaded
                        logger.warning(
                            "version %d of %s was removed while it loaded; not swapped in",
                            version,
                            settings.model_name,
                        )
                        continue
                    self._swap(model, fingerprint)
                    return RefreshResult(True, version, tuple(errors))
                finally:
                    self._loading = None
                    self._load_control = None
            serving = self._current.version if self._current is not None else None
            return RefreshResult(False, serving, tuple(errors))

    def _hold_back(
        self,
        version: int,
        before: Fingerprint | None,
        after: Fingerprint | None,
        err: ModelLoadError,
        previous: _Unsettled | None,
    ) -> bool:
        """Whether the failed load of ``version`` is held back: its file (``before`` and
        ``after`` the load) changed during the load or less than SETTLE_S seconds before it (a
        copy may still run), and the series of such failures is younger than SETTLE_CAP_S."""
        if after is None:
            return False
        changed = after != before
        if not changed and _modified_ago(after) >= SETTLE_S:
            return False
        now = time.monotonic()
        series_start = previous.series_start if previous is not None else now
        if now - series_start >= SETTLE_CAP_S:
            return False  # it keeps changing: report it (a new series starts after)
        if previous is None:  # the first of a series: said once, not at every poll of a copy
            logger.info(
                "version %d: %s; its file changed just before or during the load and may "
                "still be being written: tried again when it changes, refused if it stays as "
                "it is for %.0f s",
                version,
                err,
                SETTLE_S,
            )
        # Only bytes that stayed put during the load are known to fail; a file that changed
        # during it is loaded again at the next poll.
        self._unsettled[version] = _Unsettled(
            str(err), None if changed else after, now, series_start
        )
        return True

    def _settle(
        self, candidates: list[int], fingerprints: dict[int, Fingerprint | None]
    ) -> list[str]:
        """Record the held-back failures whose file has stayed as it was tried for SETTLE_S
        seconds (no second load of the same bytes); drop those of a file that changed since,
        unless it is a candidate (the scan loads it again). Returns the recorded errors."""
        errors: list[str] = []
        now = time.monotonic()
        for version, unsettled in sorted(self._unsettled.items(), reverse=True):
            fingerprint = fingerprints.get(version)
            if fingerprint is None or fingerprint != unsettled.fingerprint:
                if version not in candidates:
                    del self._unsettled[version]
                continue
            if now - unsettled.tried_at >= SETTLE_S:
                err = ModelLoadError(unsettled.error)
                errors.append(self._record_failure(version, fingerprint, err))
        return errors

    def _apply_listing(self, scan: _DiskScan) -> list[int] | None:
        """The scan's versions, or None (and ``_scan_error`` set) if the folder was unlisted."""
        settings = self._settings
        versions, ignored, err = scan.versions, scan.ignored, scan.list_error
        if versions is None:
            assert err is not None
            folder = Path(settings.model_repository) / settings.model_name
            message = f"cannot list {folder}: {err.strerror or err}"
            if message != self._scan_error:  # logged once, not at every poll
                logger.error("%s (still serving version %s)", message, self._serving_label())
            self._scan_error = message
            self._update_last_error()
            return None
        if self._scan_error is not None:
            logger.info("the model folder can be listed again")
            self._scan_error = None
            self._update_last_error()
        for folder_name, why in ignored.items():
            if folder_name not in self._ignored_logged:  # once per name, not at every poll
                self._ignored_logged.add(folder_name)
                logger.warning(
                    "ignoring %s in %s: %s",
                    ascii(folder_name),
                    Path(settings.model_repository) / settings.model_name,
                    why,
                )
        return versions

    def _serving_label(self) -> str:
        return str(self._current.version) if self._current is not None else "none"

    def _versions_on_disk(self) -> tuple[list[int] | OSError, bool]:
        """The model folder's versions (or why it cannot be listed), and whether it exists."""
        settings = self._settings
        folder = Path(settings.model_repository) / settings.model_name
        try:
            versions: list[int] | OSError = model_versions(
                settings.model_repository, settings.model_name
            )
        except OSError as err:
            versions = err
        return versions, folder.is_dir()

    async def not_ready_reason(self) -> str:
        """Why no model serves: a version loading, the last error, a missing pinned version, or
        an empty folder."""
        settings = self._settings
        folder = Path(settings.model_repository) / settings.model_name
        if self._loading is not None:
            loading = f"loading version {self._loading} of {folder}"
            return f"{loading} (after: {self._last_error})" if self._last_error else loading
        if self._last_error is not None:
            return self._last_error
        versions, folder_exists = await asyncio.to_thread(self._versions_on_disk)
        if isinstance(versions, OSError):
            return f"cannot list {folder}: {versions.strerror or versions}"
        if not versions:
            if not folder_exists:
                return (
                    f"the model folder {folder} does not exist (DINO_MODEL_REPOSITORY / "
                    "DINO_MODEL_NAME)"
                )
            return (
                f"no model version found in {folder} (a version is a folder 1, 2, ... that "
                f"holds {MODEL_FILENAME})"
            )
        listed = ", ".join(str(v) for v in versions)
        if settings.version_policy == "pinned" and settings.model_version not in versions:
            return (
                f"the pinned version {settings.model_version} is not in {folder} "
                f"(versions there: {listed})"
            )
        chosen = settings.model_version if settings.version_policy == "pinned" else versions[-1]
        return (
            f"version {chosen} (of {listed}) found in {folder} but not loaded yet; the next "
            "scan or POST /admin/reload loads it"
        )

    def _forget_stale_failures(
        self, versions: list[int], fingerprints: dict[int, Fingerprint | None]
    ) -> None:
        """Drop failures of versions that are gone (not news) or whose file has changed since
        (the error no longer applies; a candidate is tried again)."""
        present = set(versions)
        for version, failure in list(self._failures.items()):
            if version not in present or fingerprints.get(version) != failure.fingerprint:
                del self._failures[version]
        for version in list(self._unsettled):
            if version not in present:
                del self._unsettled[version]
        self._update_last_error()

    def _note_serving_version(self, versions: list[int]) -> None:
        """Log once when the serving version leaves the repository (its copy keeps serving
        until another version loads)."""
        current = self._current
        if current is None or current.version in versions:
            self._serving_gone_logged = False
            return
        if not self._serving_gone_logged:
            self._serving_gone_logged = True
            logger.warning(
                "version %d was removed from the repository; it keeps serving from memory "
                "until another version loads",
                current.version,
            )

    def _update_last_error(self) -> None:
        """``last_error``: the repository listing error, else the most recent failure among
        versions that still fail, or None."""
        if self._scan_error is not None:
            self._last_error = self._scan_error
            return
        if not self._failures:
            self._last_error = None
            return
        latest = max(self._failures.values(), key=lambda failure: failure.at)
        self._last_error = f"version {latest.version}: {latest.error}"

    def _record_failure(self, version: int, fingerprint: Fingerprint | None, err: Exception) -> str:
        self._unsettled.pop(version, None)
        message = f"version {version}: {err}"
        self._failures[version] = LoadFailure(version, str(err), fingerprint, time.time())
        self._update_last_error()
        self._metrics.model_loads.labels("failed").inc()
        logger.error("refused model %s (still serving version %s)", message, self._serving_label())
        return message

    def _swap(self, model: OnnxModel, fingerprint: Fingerprint | None) -> None:
        previous = self._current
        self._current = model  # one assignment: new requests see the new model from here on
        self._current_fingerprint = fingerprint
        self._serving_gone_logged = False
        self._loaded_at = time.time()
        self._failures.pop(model.version, None)
        self._unsettled.pop(model.version, None)
        self._update_last_error()
        self._metrics.model_loads.labels("loaded").inc()
        self._metrics.set_model(
            name=model.name,
            version=model.version,
            sha256=model.metadata.weights_sha256,
            provider=model.provider,
        )
        if previous is not None and previous.version == model.version:
            logger.warning(
                "version %d of %s changed on disk and was reloaded (weights sha256 %s, was "
                "%s); versions are meant to be immutable: publish a new version instead",
                model.version,
                model.name,
                model.metadata.weights_sha256[:12],
                previous.metadata.weights_sha256[:12],
            )
            return
        logger.info(
            "serving %s version %d on %s (was %s)",
            model.name,
            model.version,
            model.provider,
            previous.version if previous is not None else "none",
        )

    async def describe(self) -> dict[str, object]:
        """State for ``/v1/models``: policy, loaded model, every version's state, errors."""
        settings = self._settings
        listed, _ = await asyncio.to_thread(self._versions_on_disk)
        # A folder that cannot be listed is reported as last_error by the scans.
        versions = set(self._failures) if isinstance(listed, OSError) else set(listed)
        current = self._current
        rows: list[dict[str, object]] = []
        on_disk = set(versions)
        if current is not None:
            versions.add(current.version)
        for version in sorted(versions):
            failure = self._failures.get(version)
            if current is not None and version == current.version:
                state, error = "serving", None
                if version not in on_disk:
                    error = "removed from the repository; the copy loaded earlier keeps serving"
                elif failure is not None:
                    error = (
                        f"its file changed on disk and the new one is refused ({failure.error}); "
                        "the copy loaded earlier keeps serving"
                    )
            elif failure is not None:
                state, error = "failed", failure.error
            elif version in self._unsettled:
                state, error = (
                    "available",
                    (
                        "not loaded yet: its file changed just before or during its load (still "
                        "being written?); tried again when it changes, refused if it stays as "
                        f"it is for {SETTLE_S:.0f} s"
                    ),
                )
            else:
                state, error = "available", None
            rows.append({"version": version, "state": state, "error": error})
        return {
            "name": settings.model_name,
            "repository": str(settings.model_repository),
            "version_policy": settings.version_policy,
            "pinned_version": settings.model_version,
            "device": settings.device,
            "ready": current is not None,
            "loaded_at": self._loaded_at,
            "last_refresh": self._last_refresh,
            "last_error": self._last_error,
            "reason": None if current is not None else await self.not_ready_reason(),
            "versions": rows,
        }
