"""What the resume and torchrun tests share: a spec over 8 image files, and a broken PNG."""

#: two small networks over ``imgs/*.png`` in blocks of 2, pooled tables; add ``metrics``
FILES_SPEC = {
    "name": "ff",
    "models": {"a": {"architecture": {"name": "fcn", "depth": 2, "width": 4}, "seed": 1},
               "b": {"architecture": {"name": "fcn", "depth": 2, "width": 4}, "seed": 2}},
    "layers": {"a": "blocks.*", "b": "blocks.*"},
    "images": "imgs/*.png",
    "comparisons": [["a", "a"], ["a", "b"]],
    "aggregators": ["max", "pivot"],
    "engine": {"pooled": True, "block_images": 2},
    "device": "cpu",
}

#: a PNG signature and then nothing readable: a run fails on this image
BROKEN_PNG = b"\x89PNG\r\n\x1a\n broken"
