"""Corpus runs on a Dask LocalCluster (loopback): the same store as one process, resumable, analyses on the cluster."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import stop_after

from attnflows_panel import shard
from attnflows_panel.cluster import PLUGIN, cluster_client, worker_devices
from attnflows_panel.corpus import Corpus
from attnflows_panel.errors import InputError
from attnflows_panel.store import RunStore, extract_corpus

pytestmark = pytest.mark.slow

WORDS = "the a car movie good bad awful great i love hate it was very safe and not".split()


def make_corpus(n: int) -> Corpus:
    rng = np.random.default_rng(3)
    return Corpus(texts=[" ".join(rng.choice(WORDS, size=rng.integers(1, 14))) for _ in range(n)], source="cluster-test")


@pytest.fixture(scope="module")
def client():
    with cluster_client(workers=2) as client:
        yield client


@pytest.fixture
def models(tiny_pair) -> dict:
    return {"pretrained": tiny_pair.pretrained, "finetuned": tiny_pair.finetuned}


def assert_same_store(a: RunStore, b: RunStore) -> None:
    for part in ("head_stats", "differences", "tokens"):
        pd.testing.assert_frame_equal(getattr(a, part)(), getattr(b, part)())
    for sid in range(a.manifest["n_sentences"]):
        for model in a.models:
            pd.testing.assert_frame_equal(a.entries(sid, model), b.entries(sid, model))
    np.testing.assert_array_equal(a.head_distances().total, b.head_distances().total)


def test_a_cluster_writes_the_store_one_process_writes(client, models, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shard, "WINDOW_SENTENCES", 16)  # three windows of shards, spread over both workers
    corpus = make_corpus(40)
    local = extract_corpus(models, corpus, tmp_path / "local", shard_size=8, head_map_sentences=12, progress=False)
    shards: list[int] = []
    clustered = extract_corpus(models, corpus, tmp_path / "cluster", shard_size=8, head_map_sentences=12, progress=False, client=client, on_shard=shards.append)
    assert sorted(shards) == list(range(5)) and clustered.complete
    assert clustered.manifest["fingerprint"] == local.manifest["fingerprint"]
    assert_same_store(local, clustered)
    assert set(worker_devices(client).values()) == {"cpu"} and len(worker_devices(client)) == 2


def test_a_killed_cluster_run_resumes(client, models, tmp_path: Path) -> None:
    corpus = make_corpus(40)
    done: list[int] = []
    with pytest.raises(KeyboardInterrupt):
        extract_corpus(models, corpus, tmp_path / "run", shard_size=8, progress=False, client=client, on_shard=stop_after(2, done))
    assert RunStore.open(tmp_path / "run").describe().startswith("16 of 40")
    resumed: list[int] = []
    store = extract_corpus(models, corpus, tmp_path / "run", shard_size=8, progress=False, client=client, on_shard=resumed.append)
    assert sorted(resumed) == sorted(set(range(5)) - set(done)) and store.complete
    assert_same_store(extract_corpus(models, corpus, tmp_path / "local", shard_size=8, progress=False), store)
    # the same models again: each worker keeps the one plugin that loaded them, not a copy per run
    plugins = client.run(lambda dask_worker: [name for name in dask_worker.plugins if name.startswith(PLUGIN)])
    assert all(len(names) == 1 for names in plugins.values())


def test_corpus_computations_run_on_the_cluster(client, models, tmp_path: Path) -> None:
    from attnflows_panel.analysis.compare import store_head_differences
    from attnflows_panel.analysis.embedding import store_head_distances

    store = extract_corpus(models, make_corpus(20), tmp_path / "run", shard_size=6, progress=False)
    on_cluster = store_head_distances(store, client=client)
    here = store_head_distances(store, workers=1)
    assert on_cluster.n_sentences == here.n_sentences == 20
    # float32 sums packed per shard, not across shards: about 1e-6 nats per query token apart (see clark_head_distances)
    np.testing.assert_allclose(on_cluster.total, here.total, rtol=2e-5, atol=1e-6 * here.n_tokens)
    some = store_head_distances(store, ["finetuned"], sentence_ids=[2, 9, 13], client=client)
    alone = store_head_distances(store, ["finetuned"], sentence_ids=[2, 9, 13])
    np.testing.assert_allclose(some.total, alone.total, rtol=2e-5, atol=1e-6 * alone.n_tokens)
    differences = store_head_differences(store)  # dask.dataframe computes on the active client's cluster
    assert differences.n_sentences == 20 and np.isfinite(differences.js).all()


def test_cluster_arguments_are_checked() -> None:
    with pytest.raises(InputError, match="not both"), cluster_client("tcp://127.0.0.1:1", 2):
        pass
    with pytest.raises(InputError, match="at least 1"), cluster_client(None, 0):
        pass
    with pytest.raises(InputError, match="cannot reach the Dask scheduler at tcp://127.0.0.1:9"), cluster_client("tcp://127.0.0.1:9"):
        pass


def test_a_scheduler_without_workers_is_waited_on_then_named(monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed import LocalCluster

    import attnflows_panel.cluster as cluster

    monkeypatch.setattr(cluster, "WORKER_WAIT_SECONDS", 1)
    told: list[str] = []
    with LocalCluster(n_workers=0, processes=False, protocol="tcp", host="127.0.0.1", dashboard_address=None) as empty:
        address = empty.scheduler_address
        with pytest.raises(InputError, match=f"^no worker joined the Dask scheduler at {address} in 1 s; start one with: dask worker {address}$"):
            with cluster_client(address.removeprefix("tcp://"), on_wait=told.append):
                pass
    assert told == [f"the scheduler at {address} has no worker yet; waiting 1 s for one (start it with: dask worker {address})"]
