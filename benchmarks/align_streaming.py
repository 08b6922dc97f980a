"""Aligned and token runs on the fast path against the plain path (issue 18): the same spec
(examples/unet.yaml: pretrained U-Net and CNN6, engine.align: smaller; spatial null off, since
with engine.align the null takes the plain path) run twice in fresh processes per mode,
alternating (stream, plain, stream, plain). Each process prints the wall time, how many images
streamed, peak host RSS and, on a GPU, peak GPU memory (torch.cuda.max_memory_allocated), and
the largest |difference| of max.csv's values between the two modes is printed at the end.

GPU: ``python benchmarks/align_streaming.py --images 20 --size 1024``.
CPU, small: ``python benchmarks/align_streaming.py --images 6 --size 256``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(mode: str, images: int, size: int, out: Path) -> dict:
    """Run the spec once in this process; ``mode`` stream or plain."""
    import torch
    import yaml

    from mapsim.engine.step import ImageStep
    from mapsim.runner.run import run
    from mapsim.spec.run_spec import validate_spec

    data = yaml.safe_load((ROOT / "examples" / "unet.yaml").read_text())
    data["statistics"] = {"spatial_null": False}
    data["images"].update(count=images, size=[size, size])
    data.pop("output", None)
    if mode == "plain":
        ImageStep.streamable = property(lambda self: False)
    launched = []
    original = ImageStep.launch

    def launch(self, item):
        result = original(self, item)
        launched.append(result is not None)
        return result

    ImageStep.launch = launch
    start = time.perf_counter()
    run(validate_spec(data), base_dir=ROOT / "examples", out_dir=out, progress=False)
    cuda = torch.cuda.is_available()
    return {"mode": mode, "wall_s": round(time.perf_counter() - start, 2),
            "streamed": sum(launched), "images": images, "size": size,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--size", type=int, default=256, help="image side (divisible by 8)")
    parser.add_argument("--one", choices=["stream", "plain"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.images, args.size, Path(args.out))))
        return
    import pandas as pd

    with tempfile.TemporaryDirectory() as tmp:
        for turn, mode in enumerate(("stream", "plain", "stream", "plain")):
            out = Path(tmp) / f"{mode}{turn // 2}"
            done = subprocess.run(
                [sys.executable, __file__, "--one", mode, "--images", str(args.images),
                 "--size", str(args.size), "--out", str(out)],
                capture_output=True, text=True, check=True)
            print(done.stdout.strip().splitlines()[-1], flush=True)
        a = pd.read_csv(Path(tmp) / "stream1" / "max.csv")
        b = pd.read_csv(Path(tmp) / "plain1" / "max.csv")
        print(f"max |stream - plain| in max.csv: {(a['value'] - b['value']).abs().max():.2e}")


if __name__ == "__main__":
    main()
