"""Data-parallel capture on top of accelerate: which process this is, and how processes meet.

``accelerate launch -m dpnle collect-activations ...`` (or ``dpnle collect-activations
--num-processes N``, which calls it) starts N copies of the command. Each copy loads the model
on its own device and captures its share of the shards; the main process prepares the capture
directory first and merges the shard statistics last (see :func:`dpnle.collect.collect_concept`).
Outside a launcher everything here is a no-op for a single process.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")

CPU_ENV = "DPNLE_CAPTURE_CPU"  # set by --num-processes with --device cpu: gloo processes even beside a GPU


def launched() -> bool:
    """True inside a process started by ``accelerate launch`` / ``torchrun`` with more than one process."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1
    except ValueError:
        return False


class MainProcessFailed(RuntimeError):
    """Raised on the other processes when the main one failed (it reports the error itself)."""


@dataclass(frozen=True)
class Workers:
    """This process's place among the capture processes."""

    rank: int = 0
    world: int = 1
    device: str | None = None  # the device this process should load the model on; None: the default

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            torch.distributed.barrier()

    def from_main(self, value: Any) -> Any:
        """The main process's ``value`` on every process (a picklable object)."""
        if not self.distributed:
            return value
        box = [value if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def main_first(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the main process, then on the others (for work that fills a shared cache).

        An exception on the main process is raised on every process, so none waits forever."""
        if not self.distributed:
            return fn()
        error: str | None = None
        result: Any = None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:
                error = f"{type(exc).__name__}: {exc}"
                self.from_main(error)
                raise
        error = self.from_main(error)
        if error is not None:
            raise MainProcessFailed(f"The main process failed: {error}")
        return result if self.is_main else fn()

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's share of ``items``: every ``world``-th, starting at ``rank``."""
        return list(items[self.rank :: self.world])


_SINGLE = Workers()


def workers() -> Workers:
    """The current process's :class:`Workers`, starting the process group when launched."""
    if not launched():
        return _SINGLE
    from accelerate import PartialState

    use_cpu = (
        any(os.environ.get(name, "").lower() in ("1", "true") for name in (CPU_ENV, "ACCELERATE_USE_CPU"))
        or not torch.cuda.is_available()
    )
    state = PartialState(cpu=use_cpu)
    device = "cpu" if use_cpu else str(state.device)
    return Workers(rank=state.process_index, world=state.num_processes, device=device)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch_command(num_processes: int, argv: Sequence[str], cpu: bool) -> tuple[list[str], dict[str, str]]:
    """The ``accelerate launch`` command (and its environment) that runs ``dpnle <argv>`` in
    ``num_processes`` processes."""
    # accelerate's --multi_gpu launcher is torchrun; without a GPU (or with ``cpu``) every
    # process joins a gloo group on the CPU (see :func:`workers`). accelerate's own --cpu
    # launcher would need MPI for more than one process.
    env = {**os.environ, CPU_ENV: "1"} if cpu else dict(os.environ)
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
    ]
    return [*command, "-m", "dpnle", *argv], env


_LAUNCHER_FAILED = "failed (exitcode"  # torchrun's line when a process exits non-zero


def run_launcher(command: Sequence[str], env: dict[str, str]) -> int:
    """Run ``command`` (from :func:`launch_command`), passing its output through but cutting the
    launcher's own traceback after a process fails: the process's error is already shown.
    Returns 2 when a process reported an ``error:`` line (bad input), else the launcher's code."""
    import subprocess

    reported = False
    with subprocess.Popen(list(command), env=env, stderr=subprocess.PIPE, text=True, bufsize=1) as proc:
        assert proc.stderr is not None
        quiet = False
        for line in proc.stderr:
            reported = reported or line.startswith("error: ")
            quiet = quiet or _LAUNCHER_FAILED in line
            if not quiet and "torch/distributed/elastic/" not in line:
                sys.stderr.write(line)
                sys.stderr.flush()
        code = proc.wait()
    if code != 0 and not reported:
        sys.stderr.write(f"error: a capture process failed (launcher exit code {code}); its message is above.\n")
    return 2 if code != 0 and reported else code


def strip_option(argv: Sequence[str], name: str) -> list[str]:
    """``argv`` without ``name VALUE`` / ``name=VALUE``."""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == name:
            skip = True
            continue
        if arg.startswith(name + "="):
            continue
        out.append(arg)
    return out
