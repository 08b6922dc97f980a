"""The folder dataset: pairing, binarisation, the split and its error messages."""

from __future__ import annotations

import re

import numpy as np
import pytest
import tifffile
from skimage import io

from mapsim.errors import ImageError
from mapsim.io.images import normalise
from mapsim.registry import load_registry
from mapsim.plugins.folder import FolderDataset, binarise, split_ids
from mapsim.training.data import split_indices


def write_pairs(root, n=5, size=(12, 16), label_suffix="", ext=".png"):
    """n random 8-bit images and binary 0/255 labels in root/images and root/labels."""
    rs = np.random.RandomState(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    images, labels = [], []
    for i in range(n):
        image = rs.randint(0, 256, size).astype(np.uint8)
        label = (rs.rand(*size) < 0.3).astype(np.uint8) * 255
        name = f"img{i + 1}"
        if ext == ".tif":
            tifffile.imwrite(root / "images" / f"{name}.tif", image)
        else:
            io.imsave(root / "images" / f"{name}{ext}", image, check_contrast=False)
        io.imsave(root / "labels" / f"{name}{label_suffix}.png", label, check_contrast=False)
        images.append(image)
        labels.append(label > 0)
    return images, labels


def make(root, **params):
    return FolderDataset(FolderDataset.Params(images="images", labels="labels", **params),
                         base_dir=root)


def test_pairs_by_name_in_natural_order(tmp_path):
    images, labels = write_pairs(tmp_path, n=11)
    ds = load_registry().create("dataset", "folder", {"images": "images", "labels": "labels"},
                                base_dir=tmp_path)
    assert ds.ids() == [f"img{i}" for i in range(1, 12)]  # img2 before img10
    for i, item in enumerate(ds):
        assert item.image.shape == (1, 12, 16) and item.image.dtype == np.float32
        np.testing.assert_array_equal(item.image, normalise(images[i][None].astype(np.float32),
                                                            "zscore"))
        np.testing.assert_array_equal(item.label, labels[i])


@pytest.mark.parametrize("ext", [".tif", ".jpg"])
def test_tiff_and_jpeg_images(tmp_path, ext):
    images, _ = write_pairs(tmp_path, n=2, ext=ext)
    ds = make(tmp_path, normalise="none")
    got = ds[0].image[0]
    if ext == ".tif":
        np.testing.assert_array_equal(got, images[0])
    else:  # lossy: close, not equal
        assert np.corrcoef(got.ravel(), images[0].ravel())[0, 1] > 0.9


def test_label_suffix(tmp_path):
    _, labels = write_pairs(tmp_path, n=2, label_suffix="_mask")
    ds = make(tmp_path, label_suffix="_mask")
    assert ds.ids() == ["img1", "img2"]
    np.testing.assert_array_equal(ds[1].label, labels[1])


def test_split_is_fixed_disjoint_and_the_training_split(tmp_path):
    write_pairs(tmp_path, n=10)
    every = make(tmp_path).ids()
    train = make(tmp_path, split="train", seed=4).ids()
    val = make(tmp_path, split="validation", seed=4).ids()
    assert len(train) == 8 and len(val) == 2
    assert sorted(train + val, key=every.index) == every and not set(train) & set(val)
    assert make(tmp_path, split="train", seed=4).ids() == train  # deterministic
    assert make(tmp_path, split="train", seed=5).ids() != train
    t_idx, v_idx = split_indices(10, 0.2, 4)  # what `mapsim train` validates on
    assert [every[i] for i in v_idx] == val and [every[i] for i in t_idx] == train
    assert split_ids(10, "all") == list(range(10))
    assert len(make(tmp_path, split="validation", fraction=0.6).ids()) == 4


def test_threshold_binarises_gray_labels():
    arr = np.array([[0, 100, 128], [200, 255, 3]], np.uint8)
    np.testing.assert_array_equal(binarise(arr, 127, "x"), arr > 127)
    with pytest.raises(ImageError, match=r"has 6 distinct values \(0, 3, 100, 128, 200, 255\)"):
        binarise(arr, None, "x")
    rgb = np.zeros((2, 2, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)
    np.testing.assert_array_equal(binarise(rgb, None, "x"), [[True, False], [False, False]])


def test_image_without_label_is_named_with_the_labels_that_exist(tmp_path):
    write_pairs(tmp_path, n=3)
    io.imsave(tmp_path / "images" / "img_extra.png", np.zeros((12, 16), np.uint8),
              check_contrast=False)
    with pytest.raises(ImageError) as info:
        make(tmp_path)
    msg = str(info.value)
    assert msg.startswith(f"image {tmp_path / 'images' / 'img_extra.png'} has no label: no "
                          "file named img_extra.* among the labels matched by 'labels' "
                          f"(relative to {tmp_path}): img1.png, img2.png, img3.png.")
    assert "Add the missing labels, or move unlabelled images out of the images folder." in msg


def test_suffix_hint_when_labels_have_an_ending(tmp_path):
    write_pairs(tmp_path, n=2, label_suffix="_gt")
    with pytest.raises(ImageError, match=re.escape(
            "To pair img1.png with img1_gt, set label_suffix: '_gt'.")):
        make(tmp_path)


def test_label_with_three_values_says_which_and_how_to_fix(tmp_path):
    write_pairs(tmp_path, n=2)
    bad = np.zeros((12, 16), np.uint8)
    bad[0, :4], bad[1, :4] = 128, 255
    io.imsave(tmp_path / "labels" / "img2.png", bad, check_contrast=False)
    ds = make(tmp_path)
    ds[0]  # the good one reads
    with pytest.raises(ImageError) as info:
        ds[1]
    assert str(info.value) == (
        f"label {tmp_path / 'labels' / 'img2.png'} is not binary: it has 3 distinct values "
        "(0, 128, 255). Save it with exactly two values (0 = background, any other = vessel), "
        "losslessly (PNG or TIFF, not JPEG), or set the folder dataset's 'threshold' so that "
        "values above it are vessel (e.g. threshold: 127)."
    )
    np.testing.assert_array_equal(make(tmp_path, threshold=127)[1].label, bad > 127)


def test_size_mismatch_names_both_files(tmp_path):
    write_pairs(tmp_path, n=2)
    io.imsave(tmp_path / "labels" / "img1.png", np.zeros((12, 15), np.uint8),
              check_contrast=False)
    with pytest.raises(ImageError) as info:
        make(tmp_path)[0]
    assert str(info.value).startswith(
        f"label {tmp_path / 'labels' / 'img1.png'} is 12x15 (height x width) but its image "
        f"{tmp_path / 'images' / 'img1.png'} is 12x16. A label must have the size of its image"
    )


def test_missing_folder(tmp_path):
    write_pairs(tmp_path, n=1)
    with pytest.raises(ImageError, match="the label path 'lables' does not exist"):
        FolderDataset(FolderDataset.Params(images="images", labels="lables"), base_dir=tmp_path)


def test_a_split_of_one_image_is_refused(tmp_path):
    from mapsim.errors import SpecError

    write_pairs(tmp_path, n=1)
    assert len(make(tmp_path)) == 1
    with pytest.raises(SpecError, match="cannot be split"):
        make(tmp_path, split="train")
