"""Corpus runs on ``dask.distributed``: each worker loads the models once (a worker plugin) and computes shards.

The driver (:func:`attnflows_panel.store.extract_corpus`) keeps a few shards in flight per worker and
commits each result as it arrives, so the run directory has one writer and only the driver needs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from distributed.diagnostics.plugin import WorkerPlugin

from attnflows_panel.errors import InputError, ModelError
from attnflows_panel.paths import sha256_json
from attnflows_panel.shard import ShardTables, WindowPlan, compute_window, windows

if TYPE_CHECKING:
    from distributed import Client

    from attnflows_panel.corpus import Corpus
    from attnflows_panel.models.loading import LoadedModel

PLUGIN = "attnflows-models"  # and the models' weight hashes: a cluster keeps each set of models it was given loaded
DEVICE_VARIABLE = "ATTNFLOWS_DEVICE"  # set on a worker's machine to give that worker its own device (cuda:1, say)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
IN_FLIGHT_PER_WORKER = 2  # windows queued per worker: one computing, one ready to start
WORKER_WAIT_SECONDS = 60  # how long a run waits for the first worker of a scheduler that has none


@dataclass(frozen=True)
class ModelSpec:
    """How a worker loads one model of a run, and the weights it must find there."""

    name: str
    model_id: str
    checkpoint_sha256: str
    device: str


class ModelsPlugin(WorkerPlugin):
    """Loads the run's models once when a worker starts (or joins), on its device, and checks their weights.

    ``sharing`` counts the workers on each host, so each worker's torch takes its share of that host's cores.
    """

    idempotent = True  # registered again under its name (the same models), it is not loaded again

    def __init__(self, specs: Sequence[ModelSpec], sharing: Mapping[str, int]) -> None:
        self.specs = list(specs)
        self.sharing = dict(sharing)
        self.models: dict[str, LoadedModel] = {}

    def setup(self, worker: Any) -> None:
        import torch
        import transformers

        from attnflows_panel.models import load_encoder

        transformers.utils.logging.disable_progress_bar()  # a worker's log is no terminal: the driver's bar shows the run
        transformers.utils.logging.set_verbosity_error()
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.sharing.get(_host(worker.address), 1)))
        for spec in self.specs:
            lm = load_encoder(spec.model_id, os.environ.get(DEVICE_VARIABLE) or spec.device)
            if lm.checkpoint_hash != spec.checkpoint_sha256:
                raise ModelError(f"worker {worker.address} loaded other weights for {spec.name} from {spec.model_id} than the driver")
            self.models[spec.name] = lm


def window_on_worker(plugin: str, plan: WindowPlan, texts: Sequence[str], text_pairs: Sequence[str] | None, options: dict[str, Any]) -> list[ShardTables]:
    """A task: one window of shards through the models this worker's ``plugin`` loaded (``options`` of :func:`compute_window`)."""
    from distributed import get_worker

    models = get_worker().plugins[plugin].models
    return compute_window(models, plan, texts, text_pairs, **options)


def plugin_name(specs: Sequence[ModelSpec]) -> str:
    """The plugin's name for these models: ``attnflows-models-`` and a hash of their names, weights and devices."""
    return f"{PLUGIN}-{sha256_json([[s.name, s.checkpoint_sha256, s.device] for s in specs])[:16]}"


def worker_devices(client: Client) -> dict[str, str]:
    """Each worker's address and the device the first model of its latest attnflows plugin runs on."""

    def device(dask_worker: Any) -> str:
        plugin = [name for name in dask_worker.plugins if name.startswith(PLUGIN)][-1]
        return str(next(iter(dask_worker.plugins[plugin].models.values())).device)

    return client.run(device)


