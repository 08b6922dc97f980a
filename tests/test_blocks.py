"""Runs in blocks of images: the plan and its share-out, the statistics merged across blocks
(Chan's update) against float64 numpy, the block state's bytes, the partial folder and
--resume, and the torchrun environment (:mod:`mapsim.runner.blocks`,
:mod:`mapsim.runner.distributed`). In-process and fast; torchrun itself is in
test_distributed.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from files_spec import BROKEN_PNG, FILES_SPEC

from mapsim.tables.aggregation import SummaryAccumulator
from mapsim.runner.blocks import (
    STATE,
    BlockState,
    ImageBlock,
    Merged,
    PartialRun,
    assign_blocks,
    moments_from_state,
    moments_state,
    pack,
    plan_blocks,
    unpack,
)
from mapsim.engine.step import DeadCount, DeadKey
from mapsim.runner.distributed import World
from mapsim.errors import ImageError, MapsimError, OutputError, SpecError
from mapsim.engine.moments import Moments, compute_moments
from mapsim.runner.writer import TablePart
from mapsim.engine.similarity import Block



@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    """The in-process runs here are one process, whatever launched pytest."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)


# =========================================================================== plan and share-out
def test_plan_blocks_cuts_consecutive_blocks_with_a_short_last_one():
    blocks = plan_blocks(7, 2)
    assert [(b.index, b.start, b.stop) for b in blocks] == [(0, 0, 2), (1, 2, 4), (2, 4, 6),
                                                            (3, 6, 7)]
    assert [b.size for b in blocks] == [2, 2, 2, 1]
    assert [(b.start, b.stop) for b in plan_blocks(6, 3)] == [(0, 3), (3, 6)]
    assert [(b.start, b.stop) for b in plan_blocks(3, 16)] == [(0, 3)]
    assert plan_blocks(0, 4) == []
    for n in range(1, 40):
        for size in range(1, 9):
            blocks = plan_blocks(n, size)
            covered = [i for b in blocks for i in range(b.start, b.stop)]
            assert covered == list(range(n))
            assert all(b.size == size for b in blocks[:-1]) and 1 <= blocks[-1].size <= size
            assert [b.index for b in blocks] == list(range(len(blocks)))


def _shares(blocks, done, world_size):
    return [assign_blocks(blocks, done, world_size, rank) for rank in range(world_size)]


def _check_share_out(n: int, size: int, world: int, done_every: int) -> None:
    blocks = plan_blocks(n, size)
    done = {b.index for b in blocks if done_every and b.index % done_every == 1}
    todo = [b for b in blocks if b.index not in done]
    shares = _shares(blocks, done, world)

    # every block not done goes to exactly one rank, done blocks to none; and the shares of
    # rank 0, 1, ... concatenated are the remaining blocks in block order: each rank has a
    # contiguous run of them, in order, and the ranks follow each other in order
    given = [b.index for share in shares for b in share]
    assert given == [b.index for b in todo]
    for share in shares:
        if share:
            first = todo.index(share[0])
            assert share == todo[first:first + len(share)]
    # balanced: every rank is within one block of its fair share of the images
    total = sum(b.size for b in todo)
    counts = [sum(b.size for b in share) for share in shares]
    assert sum(counts) == total
    assert all(abs(count - total / world) <= size for count in counts), counts
    if not done and n % size == 0:  # equal blocks: no two ranks differ by more than a block
        assert max(counts) - min(counts) <= size, counts


def test_assign_blocks_shares_each_block_once_in_contiguous_balanced_runs():
    for n in (1, 2, 7, 8, 16, 23, 50, 97):
        for size in (1, 2, 3, 5, 16):
            for world in (1, 2, 3, 4, 8):
                for done_every in (0, 2, 3):
                    try:
                        _check_share_out(n, size, world, done_every)
                    except AssertionError as exc:
                        raise AssertionError(
                            f"{n} images in blocks of {size}, {world} ranks, done: the blocks "
                            f"with index % {done_every} == 1: {exc}") from exc


def test_assign_blocks_examples():
    blocks = plan_blocks(8, 2)  # four blocks of two images
    assert [[b.index for b in s] for s in _shares(blocks, set(), 2)] == [[0, 1], [2, 3]]
    assert [[b.index for b in s] for s in _shares(blocks, set(), 4)] == [[0], [1], [2], [3]]
    # a resumed run: blocks 0 to 2 are done, the one left goes to one rank
    assert [[b.index for b in s] for s in _shares(blocks, {0, 1, 2}, 2)] == [[], [3]]
    # everything done: nothing for anyone
    assert _shares(blocks, {0, 1, 2, 3}, 3) == [[], [], []]
    # one process takes all
    assert assign_blocks(blocks, {1}, 1, 0) == [blocks[0], blocks[2], blocks[3]]


