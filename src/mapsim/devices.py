"""The compute device: which one a run uses, and copying inputs to it."""

from __future__ import annotations

import torch

from mapsim.errors import MapsimError


def resolve_device(requested: str) -> torch.device:
    """``auto`` -> CUDA when present, else CPU; an unavailable device is an error."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise MapsimError(
            f"device {requested!r} was requested but CUDA is not available here; "
            "use --device cpu or device: auto"
        )
    if requested == "mps" and not torch.backends.mps.is_available():
        raise MapsimError("device 'mps' was requested but is not available; use device: auto")
    return torch.device(requested)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` (on the host) copied to ``device``.

    To a GPU it goes on a stream of its own, which the current stream then waits for. A copy
    from ordinary (pageable) memory first waits for the work queued on its stream; on the
    current stream that is the device's work on the previous image, so the host could not
    prepare the next image meanwhile. On an idle copy stream the call returns as soon as the
    driver has staged the data in its own fixed buffers, and no pinned copy per image is
    needed (such copies stay cached for the rest of the process).
    """
    if device.type != "cuda":
        return tensor.to(device)
    compute = torch.cuda.current_stream(device)
    stream = _copy_stream(device)
    # the destination comes from the copy stream's own memory pool, so it never overlaps
    # memory the compute stream freed but may still be using (no wait for it needed here)
    with torch.cuda.stream(stream):
        copied = tensor.to(device, non_blocking=True)
    compute.wait_stream(stream)
    copied.record_stream(compute)  # used there: not reused before that work is done
    return copied


_copy_streams: dict[torch.device, torch.cuda.Stream] = {}


def _copy_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    key = torch.device("cuda", index)
    if key not in _copy_streams:
        _copy_streams[key] = torch.cuda.Stream(key)
    return _copy_streams[key]
