"""Two processes with torch.distributed (gloo, CPU, tiny model) give the single-process results: locate
shards the facts and gathers the traces, C0 shards the corpus batches and all-reduces the sums."""

import os
import socket

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from editing.covariance import CorpusConfig, key_second_moments
from editing.stats_file import read_key_stats
from tracing.causal_trace import TraceConfig
from tracing.distributed import World, gather_shards, shard
from tracing.facts import known_facts, spread
from tracing.locate import locate

LAYERS = [1, 2]
TRACE = TraceConfig(kinds=("mlp",), samples=3, show_progress=False)


def corpus_config(folder: str) -> CorpusConfig:
    # 45 texts, batches of 4: 12 batches (the last one short), 6 per rank; the budget cuts the stream
    return CorpusConfig(source=folder, samples=45, max_tokens=12, batch_size=4, token_budget=400)


def _worker(rank: int, world: int, port: int, model, cache: str, corpus: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), FACTLENS_CACHE=cache)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = locate(model, spread(known_facts(), 5), TRACE, size=2, only_correct=False)
        c0 = key_second_moments(model, LAYERS, corpus_config(corpus), show_progress=False)
        torch.save({"scores": [t.scores["mlp"] for t in result.traces], "prompts": [t.prompt for t in result.traces],
                    "layers": result.critical.layers, "c0": c0}, f"{out}.rank{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tiny_llama, text_corpus, tmp_path, monkeypatch):
    corpus = text_corpus
    out = str(tmp_path / "result.pt")
    # forked: the workers start with the test's imports and model (spawned ones import torch, transformers
    # and TransformerLens again, about 10 s each); each is still its own process in a gloo group
    mp.start_processes(_worker, args=(2, _free_port(), tiny_llama, str(tmp_path / "cache2"), corpus, out),
                       nprocs=2, join=True, start_method="fork")

    monkeypatch.setenv("FACTLENS_CACHE", str(tmp_path / "cache1"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the workers: another thread count splits the sums differently
    try:
        single = locate(tiny_llama, spread(known_facts(), 5), TRACE, size=2, only_correct=False)
        single_c0 = key_second_moments(tiny_llama, LAYERS, corpus_config(corpus), show_progress=False)
    finally:
        torch.set_num_threads(threads)

    for rank in (0, 1):  # every rank holds the whole result
        both = torch.load(f"{out}.rank{rank}", weights_only=False)
        assert both["prompts"] == [t.prompt for t in single.traces]  # gathered back in the facts' order
        for scores, trace in zip(both["scores"], single.traces, strict=True):
            np.testing.assert_array_equal(scores, trace.scores["mlp"])
        assert tuple(both["layers"]) == single.critical.layers
        for layer in LAYERS:  # the all-reduced sum adds in another order: equal up to float32 rounding
            torch.testing.assert_close(both["c0"][layer], single_c0[layer], rtol=1e-5, atol=1e-6)
            assert not torch.equal(both["c0"][layer], torch.zeros_like(single_c0[layer]))
    # rank 0 wrote the files, with the whole corpus' counts
    written = sorted((tmp_path / "cache2" / "stats").rglob("mlp_key_mom2_layer*.safetensors"))
    alone = sorted((tmp_path / "cache1" / "stats").rglob("mlp_key_mom2_layer*.safetensors"))
    assert [p.name for p in written] == [p.name for p in alone] and len(written) == 2
    for a, b in zip(written, alone):
        assert read_key_stats(a)[1] == read_key_stats(b)[1]
        assert read_key_stats(a)[1].tokens == 400
    assert not list((tmp_path / "cache2").rglob("checkpoint_*"))  # checkpoints go once the files exist


def test_shards_cover_every_item_once():
    items = list(range(11))
    shards = [shard(items, World(rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == items and [len(s) for s in shards] == [4, 4, 3]
    assert shard(items) == items and gather_shards(items) == items  # alone: the identity
