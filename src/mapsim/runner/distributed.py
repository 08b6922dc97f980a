"""One run across several processes: torch.distributed, started by ``torchrun``.

``torchrun --nproc-per-node N -m mapsim run SPEC`` starts N copies of ``mapsim run``. Each reads
its rank from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and joins the
process group: NCCL when the run is on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo on
the CPU. The images are shared out in blocks (:mod:`mapsim.runner.blocks`). The processes talk
over three channels:

- the process group (NCCL or gloo): one all-reduce after setting up, by which every rank learns
  whether all of them set up without error and see the same spec and number of images;
- gloo links from each rank to rank 0, which carry the rows and state of every finished block
  (bytes on the host: NCCL only moves device memory) to rank 0, the only process that writes;
- torchrun's key-value store: rank 0 tells the others which blocks an earlier run finished
  (``--resume``); a failing rank leaves its error there and the others stop at their next
  image; rank 0 says when the results are published.

A single process (no torchrun) is a :class:`World` of size 1, for which all of this is a no-op.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mapsim.runner.blocks import BlockOutput, BlockState, pack, unpack
from mapsim.errors import MapsimError
from mapsim.runner.lifetime import die_with_parent
from mapsim.runner.writer import TablePart

FAILED = "mapsim/failed"
FINISHED = "mapsim/finished"
STOPPED = "mapsim/stopped"
POLL_S = 0.05
#: how long a failing run waits for every process to notice before it exits
STOP_WAIT_S = 30.0


class RunAborted(MapsimError):
    """Another process of the run failed, so this one stopped."""


def describe(error: BaseException) -> str:
    """An error as one line for the other processes."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if isinstance(error, MapsimError):
        return str(error)
    return f"{type(error).__name__}: {error}"


