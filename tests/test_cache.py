"""Content-keyed cache: atomic streaming entries verified on read, concurrent writers, finite values only;
the Astra build hits on equal options and misses on any changed option."""

from __future__ import annotations

import json
import multiprocessing
import threading
from pathlib import Path

import pytest
import torch

from astra.cache import NonFiniteCacheError, TensorCache, cache_key, weight_fingerprint
from tests.conftest import requires_data

MATERIAL = {"model": "m", "n": 4, "layers": ["a", "b"]}


def layer_tensors(i: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(i)
    return {"values": torch.randn(5, generator=gen), "vectors": torch.randn(5, 3, generator=gen)}


def write(cache: TensorCache, material=MATERIAL, names=("a", "b")) -> None:
    with cache.writer(material) as w:
        for i, name in enumerate(names):
            w.add(name, layer_tensors(i), {"tokens": 10 + i})


def test_streaming_round_trip_is_lazy_and_ordered(tmp_path):
    cache = TensorCache(tmp_path, "t")
    assert cache.reader(MATERIAL) is None
    write(cache)
    reader = cache.reader(MATERIAL)
    assert list(reader) == ["a", "b"] and len(reader) == 2
    tensors, meta = reader["b"]
    assert meta == {"tokens": 11}
    assert all(torch.equal(tensors[k], layer_tensors(1)[k]) for k in ("values", "vectors"))
    assert cache.reader({**MATERIAL, "n": 5}) is None  # another key
    assert not [p for p in cache.dir.iterdir() if p.name.startswith(".tmp-")]


def test_exception_inside_writer_leaves_no_entry(tmp_path):
    cache = TensorCache(tmp_path, "t")
    with pytest.raises(RuntimeError, match="crash"):
        with cache.writer(MATERIAL) as w:
            w.add("a", layer_tensors(0), {})
            raise RuntimeError("crash")
    assert cache.reader(MATERIAL) is None
    assert list(cache.dir.iterdir()) == []


def test_non_finite_is_never_cached(tmp_path):
    cache = TensorCache(tmp_path, "t")
    with pytest.raises(NonFiniteCacheError, match="'b'"):
        with cache.writer(MATERIAL) as w:
            w.add("a", layer_tensors(0), {})
            w.add("b", {"values": torch.tensor([1.0, float("nan")])}, {})
    assert cache.reader(MATERIAL) is None and list(cache.dir.iterdir()) == []
    with pytest.raises(NonFiniteCacheError):
        cache.save(MATERIAL, {"x": torch.tensor([float("inf")])}, {})


def corrupt_layer(path: Path) -> None:
    file = path / "layers" / "1.safetensors"
    data = bytearray(file.read_bytes())
    data[-3] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["layer_bytes", "missing_checksum", "index_edited", "other_material"])
def test_bad_entry_is_removed_with_a_warning_and_rebuilt(tmp_path, caplog, damage):
    cache = TensorCache(tmp_path, "t")
    write(cache)
    path = cache.entry(MATERIAL)
    if damage == "layer_bytes":
        corrupt_layer(path)
    elif damage == "missing_checksum":  # a writer that died before its last write
        (path / "CHECKSUM").unlink()
    else:
        index = json.loads((path / "index.json").read_text())
        if damage == "index_edited":
            index["layers"][0]["meta"]["tokens"] = 99
        else:  # material edited *and* checksum recomputed: the material check still refuses it
            index["material"]["n"] = 99
        (path / "index.json").write_text(json.dumps(index))
        if damage == "other_material":
            import hashlib

            (path / "CHECKSUM").write_text(hashlib.sha256((path / "index.json").read_bytes()).hexdigest())
    with caplog.at_level("WARNING", logger="astra.cache"):
        assert cache.reader(MATERIAL) is None
    assert "removed, it will be rebuilt" in caplog.text
    assert not path.exists()
    write(cache)  # rebuilt
    assert cache.reader(MATERIAL)["a"][1] == {"tokens": 10}


def test_second_writer_uses_the_first_writers_entry(tmp_path):
    cache = TensorCache(tmp_path, "t")
    with cache.writer(MATERIAL) as late:
        late.add("a", {"values": torch.zeros(2)}, {"who": "late"})
        write(cache, names=("a",))  # another writer commits first
    reader = cache.reader(MATERIAL)
    assert reader["a"][1] == {"tokens": 10}  # the first rename won; the late writer dropped its own
    assert [p.name for p in cache.dir.iterdir()] == [cache.entry(MATERIAL).name]


