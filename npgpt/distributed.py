"""npgpt on Dask: the work that is parallel over texts, run on a cluster's workers.

    with cluster(scheduler="tcp://HOST:8786") as client: ...   # an existing cluster
    with cluster(workers=2) as client: ...                     # a LocalCluster of 2 processes here

Dask is an optional extra (`pip install -e ".[dask]"`): importing npgpt never imports it; this
module imports it when a cluster is first asked for. What runs on the workers:

- the frozen prefix of a training set (`cluster_prefix`): shards of the prefix cache
  (`npgpt.prefix_shards`) computed on the workers and written to the cache folder, which every
  worker and the trainer must reach at the same path (a shared filesystem);
- the classification of a corpus (`npgpt.corpus`).

A worker loads the model itself, once per process (`worker_model`; never pickled with each task),
from the same weights file as this process, and checks it: the npgpt version when the client
connects, the weights file's sha256 and the frozen blocks' content on the first task; a difference
is an NpgptError naming it. Each task runs Numba and BLAS on the worker's thread count, and the
kernels as loaded from Numba's disk cache (compiled in a child process when a machine's cache is
cold), as the trainer runs them: freshly compiled parallel kernels can round differently.
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

from .errors import NpgptError

EXTRA = 'pip install -e ".[dask]"'


def require_dask():
    """Import Dask's distributed scheduler, or say which extra installs it."""
    try:
        import dask.dataframe  # noqa: F401
        import distributed
    except ImportError as e:
        raise NpgptError(f"--scheduler and --workers need Dask ({e.name or e} is missing or broken): {EXTRA}") \
            from None
    return distributed


@contextlib.contextmanager
def cluster(scheduler=None, workers=None, log=print, host="127.0.0.1"):
    """A dask.distributed Client: connected to `scheduler`, or to a LocalCluster of `workers`
    processes of one thread each started here (and stopped at the end). Prints the dashboard's
    address; checks every worker runs this npgpt version."""
    distributed = require_dask()
    local = None
    if scheduler:
        try:
            client = distributed.Client(scheduler, timeout="30s")
        except (OSError, TimeoutError) as e:
            raise NpgptError(f"--scheduler {scheduler}: cannot connect ({e})") from None
    else:
        local = distributed.LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                         host=host, dashboard_address=f"{host}:0", silence_logs=40)
        client = distributed.Client(local)
    try:
        if scheduler:
            try:
                client.wait_for_workers(1, timeout=60)
            except (OSError, TimeoutError):
                raise NpgptError(f"--scheduler {scheduler}: no worker joined in 60 s (start `dask worker "
                                 f"{scheduler}` on the machines)") from None
        log(f"dask: {len(client.scheduler_info().get('workers', {}))} workers at {client.scheduler.address}, "
            f"dashboard {_dashboard(client)}")
        check_versions(client)
        yield client
    finally:
        client.close()
        if local is not None:
            local.close()


def _dashboard(client) -> str:
    """The dashboard's address (Dask serves it only when bokeh is installed)."""
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return f"off (it needs bokeh: {EXTRA})"
    return client.dashboard_link


def check_versions(client) -> None:
    """NpgptError naming the first worker whose npgpt differs from this process's (or is missing)."""
    ours = npgpt_version()
    try:
        versions = client.run(npgpt_version)                       # {worker address: version}
    except (ImportError, AttributeError) as e:
        raise NpgptError(f"a Dask worker cannot import npgpt ({e}): install npgpt {ours} on every worker") from None
    for address, version in sorted(versions.items()):
        if version != ours:
            raise NpgptError(f"Dask worker {address} runs npgpt {version}, this process {ours}: install "
                             f"the same npgpt on every worker")


def npgpt_version() -> str:
    """This process's npgpt.__version__ (the package is imported before any of its modules)."""
    return sys.modules[__package__].__version__


def use_worker_threads() -> int:
    """Numba and BLAS on as many threads as the worker running this task has (Numba's count is
    per calling thread: set in every task). -> that count"""
    from distributed import get_worker
    from .fastops import set_num_threads
    state = get_worker()
    n = int(getattr(getattr(state, "state", state), "nthreads", 1) or 1)
    set_num_threads(n)
    return n