def cluster_shards(
    client: Client, models: Mapping[str, LoadedModel], corpus: Corpus, pending: Sequence[tuple[int, int, int]], shard_size: int, options: dict[str, Any]
) -> Iterator[ShardTables]:
    """Each pending ``(shard, start, stop)`` computed on the cluster a window at a time (the batches one process would
    make), yielded as its window finishes (windows in any order)."""
    from distributed import as_completed

    specs = [ModelSpec(name, lm.model_id, lm.checkpoint_hash, str(lm.device)) for name, lm in models.items()]
    plugin = plugin_name(specs)
    client.register_plugin(ModelsPlugin(specs, Counter(map(_host, client.nthreads()))), name=plugin)
    in_flight = max(1, IN_FLIGHT_PER_WORKER * len(client.nthreads()))
    queue = iter(windows(pending, shard_size, len(corpus)))

    def submit(plan: WindowPlan) -> Any:
        texts, text_pairs = plan.sentences(corpus.texts, corpus.text_pairs)
        return client.submit(window_on_worker, plugin, plan, texts, text_pairs, options, pure=False)  # a fresh key: never another run's

    running = as_completed([submit(plan) for plan in _take(queue, in_flight)])
    try:
        for future in running:
            tables = future.result()
            future.release()
            for plan in _take(queue, 1):
                running.add(submit(plan))
            yield from tables
    finally:
        running.clear()


def _host(address: str) -> str:
    return urlsplit(address).hostname or address


def _take(queue: Iterator[Any], n: int) -> list[Any]:
    return [job for _, job in zip(range(n), queue)]


@contextlib.contextmanager
def _ctrl_c_left_to_this_process() -> Iterator[None]:
    """Processes started inside ignore Ctrl-C (an ignored signal stays ignored in a child): this process stops them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def check_cluster_flags(scheduler: str | None, workers: int | None) -> str | None:
    """The scheduler's address (``tcp://`` when it names no protocol) once ``--scheduler`` and ``--workers`` are checked; None without a scheduler."""
    if scheduler is not None and not scheduler.strip():
        raise InputError("--scheduler needs an address, for example tcp://127.0.0.1:8786")
    if scheduler and workers:
        raise InputError("give --scheduler or --workers, not both")
    if workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1, got {workers}")
    if scheduler is None:
        return None
    address = scheduler.strip() if "://" in scheduler else f"tcp://{scheduler.strip()}"
    parts = urlsplit(address)
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None:
        raise InputError(f"--scheduler {scheduler!r} is not a scheduler address: give host:port, for example tcp://127.0.0.1:8786")
    return address


@contextlib.contextmanager
def cluster_client(scheduler: str | None = None, workers: int | None = None, on_wait: Callable[[str], None] | None = None) -> Iterator[Client | None]:
    """A client of the scheduler at ``scheduler``, or of a ``LocalCluster`` of ``workers`` processes on loopback, or None.

    A scheduler without workers is waited on for :data:`WORKER_WAIT_SECONDS` (``on_wait`` is told so first).
    """
    address = check_cluster_flags(scheduler, workers)
    if not address and not workers:
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    if address:
        parts = urlsplit(address)
        try:
            if parts.scheme in ("tcp", "tls"):  # refused at once, not after the client's timeout
                socket.create_connection((parts.hostname, parts.port), timeout=5).close()
            client = Client(address, timeout="10s")
        except (OSError, TimeoutError, ValueError) as exc:
            raise InputError(f"cannot reach the Dask scheduler at {scheduler}: {exc}") from None
        with client:
            if not client.nthreads():
                (on_wait or (lambda _: None))(f"the scheduler at {address} has no worker yet; waiting {WORKER_WAIT_SECONDS} s for one (start it with: dask worker {address})")
                try:
                    client.wait_for_workers(1, timeout=WORKER_WAIT_SECONDS)
                except TimeoutError:
                    raise InputError(f"no worker joined the Dask scheduler at {address} in {WORKER_WAIT_SECONDS} s; start one with: dask worker {address}") from None
            yield client
        return
    # one task at a time per worker, its torch, BLAS and OpenMP taking the worker's share of the cores (Dask's nannies
    # would hold them to one thread each), and glibc's own trim threshold (Dask's 64 KB returns every freed batch to
    # the system, to be faulted in again by the next)
    share = str(max(1, (os.cpu_count() or 1) // workers))
    environ = {k: v for k, v in dask.config.get("distributed.nanny.pre-spawn-environ").items() if k != "MALLOC_TRIM_THRESHOLD_"}
    environ |= dict.fromkeys(THREAD_VARIABLES, share)
    with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), _ctrl_c_left_to_this_process():
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None, silence_logs=logging.CRITICAL)  # a task's error reaches the driver; what workers log while stopping is noise
    with cluster, Client(cluster) as client:
        yield client