def test_concurrent_threads_write_one_valid_entry(tmp_path):
    cache = TensorCache(tmp_path, "t")
    barrier, errors = threading.Barrier(4), []

    def worker() -> None:
        try:
            barrier.wait()
            write(cache)
        except Exception as err:  # noqa: BLE001 - collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert cache.reader(MATERIAL)["a"][1] == {"tokens": 10}
    assert [p.name for p in cache.dir.iterdir()] == [cache.entry(MATERIAL).name]


def _process_writer(root: str, barrier) -> None:
    barrier.wait()
    write(TensorCache(root, "t"))


def test_concurrent_processes_write_one_valid_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_process_writer, args=(str(tmp_path), barrier)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    cache = TensorCache(tmp_path, "t")
    reader = cache.reader(MATERIAL)
    assert reader is not None and list(reader) == ["a", "b"]
    assert [p.name for p in cache.dir.iterdir()] == [cache.entry(MATERIAL).name]


def test_tensor_cache_round_trip_and_verification(tmp_path):
    """The former whole-entry API (load/save)."""
    cache = TensorCache(tmp_path, "t")
    material = {"model": "m", "n": 4, "layers": ["a", "b"]}
    assert cache.load(material) is None
    path = cache.save(material, {"a.values": torch.arange(3.0)}, {"a": {"tokens": 5}})
    tensors, extra = cache.load(material)
    assert torch.equal(tensors["a.values"], torch.arange(3.0)) and extra == {"a": {"tokens": 5}}
    assert cache.load({**material, "n": 5}) is None  # another key

    meta = json.loads((path / "meta.json").read_text())
    meta["material"]["n"] = 99  # a folder whose recorded material differs is not trusted
    (path / "meta.json").write_text(json.dumps(meta))
    assert cache.load(material) is None

    path = cache.save(material, {"a.values": torch.arange(3.0)}, {})
    with (path / "tensors.safetensors").open("r+b") as f:  # corrupted tensors fail the checksum
        f.seek(-4, 2)
        f.write(b"\x00\x00\x80\x7f")
    assert cache.load(material) is None


def test_key_is_order_independent_and_fingerprint_tracks_weights():
    assert cache_key({"a": 1, "b": [1, 2]}) == cache_key({"b": [1, 2], "a": 1})
    w = torch.randn(64, 32)
    w2 = w.clone()
    w2[0, 0] += 1.0  # the first element is always sampled
    assert weight_fingerprint(w) == weight_fingerprint(w.clone()) != weight_fingerprint(w2)


def build(*args, **kwargs):
    """The Astra build helper of tests/test_astra_init.py (imported lazily: the pure cache tests above
    do not depend on the method)."""
    from tests.test_astra_init import build as astra_build

    return astra_build(*args, **kwargs)


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@requires_data
def test_hit_on_equal_options_gives_identical_init(compose, tmp_path):
    first, report1, _, _ = build(compose, tmp_path)
    second, report2, base, init = build(compose, tmp_path)
    assert report1.extra["cache"] == "miss" and report2.extra["cache"] == "hit"
    a, b = lora_weights(first), lora_weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert report1.layers == report2.layers
    assert (init - base).abs().max() < 1e-4


# the key is the content (calibration tensors, weights, options), not the config: calib.padding=max_length
# is absent because the test's samples all reach seq_len, so its batches are the same tensors (a hit)
CHANGES = [
    "calib.n=12",
    "calib.seq_len=40",
    "calib.seed=7",
    "calib.format=text",
    "method.centered=false",
    "method.sample_norm=max_abs",
    "method.mask_padding=false",
    "method.normalizer=forwards",
    "method.accum_dtype=fp64",
    "method.eig_dtype=fp64",
    "seed=1",  # another random tiny-bert: model identity and weights change
]


@requires_data
def test_miss_on_any_changed_option(compose, tmp_path):
    build(compose, tmp_path)
    for change in CHANGES:
        _, report, _, _ = build(compose, tmp_path, [change])
        assert report.extra["cache"] == "miss", change


@requires_data
def test_cache_off(compose, tmp_path):
    _, report, _, _ = build(compose, tmp_path, ["method.cache=false"])
    assert report.extra["cache"] == "off"


@pytest.mark.parametrize(
    "change",
    ["method.stats_engine=forward", "method.accumulate=direct", "method.rank=4", "method.select=head"],
)
@requires_data
def test_exact_engine_choices_rank_and_selection_do_not_change_the_key(compose, tmp_path, change):
    """Statistics are of the unmodified base model whatever the engine/accumulation (exact), and the
    cached content is rank- and selection-independent: a rank or selection ablation hits."""
    build(compose, tmp_path)
    _, report, _, _ = build(compose, tmp_path, [change])
    assert report.extra["cache"] == "hit", change