def worker_address() -> str:
    from distributed import get_worker
    return get_worker().address


# ----------------------------------------------------------------------------- the model on a worker

@dataclass(frozen=True)
class ModelRecipe:
    """How a worker loads the trainer's model: its run settings (the weights as an absolute path)
    and the weights file's sha256 (None for random weights, made from the seed)."""
    run: tuple                   # sorted (name, value) pairs of RunConfig.to_dict()
    num_classes: int
    weights_sha256: str | None


def recipe_of(run, num_classes: int) -> ModelRecipe:
    """The ModelRecipe of a run (called where the run was loaded: the weights file is hashed)."""
    from .fileio import sha256_file
    from .job import weights_path
    sha = None
    if not (run.tiny or run.random_init):
        run = run.replace(weights=os.path.abspath(weights_path(run)))
        sha = sha256_file(run.weights)
    return ModelRecipe(tuple(sorted((k, _frozen(v)) for k, v in run.to_dict().items())), num_classes, sha)


def _frozen(v):
    return tuple(v) if isinstance(v, list) else v


_MODELS: dict = {}              # in each worker process: ModelRecipe -> (params, config)


def worker_model(recipe: ModelRecipe):
    """The recipe's (params, config), loaded once per worker process (the last one kept)."""
    if recipe not in _MODELS:
        from .job import load_model
        from .runconfig import RunConfig, RunOptions
        from .fileio import sha256_file
        run = RunConfig.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in recipe.run})
        where = f"Dask worker {worker_address()}"
        if recipe.weights_sha256 is not None:
            if not os.path.isfile(run.weights):
                raise NpgptError(f"{where}: no weights file at {run.weights}: put the trainer's weights file at "
                                 f"the same path on every worker")
            sha = sha256_file(run.weights)
            if sha != recipe.weights_sha256:
                raise NpgptError(f"{where}: the weights file {run.weights} differs from the trainer's (sha256 "
                                 f"{sha[:12]}, the trainer's {recipe.weights_sha256[:12]}): copy the same file")
        _MODELS.clear()
        _MODELS[recipe] = load_model(run, recipe.num_classes, RunOptions(progress=False), log=lambda msg: None)[:2]
    return _MODELS[recipe]


# ----------------------------------------------------------------------------- the frozen prefix

def cluster_prefix(job, options, store, log=print):
    """For `prefix_cache.dataset_activations(sharded=)`: the frozen prefix in shards, the missing
    ones computed on the cluster options.scheduler / options.workers name (started only when a
    shard is missing) and written to store's folder."""
    from .prefix_shards import sharded
    if not store.use_disk:
        raise NpgptError("--scheduler and --workers write the frozen prefix to the disk cache: drop --no-cache-disk")
    recipe = recipe_of(job.run, len(job.classes))

    def compute_missing(shards, depth, mode, digests, lora, causal, progress):
        from distributed import as_completed
        with cluster(options.scheduler, options.workers, log) as client:
            futures = {client.submit(prefix_shard, recipe, store.dir, s.seqs, depth, mode, digests, lora, causal,
                                     store.max_tokens, key=f"npgpt-prefix-{s.key[:20]}"): s for s in shards}
            for future in as_completed(futures):
                future.result()                  # a worker's error, raised here
                if progress:
                    progress(futures[future].tokens)
    return sharded(store, compute_missing, options.shard_tokens, log=log)


def prefix_shard(recipe, cache_dir, seqs, depth, mode, digests, lora, causal, max_tokens) -> str:
    """On a worker: one shard of the frozen prefix computed and written to the cache (nothing when
    it is there already). -> the worker's address"""
    from .prefix_cache import PrefixCache, weight_digests
    use_worker_threads()
    params, config = worker_model(recipe)
    if weight_digests(params, depth) != list(digests):
        raise NpgptError(f"Dask worker {worker_address()}: its model's frozen blocks differ from the trainer's "
                         f"(same npgpt and weights file {dict(recipe.run).get('weights')} needed on every worker)")
    store = PrefixCache(cache_dir, max_tokens=max_tokens)
    store.activations(params, config, seqs, depth, mode, digests=digests, lora=lora, causal=causal)
    return worker_address()
