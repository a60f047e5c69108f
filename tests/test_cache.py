"""Content-keyed cache: hit on equal options, miss on any changed option, nothing trusted by path."""

from __future__ import annotations

import json

import pytest
import torch

from astra.cache import TensorCache, cache_key, weight_fingerprint
from tests.conftest import requires_data
from tests.test_astra_init import build


def test_tensor_cache_round_trip_and_verification(tmp_path):
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


CHANGES = [
    "calib.n=12",
    "calib.seq_len=40",
    "calib.seed=7",
    "calib.format=text",
    "calib.padding=max_length",
    "method.centered=false",
    "method.sample_norm=max_abs",
    "method.mask_padding=false",
    "method.normalizer=forwards",
    "method.accum_dtype=fp64",
    "method.eig_dtype=fp64",
    "method.select=head",
    "method.rank=4",
    "method.cache_covariances=true",
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


@pytest.mark.parametrize("grouping", ["all"])
@requires_data
def test_grouping_does_not_change_the_key(compose, tmp_path, grouping):
    """Statistics are taken on the unmodified base model, so grouping is not part of the content."""
    build(compose, tmp_path)
    _, report, _, _ = build(compose, tmp_path, [f"method.stats_grouping={grouping}"])
    assert report.extra["cache"] == "hit"
