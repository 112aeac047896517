"""How busy the GPUs were while a phase ran, from the driver's own utilization counter.

`nvidia-smi` reports, per sample period, the share of time at least one kernel was running on a GPU.
Summed over the samples of a phase, that gives its busy and idle seconds: the idle time of a cycle is
what a faster sampler, a colocated trainer or a second trial on the same GPU could still use.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time

PERIOD_MS = 100


class GpuMonitor:
    """Samples the utilization of the GPUs this process sees between start and stop: `wall_s` always,
    `busy_s` and `idle_s` (averaged over the GPUs) where a GPU and nvidia-smi are."""

    def __init__(self):
        self.wall_s: float | None = None
        self.busy_s: float | None = None
        self.idle_s: float | None = None
        self._process = None
        self._samples: list[tuple[float, float]] = []  # (time, mean utilization 0..1)

    @staticmethod
    def available() -> bool:
        import torch

        return torch.cuda.is_available() and shutil.which("nvidia-smi") is not None

    def start(self) -> GpuMonitor:
        self._started = time.perf_counter()
        if not self.available():
            return self
        command = ["nvidia-smi", "--query-gpu=index,utilization.gpu", "--format=csv,noheader,nounits"]
        command += [f"-lms={PERIOD_MS}"]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    __enter__ = start

    def _read(self) -> None:
        row: dict[str, float] = {}
        for line in self._process.stdout:
            index, _, value = line.partition(",")
            try:
                utilization = float(value) / 100
            except ValueError:
                continue
            if index.strip() in row:  # a new sampling round
                self._samples.append((time.perf_counter(), sum(row.values()) / len(row)))
                row = {}
            row[index.strip()] = utilization
        if row:
            self._samples.append((time.perf_counter(), sum(row.values()) / len(row)))

    def stop(self) -> None:
        ended = time.perf_counter()
        self.wall_s = ended - self._started
        if self._process is None:
            return
        self._process.terminate()
        self._process.wait()
        self._reader.join(timeout=2)
        self.busy_s = busy_seconds(self._samples, self._started, ended)
        self.idle_s = self.wall_s - self.busy_s

    def __exit__(self, *exc) -> None:
        self.stop()


def busy_seconds(samples: list[tuple[float, float]], start: float, end: float) -> float:
    """Utilization integrated over [start, end]: each sample covers the time since the one before it."""
    busy, previous = 0.0, start
    for moment, utilization in samples:
        moment = min(moment, end)
        busy += utilization * max(0.0, moment - previous)
        previous = moment
    return busy