@dataclass
class World:
    """This process's place in the run: rank, number of processes, local rank."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    #: started by torchrun (then it joins a process group, even as the only process)
    launched: bool = False
    backend: str | None = None
    _device: torch.device | None = None
    _store: Any = None
    _links: dict[int, Any] = field(default_factory=dict)
    #: rank 0's receiving threads, while there are any
    inbox: Inbox | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> World:
        """The world torchrun describes in the environment (size 1 without torchrun)."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env:
            return cls()
        try:
            rank, size = int(env["RANK"]), int(env["WORLD_SIZE"])
            local = int(env.get("LOCAL_RANK", rank))
        except (KeyError, ValueError) as exc:
            raise MapsimError(
                "WORLD_SIZE is set but RANK or LOCAL_RANK is missing or not a number; start "
                "several processes with torchrun (see docs/scaling-and-resume.md)"
            ) from exc
        if size < 1 or not 0 <= rank < size or local < 0:
            raise MapsimError(
                f"torchrun's environment is inconsistent (RANK {rank}, WORLD_SIZE {size}, "
                f"LOCAL_RANK {local}): a rank must be 0 to WORLD_SIZE - 1; start the run with "
                "torchrun (see docs/scaling-and-resume.md)"
            )
        return cls(rank, size, local, launched=True)

    @property
    def distributed(self) -> bool:
        """True under torchrun, whatever the number of processes."""
        return self.launched

    @property
    def main(self) -> bool:
        """True for rank 0, the process that writes."""
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """The device of this process: on CUDA, the GPU of its local rank."""
        if not self.distributed or requested.type != "cuda":
            return requested
        if requested.index is not None:
            raise MapsimError(
                f"device {str(requested)!r} names one GPU, but under torchrun every process "
                "takes the GPU of its local rank; use --device cuda (or auto), and choose GPUs "
                "with CUDA_VISIBLE_DEVICES"
            )
        count = torch.cuda.device_count()
        if self.local_rank >= count:
            raise MapsimError(
                f"process {self.rank} has local rank {self.local_rank}, but this node has "
                f"{count} GPU(s): start at most {count} process(es) per node "
                f"(torchrun --nproc-per-node {count})"
            )
        return torch.device("cuda", self.local_rank)

    # ------------------------------------------------------------------ process group
    def start(self, device: torch.device) -> None:
        """Join the process group (NCCL on CUDA, else gloo) and open the links to rank 0."""
        if not self.distributed:
            return
        import torch.distributed as dist

        die_with_parent()  # a rank ends with its launcher (torchrun), however that ends
        if not dist.is_available():
            raise MapsimError("this torch build has no torch.distributed; install one that "
                              "has it to run under torchrun")
        self.backend = "nccl" if device.type == "cuda" else "gloo"
        self._device = device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            dist.init_process_group(backend=self.backend)
        except Exception as exc:  # noqa: BLE001 - the launcher's or backend's own errors
            raise MapsimError(f"process {self.rank} could not join the {self.backend} process "
                              f"group: {exc}") from exc
        self._store = dist.distributed_c10d._get_default_store()
        # every rank creates every group, in the same order (torch.distributed's rule)
        self._links = {peer: dist.new_group([0, peer], backend="gloo")
                       for peer in range(1, self.size)}

    def close(self) -> None:
        """Leave the process group (not while a thread still waits on it: after a failure
        the process then exits without, rather than abort inside the backend)."""
        if self._store is None:
            return
        if self.inbox is not None and not self.inbox.join(STOP_WAIT_S):
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self._store = None

    def agree(self, error: BaseException | None, values: dict[str, int]) -> None:
        """Meet every other rank once (one all-reduce on the process group's backend).

        Raises ``error`` where it happened, :class:`RunAborted` on the ranks where it did not,
        and a :class:`MapsimError` everywhere when the ranks' ``values`` differ.
        """
        if not self.distributed:
            if error is not None:
                raise error
            return
        import torch.distributed as dist

        if error is not None:
            self.fail(error)
        keys = sorted(values)
        mine = [0 if error is not None else 1] + [int(values.get(k, 0)) for k in keys]
        on = self._device if self.backend == "nccl" else torch.device("cpu")
        both = torch.tensor(mine + [-v for v in mine], dtype=torch.int64, device=on)
        dist.all_reduce(both, op=dist.ReduceOp.MIN)
        low, high = both[: len(mine)].tolist(), [-v for v in both[len(mine):].tolist()]
        if error is not None:
            raise error
        if low[0] == 0:
            raise RunAborted(self._failure())
        for key, lo, hi in zip(keys, low[1:], high[1:]):
            if lo != hi:
                raise MapsimError(
                    f"the {self.size} processes of this run disagree on {key} (from {lo} to "
                    f"{hi}): every process must see the same spec and the same images (on "
                    "several nodes: the same files at the same paths)"
                )

    # ------------------------------------------------------------------ the store
    def fail(self, error: BaseException) -> None:
        """Tell the other ranks that this one failed (the first failure is the one kept)."""
        if self._store is None:
            return
        try:
            self._store.compare_set(FAILED, "", f"{self.rank}\n{describe(error)}")
        except Exception:  # noqa: BLE001 - the store may be gone already; nothing more to do
            pass

    def _failure(self) -> str:
        rank, _, text = self._store.get(FAILED).decode().partition("\n")
        return f"process {rank} of {self.size} failed: {text}"

    def check(self) -> None:
        """Raise :class:`RunAborted` if another rank has failed."""
        if self._store is not None and self._store.check([FAILED]):
            if self._store.get(FAILED).decode().partition("\n")[0] != str(self.rank):
                raise RunAborted(self._failure())

    def share(self, key: str, text: str) -> None:
        """Rank 0: make ``text`` available to the others under ``key``."""
        if self._store is not None:
            self._store.set(f"mapsim/{key}", text)

    def shared(self, key: str) -> str:
        """What rank 0 shared under ``key`` (waits for it; stops if a rank fails)."""
        while not self._store.check([f"mapsim/{key}"]):
            self.check()
            time.sleep(POLL_S)
        return self._store.get(f"mapsim/{key}").decode()

    def stop_together(self) -> bool:
        """After a failure: wait (a while) until every rank has stopped, so that none is
        killed by the launcher while it cleans up. False when some rank did not answer."""
        if self._store is None:
            return True
        try:
            self._store.add(STOPPED, 1)
            deadline = time.monotonic() + STOP_WAIT_S
            while self._store.add(STOPPED, 0) < self.size:
                if time.monotonic() > deadline:
                    return False
                time.sleep(POLL_S)
        except Exception:  # noqa: BLE001 - a rank's exit can take the store with it
            return False
        return True

    # ------------------------------------------------------------------ links to rank 0
    def send(self, data: bytes) -> None:
        """Send bytes to rank 0 (from a rank > 0; waits until rank 0 has them)."""
        import torch.distributed as dist

        group = self._links[self.rank]
        dist.send(torch.tensor([len(data)], dtype=torch.int64), dst=0, group=group)
        dist.send(torch.frombuffer(bytearray(data), dtype=torch.uint8), dst=0, group=group)

    def receive(self, peer: int) -> bytes:
        """Rank 0: the next bytes ``peer`` sent."""
        import torch.distributed as dist

        group = self._links[peer]
        size = torch.zeros(1, dtype=torch.int64)
        dist.recv(size, src=peer, group=group)
        data = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.recv(data, src=peer, group=group)
        return data.numpy().tobytes()


