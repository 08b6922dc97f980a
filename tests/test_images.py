"""Tests of mapsim.io.images: finding, reading and preprocessing images and labels."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from skimage import io

from mapsim.errors import ImageError, MapsimError
from mapsim.io.images import (
    SUFFIXES,
    expand_paths,
    natural_key,
    normalise,
    read_image,
    read_label,
    roi_mask,
    to_channels,
)


def ramp(h=6, w=5, dtype=np.uint8, scale=7):
    """A small deterministic (h, w) gradient image."""
    return (np.arange(h * w).reshape(h, w) * scale).astype(dtype)


def touch(path, data=b""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# --------------------------------------------------------------------------- expand_paths
def test_suffixes():
    assert SUFFIXES == (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".npy")


def test_expand_file_relative_to_base_dir(tmp_path):
    touch(tmp_path / "data" / "a.png")
    assert expand_paths("data/a.png", tmp_path) == [tmp_path / "data" / "a.png"]


def test_expand_folder_takes_supported_files_directly_inside(tmp_path):
    for name in ["b.tif", "a.png", "notes.txt", "sub/c.png", "d.NPY"]:
        touch(tmp_path / "imgs" / name)
    result = expand_paths("imgs", tmp_path)
    assert [p.name for p in result] == ["a.png", "b.tif", "d.NPY"]
    assert all(p.is_absolute() for p in result)


def test_expand_natural_sort_and_dedup(tmp_path):
    for n in [10, 2, 1, 21, 3]:
        touch(tmp_path / f"img{n}.png")
    result = expand_paths(["img*.png", "img2.png", str(tmp_path / "img10.png")], tmp_path)
    names = [p.name for p in result]
    assert names == ["img1.png", "img2.png", "img3.png", "img10.png", "img21.png"]


def test_natural_key_orders_numbers_by_value():
    names = ["img10", "img2", "img1", "Img3", "img02b"]
    assert sorted(names, key=natural_key) == ["img1", "img2", "img02b", "Img3", "img10"]


def test_expand_recursive_glob_and_question_mark(tmp_path):
    for name in ["a/x1.png", "a/b/x2.png", "x3.png", "a/b/y.png", "a/b/x4.txt"]:
        touch(tmp_path / name)
    found = [p.relative_to(tmp_path).as_posix() for p in expand_paths("**/x*.png", tmp_path)]
    assert found == ["a/b/x2.png", "a/x1.png", "x3.png"]  # sorted by full path
    assert [p.name for p in expand_paths("a/x?.png", tmp_path)] == ["x1.png"]
    assert [p.name for p in expand_paths("a/b/[xy]*", tmp_path)] == ["x2.png", "y.png"]


def test_expand_absolute_glob(tmp_path):
    touch(tmp_path / "q.png")
    assert expand_paths(str(tmp_path / "*.png"), tmp_path / "elsewhere") == [tmp_path / "q.png"]


def test_expand_missing_file_names_resolved_path(tmp_path):
    with pytest.raises(ImageError) as exc:
        expand_paths("nope/missing.png", tmp_path)
    msg = str(exc.value)
    assert "does not exist" in msg
    assert str(tmp_path / "nope" / "missing.png") in msg


def test_expand_empty_glob_shows_resolved_pattern(tmp_path):
    with pytest.raises(ImageError) as exc:
        expand_paths("*.png", tmp_path, what="label")
    msg = str(exc.value)
    assert "matches no file" in msg
    assert str(tmp_path / "*.png") in msg
    assert "label" in msg


def test_expand_glob_matching_only_unsupported_files(tmp_path):
    touch(tmp_path / "a.bmp")
    with pytest.raises(ImageError, match=r"\.png"):
        expand_paths("*", tmp_path)


def test_expand_empty_folder(tmp_path):
    touch(tmp_path / "empty" / "readme.txt")
    with pytest.raises(ImageError, match="no file with a supported suffix"):
        expand_paths("empty", tmp_path)


def test_expand_unsupported_suffix_lists_supported(tmp_path):
    touch(tmp_path / "a.bmp")
    with pytest.raises(ImageError) as exc:
        expand_paths("a.bmp", tmp_path)
    assert "'.bmp'" in str(exc.value)
    assert all(s in str(exc.value) for s in SUFFIXES)


def test_image_error_is_a_mapsim_error():
    assert issubclass(ImageError, MapsimError)


# --------------------------------------------------------------------------- read_image
def test_read_png_8bit(tmp_path):
    arr = ramp()
    io.imsave(tmp_path / "a.png", arr, check_contrast=False)
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, arr)


def test_read_png_16bit(tmp_path):
    arr = ramp(dtype=np.uint16, scale=2000)
    assert arr.max() > 255
    io.imsave(tmp_path / "a.png", arr, check_contrast=False)
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint16
    np.testing.assert_array_equal(out, arr)


def test_read_png_rgba_drops_alpha(tmp_path):
    rgba = np.zeros((4, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 1], rgba[..., 2], rgba[..., 3] = 10, 20, 30, 255
    io.imsave(tmp_path / "a.png", rgba, check_contrast=False)
    out = read_image(tmp_path / "a.png")
    assert out.shape == (4, 3, 3)
    np.testing.assert_array_equal(out[0, 0], [10, 20, 30])


@pytest.mark.parametrize("suffix", [".tif", ".tiff"])
def test_read_tiff(tmp_path, suffix):
    arr = ramp(dtype=np.float32, scale=0.5)
    tifffile.imwrite(tmp_path / f"a{suffix}", arr)
    out = read_image(tmp_path / f"a{suffix}")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, arr)


def test_read_tiff_single_channel_last_becomes_2d(tmp_path):
    arr = ramp(dtype=np.uint16)[:, :, None]
    tifffile.imwrite(tmp_path / "a.tif", arr)
    assert read_image(tmp_path / "a.tif").shape == (6, 5)


def test_read_jpeg_lossy(tmp_path):
    arr = np.tile(np.linspace(50, 200, 16).astype(np.uint8), (16, 1))  # smooth: small loss
    io.imsave(tmp_path / "a.jpg", arr, check_contrast=False)
    out = read_image(tmp_path / "a.jpg")
    assert out.shape == (16, 16) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - arr).max() < 10


def test_read_npy(tmp_path):
    arr = np.random.default_rng(0).normal(size=(5, 7, 3))
    np.save(tmp_path / "a.npy", arr)
    np.testing.assert_array_equal(read_image(tmp_path / "a.npy"), arr)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # imageio tries its legacy plugins
def test_read_garbage_png_names_file(tmp_path):
    path = touch(tmp_path / "broken.png", b"this is not a png at all")
    with pytest.raises(ImageError) as exc:
        read_image(path)
    assert "cannot read" in str(exc.value)
    assert "broken.png" in str(exc.value)


def test_read_missing_file(tmp_path):
    with pytest.raises(ImageError, match="gone.tif"):
        read_image(tmp_path / "gone.tif")


def test_read_pickled_npy_refused(tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ImageError, match="obj.npy"):
        read_image(tmp_path / "obj.npy")


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5), (6, 5, 2), (3, 6, 5)])
def test_read_bad_shapes(tmp_path, shape):
    np.save(tmp_path / "a.npy", np.zeros(shape, np.float32))
    with pytest.raises(ImageError, match=r"a\.npy.*shape"):
        read_image(tmp_path / "a.npy")


def test_read_non_finite_refused(tmp_path):
    arr = np.zeros((3, 3), np.float32)
    arr[1, 1] = np.nan
    np.save(tmp_path / "a.npy", arr)
    with pytest.raises(ImageError, match="NaN"):
        read_image(tmp_path / "a.npy")


# --------------------------------------------------------------------------- to_channels
RGB = np.array(
    [[[255, 0, 0], [0, 255, 0]], [[0, 0, 255], [10, 20, 30]]],
    dtype=np.uint8,
)


def test_luminance_of_rgb_by_hand():
    out = to_channels(RGB, "luminance")
    assert out.dtype == np.float32
    assert out.shape == (1, 2, 2)
    expected = [[0.299 * 255, 0.587 * 255], [0.114 * 255, 0.299 * 10 + 0.587 * 20 + 0.114 * 30]]
    np.testing.assert_allclose(out[0], expected, rtol=1e-6)
    assert out[0, 1, 1] == pytest.approx(18.15, abs=1e-4)  # 2.99 + 11.74 + 3.42


@pytest.mark.parametrize("color, index", [("red", 0), ("green", 1), ("blue", 2)])
def test_single_channel_choice(color, index):
    out = to_channels(RGB, color)
    assert out.shape == (1, 2, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], RGB[..., index])


def test_rgb_choice_is_channels_first():
    out = to_channels(RGB, "rgb")
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.moveaxis(RGB, 2, 0))


@pytest.mark.parametrize("color", ["luminance", "red", "green", "blue"])
def test_gray_image_kept_as_is(color):
    gray = ramp(dtype=np.uint16, scale=1000)
    out = to_channels(gray, color)
    assert out.shape == (1, 6, 5) and out.dtype == np.float32
    np.testing.assert_array_equal(out[0], gray)  # no rescaling of integers


def test_gray_image_repeated_for_rgb():
    gray = ramp()
    out = to_channels(gray, "rgb")
    assert out.shape == (3, 6, 5)
    for c in range(3):
        np.testing.assert_array_equal(out[c], gray)


def test_unknown_color():
    with pytest.raises(ImageError, match="luminance"):
        to_channels(RGB, "purple")


# --------------------------------------------------------------------------- normalise
def test_zscore_mean_zero_std_one():
    x = to_channels(np.random.default_rng(1).integers(0, 65535, (9, 11, 3)), "rgb")
    out = normalise(x, "zscore")
    assert out.dtype == np.float32 and out.shape == x.shape
    out64 = out.astype(np.float64)
    assert abs(out64.mean()) < 1e-6
    assert out64.std() == pytest.approx(1.0, abs=1e-6)


def test_zscore_uses_all_channels_together():
    x = np.stack([np.zeros((2, 2)), np.full((2, 2), 2.0)]).astype(np.float32)
    out = normalise(x, "zscore")
    np.testing.assert_allclose(out[0], -1.0)
    np.testing.assert_allclose(out[1], 1.0)


def test_zscore_large_offset_is_accurate():
    x = (np.float32(1e6) + np.arange(4, dtype=np.float32)).reshape(1, 2, 2)
    out = normalise(x, "zscore")
    expected = (np.arange(4) - 1.5) / np.arange(4).std()
    np.testing.assert_allclose(out.ravel(), expected, atol=1e-6)


@pytest.mark.parametrize("method", ["zscore", "minmax"])
@pytest.mark.parametrize("value", [0.0, 0.1, 7.0])
def test_constant_image_gives_zeros(method, value):
    out = normalise(np.full((1, 33, 31), value, np.float32), method)
    assert not np.isnan(out).any()
    np.testing.assert_array_equal(out, 0.0)


def test_minmax():
    out = normalise(np.array([[[2.0, 4.0], [6.0, 10.0]]], np.float32), "minmax")
    np.testing.assert_allclose(out, [[[0.0, 0.25], [0.5, 1.0]]])
    assert out.dtype == np.float32


def test_none_keeps_values():
    x = ramp(dtype=np.uint16)[None]
    out = normalise(x, "none")
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, x)


def test_unknown_normalisation():
    with pytest.raises(ImageError, match="zscore"):
        normalise(np.zeros((1, 2, 2)), "l2")


# --------------------------------------------------------------------------- labels and ROI
def test_read_label_gray(tmp_path):
    lab = np.zeros((5, 4), np.uint8)
    lab[1:3, 2] = 255
    io.imsave(tmp_path / "l.png", lab, check_contrast=False)
    out = read_label(tmp_path / "l.png")
    assert out.dtype == bool and out.shape == (5, 4)
    np.testing.assert_array_equal(out, lab > 0)


def test_read_label_rgb_any_channel(tmp_path):
    lab = np.zeros((3, 3, 3), np.uint8)
    lab[0, 0] = [255, 128, 0]  # one non-black colour: still two distinct colours
    lab[2, 1] = [255, 128, 0]
    io.imsave(tmp_path / "l.png", lab, check_contrast=False)
    out = read_label(tmp_path / "l.png")
    assert out.shape == (3, 3)
    assert out.sum() == 2 and out[0, 0] and out[2, 1]


def test_read_label_all_background_is_binary(tmp_path):
    np.save(tmp_path / "l.npy", np.zeros((3, 3), np.uint8))
    assert not read_label(tmp_path / "l.npy").any()


def test_three_valued_label_refused(tmp_path):
    lab = np.array([[0, 1], [2, 0]], np.uint8)
    io.imsave(tmp_path / "l3.png", lab, check_contrast=False)
    with pytest.raises(ImageError) as exc:
        read_label(tmp_path / "l3.png")
    msg = str(exc.value)
    assert "l3.png" in msg and "3 distinct values" in msg and "binary" in msg


def test_roi_mask_no_dilation_is_the_label():
    lab = np.zeros((4, 4), bool)
    lab[1, 2] = True
    np.testing.assert_array_equal(roi_mask(lab), lab)


def test_roi_mask_dilate_1_gives_plus():
    lab = np.zeros((7, 7), bool)
    lab[3, 3] = True
    expected = np.zeros((7, 7), bool)
    expected[3, 2:5] = True
    expected[2:5, 3] = True
    out = roi_mask(lab, 1)
    assert out.dtype == bool and out.sum() == 5
    np.testing.assert_array_equal(out, expected)


def test_roi_mask_dilate_2_gives_13_pixel_disk():
    lab = np.zeros((7, 7), bool)
    lab[3, 3] = True
    out = roi_mask(lab, 2)
    expected = np.array(
        [
            [0, 0, 0, 0, 0, 0, 0],
            [0, 0, 0, 1, 0, 0, 0],
            [0, 0, 1, 1, 1, 0, 0],
            [0, 1, 1, 1, 1, 1, 0],
            [0, 0, 1, 1, 1, 0, 0],
            [0, 0, 0, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0, 0],
        ],
        bool,
    )
    assert out.sum() == 13
    np.testing.assert_array_equal(out, expected)


def test_roi_mask_does_not_modify_label():
    lab = np.zeros((5, 5), bool)
    lab[2, 2] = True
    roi_mask(lab, 2)
    assert lab.sum() == 1


def test_roi_mask_empty():
    with pytest.raises(ImageError, match="no pixels.*l.png|l.png.*no pixels"):
        roi_mask(np.zeros((4, 4), bool), 3, source="l.png")


def test_roi_mask_negative_dilation():
    lab = np.ones((2, 2), bool)
    with pytest.raises(ImageError, match=">= 0"):
        roi_mask(lab, -1)
