"""Tests of the ``files`` dataset plugin."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import tifffile
from skimage import io

from mapsim import Dataset, ImageItem
from mapsim.errors import ImageError
from mapsim.plugins.files import FilesDataset, make_ids


def write_png(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    io.imsave(path, arr, check_contrast=False)
    return path


def gray(seed, h=6, w=5):
    return np.random.default_rng(seed).integers(0, 256, (h, w)).astype(np.uint8)


def label(h=6, w=5):
    lab = np.zeros((h, w), np.uint8)
    lab[2:4, 1:3] = 255
    return lab


def dataset(base_dir, **params):
    return FilesDataset(FilesDataset.Params(**params), base_dir)


# --------------------------------------------------------------------------- registration
def test_registered_as_files_dataset():
    from mapsim.registry import load_registry

    entry = load_registry().get("dataset", "files")
    assert entry.cls is FilesDataset
    assert issubclass(entry.cls, Dataset)
    assert entry.provider.distribution == "mapsim"


def test_params_defaults_and_validation():
    p = FilesDataset.Params(paths="x")
    assert (p.labels, p.label_suffix, p.color, p.normalise, p.same_size) == (
        None,
        "",
        "luminance",
        "zscore",
        False,
    )
    with pytest.raises(pydantic.ValidationError):
        FilesDataset.Params(paths="x", color="purple")
    with pytest.raises(pydantic.ValidationError):
        FilesDataset.Params(paths="x", unknown=1)
    with pytest.raises(pydantic.ValidationError):
        FilesDataset.Params()


# --------------------------------------------------------------------------- basic iteration
def test_iterates_normalised_items_in_natural_order(tmp_path):
    for n in [10, 2, 1]:
        write_png(tmp_path / "imgs" / f"img{n}.png", gray(n))
    ds = dataset(tmp_path, paths="imgs")
    assert len(ds) == 3
    items = list(ds)
    assert [it.id for it in items] == ["img1", "img2", "img10"]
    for n, item in zip([1, 2, 10], items):
        assert isinstance(item, ImageItem)
        assert item.image.dtype == np.float32 and item.image.shape == (1, 6, 5)
        assert item.label is None
        assert item.source == str(tmp_path / "imgs" / f"img{n}.png")
        x = item.image.astype(np.float64)
        assert abs(x.mean()) < 1e-6 and x.std() == pytest.approx(1.0, abs=1e-6)
        expected = gray(n).astype(np.float64)
        np.testing.assert_allclose(x, ((expected - expected.mean()) / expected.std())[None],
                                   atol=1e-5)


def test_iteration_is_deterministic(tmp_path):
    for n in range(5):
        write_png(tmp_path / f"i{n}.png", gray(n))
    ds = dataset(tmp_path, paths="*.png")
    first, second = list(ds), list(ds)
    assert [i.id for i in first] == [i.id for i in second]
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.image, b.image)
    again = list(dataset(tmp_path, paths=["i4.png", "i*.png"]))
    assert [i.id for i in again] == [i.id for i in first]


def test_iteration_is_lazy(tmp_path):
    write_png(tmp_path / "a.png", gray(0))
    (tmp_path / "b.png").write_bytes(b"not a png")
    ds = dataset(tmp_path, paths=".")  # construction reads nothing
    it = iter(ds)
    assert next(it).id == "a"
    with pytest.raises(ImageError, match="b.png"):
        next(it)


def test_mixed_formats_and_options(tmp_path):
    rgb = np.random.default_rng(3).integers(0, 256, (4, 3, 3)).astype(np.uint8)
    write_png(tmp_path / "c.png", rgb)
    tifffile.imwrite(tmp_path / "a.tif", gray(1, 4, 3).astype(np.uint16) * 100)
    np.save(tmp_path / "b.npy", np.linspace(0, 1, 12).reshape(4, 3))
    ds = dataset(tmp_path, paths=str(tmp_path), color="rgb", normalise="none")
    items = list(ds)
    assert [i.id for i in items] == ["a", "b", "c"]
    assert all(i.image.shape == (3, 4, 3) and i.image.dtype == np.float32 for i in items)
    np.testing.assert_array_equal(items[2].image, np.moveaxis(rgb, 2, 0))
    np.testing.assert_array_equal(items[0].image[1], gray(1, 4, 3).astype(np.uint16) * 100)

    green = list(dataset(tmp_path, paths="c.png", color="green", normalise="minmax"))[0].image
    g = rgb[..., 1].astype(np.float64)
    np.testing.assert_allclose(green[0], (g - g.min()) / (g.max() - g.min()), atol=1e-6)


def test_errors_come_at_construction(tmp_path):
    with pytest.raises(ImageError, match="matches no file"):
        dataset(tmp_path, paths="*.png")
    with pytest.raises(ImageError, match="does not exist"):
        dataset(tmp_path, paths="missing.png")


def test_same_stem_ids_use_relative_paths(tmp_path):
    write_png(tmp_path / "train" / "img1.png", gray(0))
    write_png(tmp_path / "test" / "img1.png", gray(1))
    write_png(tmp_path / "test" / "img2.png", gray(2))
    ds = dataset(tmp_path, paths="*/*.png")
    assert [e.id for e in ds.entries] == ["test/img1", "test/img2", "train/img1"]
    assert len({i.id for i in ds}) == 3


def test_make_ids_same_stem_same_folder(tmp_path):
    paths = [tmp_path / "a.png", tmp_path / "a.tif", tmp_path / "b.png"]
    assert make_ids(paths) == ["a.png", "a.tif", "b.png"]
    assert make_ids([tmp_path / "x" / "a.png"]) == ["a"]


# --------------------------------------------------------------------------- size checks
def test_same_size_violation_names_both_files(tmp_path):
    write_png(tmp_path / "a.png", gray(0, 6, 5))
    write_png(tmp_path / "b.png", gray(1, 7, 5))
    assert len(list(dataset(tmp_path, paths="*.png"))) == 2  # allowed by default
    with pytest.raises(ImageError) as exc:
        list(dataset(tmp_path, paths="*.png", same_size=True))
    msg = str(exc.value)
    assert "a.png" in msg and "b.png" in msg and "6x5" in msg and "7x5" in msg


# --------------------------------------------------------------------------- labels
def test_labels_paired_with_suffix(tmp_path):
    for n in [1, 2]:
        write_png(tmp_path / "images" / f"img{n}.png", gray(n))
        write_png(tmp_path / "labels" / f"img{n}_label.png", label())
    ds = dataset(tmp_path, paths="images", labels="labels", label_suffix="_label")
    assert [e.label.name for e in ds.entries] == ["img1_label.png", "img2_label.png"]
    items = list(ds)
    assert [i.id for i in items] == ["img1", "img2"]
    for item in items:
        assert item.label.dtype == bool and item.label.shape == (6, 5)
        np.testing.assert_array_equal(item.label, label() > 0)


def test_labels_with_plain_stem_also_match_when_suffix_set(tmp_path):
    write_png(tmp_path / "images" / "a.png", gray(0))
    write_png(tmp_path / "labels" / "a.png", label())
    ds = dataset(tmp_path, paths="images", labels="labels", label_suffix="_label")
    assert ds.entries[0].label == tmp_path / "labels" / "a.png"


def test_labels_in_same_folder_are_not_images(tmp_path):
    write_png(tmp_path / "a.png", gray(0))
    write_png(tmp_path / "a_label.png", label())
    ds = dataset(tmp_path, paths="*.png", labels="*_label.png", label_suffix="_label")
    assert [(e.id, e.label.name) for e in ds.entries] == [("a", "a_label.png")]


def test_labels_matched_by_sub_folder_when_stems_repeat(tmp_path):
    for split in ["test", "train"]:
        write_png(tmp_path / "images" / split / "img1.png", gray(0))
        write_png(tmp_path / "labels" / split / "img1.png", label())
    ds = dataset(tmp_path, paths="images/*/*.png", labels="labels/**/*.png")
    assert [(e.id, e.label.parent.name) for e in ds.entries] == [
        ("test/img1", "test"),
        ("train/img1", "train"),
    ]


def test_missing_label_names_image_and_search_place(tmp_path):
    write_png(tmp_path / "images" / "img1.png", gray(1))
    write_png(tmp_path / "images" / "img2.png", gray(2))
    write_png(tmp_path / "labels" / "img1_label.png", label())
    with pytest.raises(ImageError) as exc:
        dataset(tmp_path, paths="images", labels="labels", label_suffix="_label")
    msg = str(exc.value)
    assert "img2.png" in msg and "no label" in msg and "'labels'" in msg


def test_missing_label_without_suffix_hints_label_suffix(tmp_path):
    write_png(tmp_path / "images" / "img1.png", gray(1))
    write_png(tmp_path / "labels" / "img1_label.png", label())
    with pytest.raises(ImageError, match="label_suffix"):
        dataset(tmp_path, paths="images", labels="labels")


def test_three_valued_label_is_an_error(tmp_path):
    write_png(tmp_path / "images" / "a.png", gray(0))
    lab = label()
    lab[0, 0] = 128
    write_png(tmp_path / "labels" / "a.png", lab)
    with pytest.raises(ImageError, match="3 distinct values"):
        list(dataset(tmp_path, paths="images", labels="labels"))


def test_label_size_mismatch_names_both_files_and_shapes(tmp_path):
    write_png(tmp_path / "images" / "a.png", gray(0, 6, 5))
    write_png(tmp_path / "labels" / "a.png", label(6, 4))
    with pytest.raises(ImageError) as exc:
        list(dataset(tmp_path, paths="images", labels="labels"))
    msg = str(exc.value)
    assert str(tmp_path / "images" / "a.png") in msg
    assert str(tmp_path / "labels" / "a.png") in msg
    assert "6x4" in msg and "6x5" in msg