# --------------------------------------------------------------------------- block traffic
def _message(kind: str, meta: dict[str, Any] | None = None, data: bytes = b"") -> bytes:
    return pack({"kind": kind, **(meta or {})},
                {"data": np.frombuffer(data, dtype=np.uint8)})


class RemoteBlocks(BlockOutput):
    """A rank's finished blocks, sent to rank 0 (see :class:`mapsim.runner.blocks.BlockOutput`)."""

    def __init__(self, blocks: list, world: World) -> None:
        super().__init__(blocks)
        self.world = world
        self._finished = False

    def _part(self, index: int, part: TablePart) -> None:
        self.world.send(_message("part", {"index": index, "table": part.table,
                                          "columns": list(part.columns)}, part.rows))

    def _commit(self, state: BlockState) -> None:
        state.rank = self.world.rank
        self.world.send(_message("commit", data=state.to_bytes()))

    def finish(self) -> None:
        """Tell rank 0 that this rank has sent everything."""
        self.world.send(_message("done"))
        self._finished = True

    def abort(self) -> None:
        """Tell rank 0 that nothing more comes from this rank (after a failure; not after
        :meth:`finish`, when rank 0 no longer listens)."""
        if self._finished:
            return
        try:
            self.world.send(_message("abort"))
        except Exception:  # noqa: BLE001 - rank 0 may be gone; it is stopping anyway
            pass


class Inbox:
    """Rank 0's threads that take the other ranks' blocks and hand them to ``output`` (a
    :class:`mapsim.runner.blocks.PartialRun`: ``part(index, part)`` and ``commit(state)``)."""

    def __init__(self, world: World, output: Any) -> None:
        self.world = world
        self.output = output
        self.error: BaseException | None = None
        self.threads = [threading.Thread(target=self._run, args=(peer,), daemon=True,
                                         name=f"mapsim-inbox-{peer}")
                        for peer in range(1, world.size)]
        for thread in self.threads:
            thread.start()
        world.inbox = self

    def _run(self, peer: int) -> None:
        try:
            while True:
                meta, arrays = unpack(self.world.receive(peer))
                data = arrays["data"].tobytes()
                if meta["kind"] == "abort":
                    self.error = RunAborted(f"process {peer} stopped")
                    return
                if meta["kind"] == "done":
                    return
                if meta["kind"] == "part":
                    self.output.part(meta["index"], TablePart(meta["table"],
                                                              tuple(meta["columns"]), data))
                else:
                    self.output.commit(BlockState.from_bytes(data))
        except BaseException as exc:  # noqa: BLE001 - raised in the main thread by wait()
            self.error = exc

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the threads to end; True if they all did."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self.threads)

    def wait(self, on_wait: Callable[[], None] | None = None) -> None:
        """Until every other rank has sent everything; stops if a rank fails."""
        for thread in self.threads:
            while thread.is_alive():
                self.world.check()
                if on_wait is not None:
                    on_wait()
                thread.join(POLL_S)
            if self.error is not None:
                self.world.check()  # a rank that failed explains better than its broken link
                raise MapsimError(f"receiving the results of another process failed: "
                                  f"{describe(self.error)}") from self.error