def test_more_ranks_than_blocks_leaves_some_ranks_idle():
    blocks = plan_blocks(5, 2)  # three blocks
    shares = _shares(blocks, set(), 8)
    assert sorted(b.index for s in shares for b in s) == [0, 1, 2]
    assert all(len(s) <= 1 for s in shares)
    assert sum(1 for s in shares if not s) == 5
    assert sum(len(assign_blocks(plan_blocks(1, 4), set(), 3, r)) for r in range(3)) == 1


# =========================================================================== summaries merged
KEYS = ("metric", "layer", "depth")


def _image_tables(rng: np.random.Generator, n_images: int = 10) -> list[pd.DataFrame]:
    """Per-image tables as the aggregators give them: a string image column (not a statistic),
    keys (one int), numeric statistics with NaN holes, a boolean column (never a statistic), a
    key only in images 4 to 6, and a statistic only from image 7 on."""
    tables = []
    for i in range(n_images):
        keys = [("pearson", "blocks.0", 0), ("pearson", "blocks.1", 1), ("cosine", "blocks.0", 0)]
        if 4 <= i < 7:
            keys.insert(1, ("late", "blocks.9", 9))  # only in the second part
        rows = []
        for k, key in enumerate(keys):
            best = 1000.0 + rng.normal(0, 3) + 10 * k  # a large mean: tests the update's care
            worst = rng.normal(-1, 0.5)
            if (i + k) % 4 == 0:
                best = np.nan
            if key[0] == "cosine" and i < 5:
                worst = np.nan  # undefined for the whole first part
            rows.append({"image": f"img{i}", "metric": key[0], "layer": key[1],
                         "depth": key[2], "best": best, "worst": worst,
                         "flag": bool(k % 2)})
        frame = pd.DataFrame(rows)
        if i >= 7:
            frame["extra"] = rng.uniform(0, 1, len(frame))
        tables.append(frame)
    return tables


def _reference_summary(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """mean / std (ddof=1) / count over images in float64 numpy, rows in order of first
    appearance (keys in table order, then the statistics in column order)."""
    values: dict[tuple, list[float]] = {}
    for frame in tables:
        stats = [c for c in frame.columns if c not in (*KEYS, "image", "flag")]
        for _, row in frame.iterrows():
            key = tuple(row[k] for k in KEYS)
            for stat in stats:
                values.setdefault((key, stat), []).append(float(row[stat]))
    out = []
    for (key, stat), vals in values.items():
        v = np.array(vals, dtype=np.float64)
        count = int(np.sum(~np.isnan(v)))
        mean = np.nanmean(v) if count else np.nan
        std = np.nanstd(v, ddof=1) if count > 1 else np.nan
        out.append({**dict(zip(KEYS, key)), "statistic": stat, "mean": mean, "std": std,
                    "n_images": count})
    return pd.DataFrame(out)


def _fed(tables: list[pd.DataFrame]) -> SummaryAccumulator:
    acc = SummaryAccumulator(KEYS)
    for frame in tables:
        acc.add(frame, skip=("image",))
    return acc


def _assert_summary_matches(table: pd.DataFrame, reference: pd.DataFrame) -> None:
    assert list(table.columns) == [*KEYS, "statistic", "mean", "std", "n_images"]
    key_cols = [*KEYS, "statistic"]
    assert table[key_cols].values.tolist() == reference[key_cols].values.tolist()
    assert table["n_images"].tolist() == reference["n_images"].tolist()
    np.testing.assert_allclose(table["mean"].to_numpy(float), reference["mean"].to_numpy(float),
                               rtol=1e-12, atol=0, equal_nan=True)
    np.testing.assert_allclose(table["std"].to_numpy(float), reference["std"].to_numpy(float),
                               rtol=1e-9, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("cuts", [(4,), (4, 7), (1, 9), (0, 4), (4, 7, 10)])
def test_summary_merge_equals_numpy_and_one_accumulator(cuts):
    tables = _image_tables(np.random.default_rng(7))
    reference = _reference_summary(tables)
    assert "late" in set(reference.metric)  # the key of the second part only
    assert "extra" in set(reference.statistic)
    assert reference.loc[reference.statistic == "worst"].query("metric == 'cosine'")[
        "n_images"].iloc[0] == 5

    edges = [0, *cuts, len(tables)]
    parts = [_fed(tables[a:b]) for a, b in zip(edges, edges[1:])]
    merged = parts[0]
    for part in parts[1:]:
        merged.merge(part)
    single = _fed(tables)

    _assert_summary_matches(single.table(), reference)  # the reference is right about Welford
    _assert_summary_matches(merged.table(), reference)
    # the same rows, in the single accumulator's order
    pd.testing.assert_frame_equal(merged.table()[[*KEYS, "statistic", "n_images"]],
                                  single.table()[[*KEYS, "statistic", "n_images"]])


def test_summary_merge_refuses_other_keys():
    with pytest.raises(ValueError, match="cannot merge"):
        SummaryAccumulator(("metric",)).merge(SummaryAccumulator(("metric", "layer")))


def _through_bytes(acc: SummaryAccumulator) -> SummaryAccumulator:
    meta, arrays = acc.state()
    meta, arrays = unpack(pack({"s": meta}, arrays))
    return SummaryAccumulator.from_state(meta["s"], arrays)


def test_summary_state_round_trip_keeps_the_table_exactly():
    tables = _image_tables(np.random.default_rng(3))
    acc = _fed(tables)
    again = _through_bytes(acc)
    pd.testing.assert_frame_equal(again.table(), acc.table(), check_exact=True)
    # an empty one too
    empty = _through_bytes(SummaryAccumulator(KEYS))
    assert empty.table().empty and list(empty.table().columns) == list(acc.table().columns)

    # a restored accumulator merges and goes on adding like the original
    first, second = _through_bytes(_fed(tables[:5])), _through_bytes(_fed(tables[5:8]))
    first.merge(second)
    for frame in tables[8:]:
        first.add(frame, skip=("image",))
    _assert_summary_matches(first.table(), _reference_summary(tables))


# =========================================================================== block state bytes
def _random_maps(rng, n_maps=6, n_pixels=900, offset=3.0) -> np.ndarray:
    base = rng.standard_normal((3, n_pixels))
    mix = rng.standard_normal((n_maps, 3))
    z = mix @ base + 0.5 * rng.standard_normal((n_maps, n_pixels)) + offset
    return np.maximum(z, 2.5).astype(np.float32)  # rectified, some long constant runs


LAYERS = [(0, 2), (2, 6)]


def _numpy_moments(z: np.ndarray, layers=LAYERS):
    """mean, centred co-moment, per-layer sum_p a_l a_k and sum_p a_l (z_j - m_j), float64."""
    z = z.astype(np.float64)
    mean = z.mean(axis=1)
    zc = z - mean[:, None]
    a = np.stack([(zc[s:e] ** 2).sum(axis=0) for s, e in layers])
    return mean, zc @ zc.T, a @ a.T, a @ zc.T


def _assert_moments_close(m: Moments, z: np.ndarray, layer_stats: bool) -> None:
    mean, comoment, norms, third = _numpy_moments(z)
    assert m.n == z.shape[1]
    scale = np.abs(comoment).max()
    np.testing.assert_allclose(m.mean.numpy(), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(m.comoment.numpy(), comoment, rtol=0, atol=1e-6 * scale)
    if layer_stats:
        assert m.layers == tuple(LAYERS)
        # (merged, these pick up the float32-product rounding of the co-moments: ~1e-7)
        np.testing.assert_allclose(m.layer_norms.numpy(), norms, rtol=0,
                                   atol=1e-7 * np.abs(norms).max())
        np.testing.assert_allclose(m.layer_third.numpy(), third, rtol=0,
                                   atol=1e-7 * np.abs(third).max())
    else:
        assert m.layer_norms is None and m.layer_third is None


def _moments(z: np.ndarray, layer_stats: bool) -> Moments:
    return compute_moments(torch.from_numpy(z), chunk_pixels=128,
                           layers=LAYERS if layer_stats else None)


@pytest.mark.parametrize("layer_stats", [False, True])
def test_moments_state_round_trip(layer_stats):
    z = _random_maps(np.random.default_rng(1))
    moments = _moments(z, layer_stats)
    meta, arrays = moments_state(moments)
    meta, arrays = unpack(pack({"m": meta}, arrays))
    again = moments_from_state(meta["m"], arrays)
    assert again.n == moments.n and again.layers == moments.layers
    assert torch.equal(again.mean, moments.mean)
    assert torch.equal(again.comoment, moments.comoment)
    assert again.mean.dtype == again.comoment.dtype == torch.float64
    if layer_stats:
        assert torch.equal(again.layer_norms, moments.layer_norms)
        assert torch.equal(again.layer_third, moments.layer_third)
    else:
        assert again.layer_norms is None and again.layer_third is None


def _state(index, start, stop, ids, rank, summaries, pooled, dead, capture=None):
    return BlockState(
        ImageBlock(index, start, stop), ids=ids, rank=rank, summaries=summaries,
        pooled=pooled,
        layouts={0: [Block("a", "blocks.0", 0, 2, (24, 28)), Block("b", "blocks.1", 2, 6,
                                                                   (12, 14))]},
        dead_counts=dead, observers={} if capture is None else {"plots": capture})


def test_block_state_round_trip_keeps_everything():
    rng = np.random.default_rng(5)
    tables = _image_tables(rng, 4)
    z = _random_maps(rng)
    capture = ({"thumbs": [["img0", [["a\x1fblocks.0", "thumbs/0"]]]], "mats": [],
                "meta": {"img0": {"note": "é", "n": 3}}},
               {"thumbs/0": rng.standard_normal((2, 5, 7)).astype(np.float16),
                "mats/1": rng.standard_normal((3, 3)).astype(np.float32),
                "mask": np.array([[True, False]]), "ints": np.arange(6, dtype=np.uint8)})
    state = _state(3, 6, 10, ["img6", "img7", "ümlaut", "img9"], 1,
                   {"max": _fed(tables), "layer_similarity": _fed(tables[:2]),
                    "empty": SummaryAccumulator(("metric",))},
                   {0: _moments(z, True), 1: _moments(z[:3], False)},
                   {DeadKey("pearson", "a", "blocks.0"): DeadCount(3, 4),
                    DeadKey("cka", "b", "blocks.1"): DeadCount(0, 4)},
                   capture)
    again = BlockState.from_bytes(state.to_bytes())

    assert again.block == ImageBlock(3, 6, 10)
    assert again.ids == state.ids and again.rank == 1
    assert set(again.summaries) == set(state.summaries)
    for name, summary in state.summaries.items():
        pd.testing.assert_frame_equal(again.summaries[name].table(), summary.table(),
                                      check_exact=True)
    assert set(again.pooled) == {0, 1}
    for group, moments in state.pooled.items():
        got = again.pooled[group]
        assert got.n == moments.n and got.layers == moments.layers
        for name in ("mean", "comoment", "layer_norms", "layer_third"):
            want = getattr(moments, name)
            if want is None:
                assert getattr(got, name) is None
            else:
                assert torch.equal(getattr(got, name), want), name
    assert again.layouts == state.layouts
    assert again.dead_counts == state.dead_counts
    assert again.observers["plots"][0] == capture[0]
    assert set(again.observers["plots"][1]) == set(capture[1])
    for name, array in capture[1].items():
        assert again.observers["plots"][1][name].dtype == array.dtype
        np.testing.assert_array_equal(again.observers["plots"][1][name], array)


def test_an_empty_block_state_round_trips():
    state = BlockState(ImageBlock(0, 0, 1), ids=["x"])
    again = BlockState.from_bytes(state.to_bytes())
    assert (again.block, again.ids, again.rank) == (state.block, ["x"], 0)
    assert again.summaries == again.pooled == again.layouts == again.dead_counts == {}
    assert again.observers == {}


@pytest.mark.parametrize("layer_stats", [False, True])
def test_blocks_merged_in_order_equal_numpy_over_all_pixels(layer_stats):
    """Moments and summaries of blocks, each through its bytes, merged by Merged: the moments
    of the concatenated pixels (float64 numpy), the summaries of all images."""
    rng = np.random.default_rng(11)
    z = _random_maps(rng, n_pixels=1500)
    tables = _image_tables(rng, 9)
    cuts = [(0, 0, 400, 0, 3), (1, 400, 650, 3, 6), (2, 650, 1500, 6, 9)]
    merged = Merged()
    for index, p0, p1, i0, i1 in cuts:
        state = _state(index, i0, i1, [f"img{i}" for i in range(i0, i1)], index % 2,
                       {"max": _fed(tables[i0:i1])}, {0: _moments(z[:, p0:p1], layer_stats)},
                       {DeadKey("pearson", "a", "blocks.0"): DeadCount(index, i1 - i0)})
        merged.add(BlockState.from_bytes(state.to_bytes()))

    assert merged.n_images == 9
    _assert_moments_close(merged.pooled[0], z, layer_stats)
    # the independent reference agrees with one pass over all pixels, too
    _assert_moments_close(_moments(z, layer_stats), z, layer_stats)
    _assert_summary_matches(merged.summaries["max"].table(), _reference_summary(tables))
    assert merged.dead_counts == {DeadKey("pearson", "a", "blocks.0"): DeadCount(0 + 1 + 2, 9)}
    assert merged.layouts[0][1] == Block("b", "blocks.1", 2, 6, (12, 14))


# =========================================================================== the partial folder
def _commit(partial: PartialRun, index: int, start: int, stop: int, rows: str) -> None:
    partial.part(index, TablePart("max", ("image", "value"), rows.encode()))
    partial.commit(BlockState(ImageBlock(index, start, stop),
                              ids=[f"img{i}" for i in range(start, stop)]))


def _partial(tmp_path, **kw) -> PartialRun:
    args = {"spec_sha256": "a" * 64, "n_images": 8, "block_images": 2} | kw
    return PartialRun(tmp_path / "out", args.pop("spec_sha256"), args.pop("n_images"),
                      args.pop("block_images"), **args)


def _rows(partial: PartialRun) -> str:
    return (partial.rows.folder / "max.csv").read_text()


def test_partial_run_puts_the_rows_in_block_order(tmp_path):
    partial = _partial(tmp_path)
    assert partial.folder == (tmp_path / ".out.partial").resolve()
    progress = json.loads((partial.folder / "progress.json").read_text())
    assert progress == {"spec_sha256": "a" * 64, "n_images": 8, "block_images": 2,
                        "in_rows": 0, "sizes": {}, "headers": {}}
    # blocks finish out of order (as they arrive from several ranks): block 1 waits in its
    # folder, block 0 goes straight into the rows, and block 1 follows it
    _commit(partial, 1, 2, 4, "img2,1\nimg3,1\n")
    assert (partial.block_folder(1) / "max.csv").exists() and partial.in_rows == 0
    _commit(partial, 0, 0, 2, "img0,0\nimg1,0\n")
    assert partial.done == {0, 1} and partial.in_rows == 2
    assert _rows(partial) == "image,value\nimg0,0\nimg1,0\nimg2,1\nimg3,1\n"
    assert sorted(p.name for p in partial.blocks.iterdir()) == ["000000", "000001"]
    for index in (0, 1):  # only the states are left in the block folders
        assert [p.name for p in partial.block_folder(index).iterdir()] == [STATE]
    progress = json.loads((partial.folder / "progress.json").read_text())
    assert progress["in_rows"] == 2 and progress["headers"] == {"max": ["image", "value"]}
    assert progress["sizes"] == {"max": len(_rows(partial).encode())}

    merged = partial.merge(plan_blocks(4, 2))
    assert merged.n_images == 4 and merged.images_per_rank == {0: 4}
    with pytest.raises(OutputError, match="block 2 .*never finished"):
        partial.merge(plan_blocks(8, 2))


def test_resume_keeps_finished_blocks_and_drops_one_being_written(tmp_path):
    partial = _partial(tmp_path)
    _commit(partial, 0, 0, 2, "img0,0\nimg1,0\n")
    _commit(partial, 2, 4, 6, "img4,0\nimg5,0\n")  # out of order: waits in its folder
    # block 1 was being written straight into the rows when the run stopped, and block 3
    # into its own folder
    partial.part(1, TablePart("max", ("image", "value"), b"img2,1\n"))
    partial.part(3, TablePart("max", ("image", "value"), b"img6,1\n"))
    assert _rows(partial).endswith("img2,1\n")
    tmp_block = partial.blocks / ".000003.tmp"
    assert tmp_block.is_dir()
    # a stray folder without a state is not a finished block either
    (partial.blocks / "000004").mkdir()
    # nor is what a failed merge left among the rows
    (partial.rows.folder / "summary.csv").write_text("x\n")

    again = _partial(tmp_path, resume=True)
    assert again.done == {0, 2} and again.in_rows == 1
    assert _rows(again) == "image,value\nimg0,0\nimg1,0\n"  # block 1's row is cut
    assert sorted(p.name for p in again.rows.folder.iterdir()) == ["max.csv"]
    assert not tmp_block.exists()
    assert not (partial.blocks / "000004").exists()
    assert sorted(p.name for p in again.blocks.iterdir()) == ["000000", "000002"]
    # block 1 again, then block 2's rows follow it
    _commit(again, 1, 2, 4, "img2,1\nimg3,1\n")
    assert again.in_rows == 3
    assert _rows(again) == "image,value\nimg0,0\nimg1,0\nimg2,1\nimg3,1\nimg4,0\nimg5,0\n"


@pytest.mark.parametrize("change, message", [
    ({"spec_sha256": "b" * 64}, "the spec has changed"),
    ({"n_images": 9}, "the number of images has changed"),
    ({"block_images": 4}, "engine.block_images has changed"),
])
def test_resume_refuses_a_changed_run_and_leaves_its_blocks(tmp_path, change, message):
    partial = _partial(tmp_path)
    _commit(partial, 0, 0, 2, "img0,0\nimg1,0\n")
    with pytest.raises(OutputError, match=message) as info:
        _partial(tmp_path, resume=True, **change)
    assert "without --resume" in str(info.value)
    assert str(next(iter(change.values()))) in str(info.value)  # names the new value
    assert (partial.block_folder(0) / STATE).exists()  # nothing removed by the refusal
    # without --resume: a fresh start
    fresh = _partial(tmp_path, **change)
    assert fresh.done == set() and list(fresh.blocks.iterdir()) == []


def test_resume_without_a_partial_folder_starts_afresh(tmp_path):
    partial = _partial(tmp_path, resume=True)
    assert partial.done == set() and partial.blocks.is_dir()


def test_resume_of_a_complete_run_has_nothing_to_resume(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "run.json").write_text("{}")
    with pytest.raises(OutputError, match="nothing to resume"):
        _partial(tmp_path, resume=True)
    with pytest.raises(OutputError, match="nothing to resume"):
        _partial(tmp_path, resume=True, overwrite=True)
    assert not (tmp_path / ".out.partial").exists()


def test_keep_or_remove(tmp_path):
    partial = _partial(tmp_path)
    partial.part(0, TablePart("max", ("image", "value"), b"img0,0\n"))  # never finished
    assert partial.keep_or_remove() is None
    assert not partial.folder.exists()

    partial = _partial(tmp_path)
    _commit(partial, 0, 0, 2, "img0,0\nimg1,0\n")
    partial.part(1, TablePart("max", ("image", "value"), b"img2,1\n"))
    note = partial.keep_or_remove()
    assert "1 finished block(s)" in note and "--resume" in note and str(partial.folder) in note
    assert sorted(p.name for p in partial.blocks.iterdir()) == ["000000"]


# =========================================================================== resume, in process
#: debiased CKA needs per-layer pixel statistics (no fast path; pooled moments carry
#: layer_norms through the block states); pearson and cosine take the fast path
METRICS = {"slow": ["pearson", {"name": "cka", "debiased": True}],
           "fast": ["pearson", "cosine"]}


@pytest.fixture(scope="module")
def synthetic_images(tmp_path_factory) -> Path:
    from mapsim.cli import main

    out = tmp_path_factory.mktemp("synth") / "imgs"
    assert main(["data", "synth", "--count", "8", "--size", "48", "56", "--out", str(out),
                 "--quiet"]) == 0
    return out


def _workdir(tmp_path: Path, images: Path, metrics) -> Path:
    shutil.copytree(images, tmp_path / "imgs")
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(FILES_SPEC | {"metrics": metrics}))
    return tmp_path / "spec.yaml"


def _image(workdir: Path, index: int) -> Path:
    return workdir / "imgs" / f"synthetic-s0-i{index:04d}.png"


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _without_timings(run_json: bytes) -> dict:
    info = json.loads(run_json)
    info.pop("timings_s")
    info.pop("blocks")
    return info


# broken at 4: reading the first image of block 2 fails while the last image of block 1 is
# still in flight on the fast path; that block must be finished and kept all the same
@pytest.mark.parametrize("path,broken_at", [("slow", 5), ("fast", 5), ("fast", 4)])
def test_resume_in_one_process_does_only_the_blocks_left(tmp_path, synthetic_images,
                                                         monkeypatch, path, broken_at):
    from mapsim.runner import run as runner_module
    from mapsim.runner.run import run
    from mapsim.spec.run_spec import load_spec

    spec_path = _workdir(tmp_path, synthetic_images, METRICS[path])
    spec = load_spec(spec_path)
    out, partial = tmp_path / "out", tmp_path / ".out.partial"
    broken = _image(tmp_path, broken_at)  # block 2 (images 4 and 5)
    good = broken.read_bytes()
    broken.write_bytes(BROKEN_PNG)

    with pytest.raises(ImageError, match=f"synthetic-s0-i{broken_at:04d}.png") as info:
        run(spec, base_dir=tmp_path, out_dir=out, progress=False)
    notes = getattr(info.value, "__notes__", [])
    assert any("2 finished block(s)" in n and "--resume" in n for n in notes), notes
    assert not out.exists()
    assert sorted(p.name for p in (partial / "blocks").iterdir()) == ["000000", "000001"]
    assert all((partial / "blocks" / name / STATE).exists() for name in ("000000", "000001"))

    broken.write_bytes(good)
    submitted: list[str] = []
    original = runner_module.Runner.submit

    def counting(self, item, *args, **kwargs):
        submitted.append(item.id)
        return original(self, item, *args, **kwargs)

    monkeypatch.setattr(runner_module.Runner, "submit", counting)
    resumed = run(spec, base_dir=tmp_path, out_dir=out, progress=False, resume=True)
    assert submitted == [f"synthetic-s0-i{i:04d}" for i in (4, 5, 6, 7)]
    assert resumed.n_images == 8
    assert not partial.exists()
    info = json.loads((out / "run.json").read_text())
    assert info["n_images"] == 8
    assert info["blocks"] == {"processes": 1, "backend": "none", "block_images": 2,
                              "blocks": 4, "resumed_blocks": 2, "images_per_rank": {"0": 8}}

    submitted.clear()
    fresh = tmp_path / "fresh"
    run(spec, base_dir=tmp_path, out_dir=fresh, progress=False)
    assert len(submitted) == 8
    got, want = _files(out), _files(fresh)
    assert sorted(got) == sorted(want)
    assert any(name.startswith("pooled/") for name in want)
    for name in want:
        if name.endswith(".csv"):
            assert got[name] == want[name], f"{name} differs from a fresh run"
    assert _without_timings(got["run.json"]) == _without_timings(want["run.json"])
    assert json.loads(want["run.json"])["blocks"]["resumed_blocks"] == 0

    # the run is complete now: --resume has nothing to do (through the command line)
    from mapsim.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["run", str(spec_path), "--out", "out", "--resume", "--quiet"]) == 2


def test_resume_of_a_complete_run_through_the_command_line(tmp_path, synthetic_images,
                                                           monkeypatch, capsys):
    from mapsim.cli import main

    spec_path = _workdir(tmp_path, synthetic_images, ["pearson"])
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(spec_path), "--out", "out", "--quiet"]) == 0
    before = _files(tmp_path / "out")
    capsys.readouterr()
    assert main(["run", str(spec_path), "--out", "out", "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "mapsim: error: nothing to resume" in err
    assert _files(tmp_path / "out") == before
    assert not (tmp_path / ".out.partial").exists()


def _interrupted_run(tmp_path: Path, spec) -> None:
    """Run ``spec`` into ``out`` with image 5 broken: it fails in block 2 and keeps blocks 0
    and 1; the image is then mended."""
    from mapsim.runner.run import run

    broken = _image(tmp_path, 5)
    good = broken.read_bytes()
    broken.write_bytes(BROKEN_PNG)
    with pytest.raises(ImageError):
        run(spec, base_dir=tmp_path, out_dir=tmp_path / "out", progress=False)
    blocks = tmp_path / ".out.partial" / "blocks"
    assert sorted(p.name for p in blocks.iterdir()) == ["000000", "000001"]
    broken.write_bytes(good)


def _resumed_across_images(tmp_path: Path, spec) -> pd.DataFrame:
    """Run ``spec`` interrupted (:func:`_interrupted_run`), resume it, and run it afresh;
    check that both wrote the same ``layer_similarity.csv`` bytes and return its rows
    computed across all images."""
    from mapsim.runner.run import run

    _interrupted_run(tmp_path, spec)
    run(spec, base_dir=tmp_path, out_dir=tmp_path / "out", progress=False, resume=True)
    run(spec, base_dir=tmp_path, out_dir=tmp_path / "fresh", progress=False)
    got = (tmp_path / "out" / "layer_similarity.csv").read_bytes()
    assert got == (tmp_path / "fresh" / "layer_similarity.csv").read_bytes()
    table = pd.read_csv(tmp_path / "out" / "layer_similarity.csv")
    return table[table.image == "all-images"]


def test_cka_over_images_resumes_to_the_values_of_one_pass(tmp_path, synthetic_images):
    """cka with images as samples is taken in block by block: the resumed run forms the same
    batches across the blocks (batches of 4 against blocks of 2) as one uninterrupted run."""
    from mapsim.spec.run_spec import load_spec

    metrics = ["pearson", {"name": "cka", "samples": "images", "size": 2, "batch_size": 4}]
    spec = load_spec(_workdir(tmp_path, synthetic_images, metrics))
    across = _resumed_across_images(tmp_path, spec)
    assert len(across) == 2 * 2 + 2 * 2 and across.value.notna().all()


def test_a_metric_that_cannot_take_blocks_cannot_resume(tmp_path, synthetic_images,
                                                        monkeypatch):
    from mapsim.runner.run import run
    from mapsim.runner.setup import RunSetup
    from mapsim.spec.run_spec import load_spec

    original = RunSetup._metric

    def without_blocks(self, choice):  # an across-image metric of a plugin without blocks
        metric = original(self, choice)
        metric.blockwise = False
        return metric

    monkeypatch.setattr(RunSetup, "_metric", without_blocks)
    spec_path = _workdir(tmp_path, synthetic_images, ["pearson", {"name": "cka",
                                                                  "samples": "images"}])
    spec = load_spec(spec_path)
    _interrupted_run(tmp_path, spec)
    with pytest.raises(SpecError, match="resume") as info:
        run(spec, base_dir=tmp_path, out_dir=tmp_path / "out", progress=False, resume=True)
    assert "cka" in str(info.value) and "blockwise" in str(info.value)
    assert not (tmp_path / "out").exists()
    # without --resume it runs afresh, over all images, in one process
    result = run(spec, base_dir=tmp_path, out_dir=tmp_path / "out", progress=False)
    assert result.n_images == 8 and not (tmp_path / ".out.partial").exists()


# =========================================================================== torchrun's env
def test_world_from_env():
    world = World.from_env({})
    assert (world.rank, world.size, world.local_rank) == (0, 1, 0)
    assert not world.distributed and world.main
    world = World.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (world.rank, world.size, world.local_rank) == (1, 2, 1)
    assert world.distributed and not world.main
    world = World.from_env({"RANK": "3", "WORLD_SIZE": "4"})  # LOCAL_RANK defaults to RANK
    assert (world.rank, world.size, world.local_rank) == (3, 4, 3)
    assert World.from_env({"RANK": "1"}).size == 1  # no WORLD_SIZE: not under torchrun


@pytest.mark.parametrize("env", [
    {"WORLD_SIZE": "2"},
    {"RANK": "one", "WORLD_SIZE": "2"},
    {"RANK": "1", "WORLD_SIZE": "two"},
    {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": ""},
])
def test_world_from_env_refuses_bad_values(env):
    with pytest.raises(MapsimError, match="RANK"):
        World.from_env(env)


def test_world_device(monkeypatch):
    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA was queried")

    monkeypatch.setattr(torch.cuda, "device_count", no_cuda)
    monkeypatch.setattr(torch.cuda, "is_available", no_cuda)
    world = World.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    with pytest.raises(MapsimError, match="CUDA_VISIBLE_DEVICES"):
        world.device(torch.device("cuda", 0))
    cpu = torch.device("cpu")
    assert world.device(cpu) is cpu
    # one process without torchrun: cuda:0 stays cuda:0
    assert World().device(torch.device("cuda", 0)) == torch.device("cuda", 0)

    # plain "cuda" under torchrun: the GPU of the local rank, if the node has it
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert world.device(torch.device("cuda")) == torch.device("cuda", 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(MapsimError, match="local rank 1"):
        world.device(torch.device("cuda"))


# =========================================================================== pictures
def test_thumbnails_kept_by_blocks_come_back_in_image_order(tmp_path):
    """Each block hands over what it kept for pictures (take); merged in block order
    (absorb), the first plot_images images are kept, with their matrices, as one pass would."""
    from types import SimpleNamespace

    from mapsim.plots.capture import PlotCapture

    rng = np.random.default_rng(3)
    blocks = [[f"img{i}" for i in range(0, 2)], [f"img{i}" for i in range(2, 4)]]
    one_pass, merged = PlotCapture(3), PlotCapture(3)
    states = []
    for ids in blocks:
        block = PlotCapture(3)
        for image_id in ids:
            maps = {"a": {"blocks.0": torch.from_numpy(rng.standard_normal((2, 8, 8)))}}
            item = SimpleNamespace(id=image_id, image=rng.standard_normal((1, 8, 8)))
            sim = SimpleNamespace(metric="pearson", model_a="a", model_b="a",
                                  values=rng.standard_normal((2, 2)),
                                  blocks_a=[Block("a", "blocks.0", 0, 2, (8, 8))],
                                  blocks_b=[Block("a", "blocks.0", 0, 2, (8, 8))],
                                  higher_is_more_similar=True)
            for capture in (one_pass, block):
                capture.add_maps(item, maps)
                capture.add_matrix(image_id, sim)
        meta, arrays = block.take()
        assert block.thumbs == {} and block.mats == {}
        states.append(BlockState.from_bytes(
            BlockState(ImageBlock(len(states), 0, 2), ids,
                       observers={"plots": (meta, arrays)}).to_bytes()))
    for state in states:
        merged.absorb(*state.observers["plots"])
    assert list(merged.thumbs) == ["img0", "img1", "img2"] == list(one_pass.thumbs)
    for image in merged.thumbs:
        for key, array in one_pass.thumbs[image].items():
            np.testing.assert_array_equal(merged.thumbs[image][key], array)
        for key, array in one_pass.mats[image].items():
            np.testing.assert_array_equal(merged.mats[image][key], array)
        assert merged.meta[image] == one_pass.meta[image]
