"""Timing on a shared machine: a sample's seconds and what else ran meanwhile, the CPU
that ran it, and progress lines."""
import os
import resource
import time


class Sampler:
    """Times a callable, with the share of the machine's CPU that OTHER processes used
    meanwhile: (busy jiffies of /proc/stat, steal included, less this process's CPU
    time) / (wall time x cores), ~0 on a quiet machine."""

    def __init__(self):
        self.cores = os.cpu_count()
        self.tick = os.sysconf("SC_CLK_TCK")

    def _busy_seconds(self) -> float:
        """The machine's CPU seconds so far, all but idle and iowait; NaN without /proc."""
        try:
            with open("/proc/stat") as f:
                jiffies = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return float("nan")
        return (sum(jiffies) - jiffies[3] - jiffies[4]) / self.tick

    def __call__(self, run, repeats: int = 1) -> tuple:
        """-> (run()'s seconds, others' CPU load meanwhile, this process's CPU seconds,
        its minor page faults), each the mean over `repeats` consecutive calls."""
        faults0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        busy0, cpu0, wall0 = self._busy_seconds(), time.process_time(), time.perf_counter()
        seconds = sum(run() for _ in range(repeats)) / repeats
        busy1, cpu1, wall1 = self._busy_seconds(), time.process_time(), time.perf_counter()
        faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults0) / repeats
        others = max(0.0, (busy1 - busy0) - (cpu1 - cpu0)) / ((wall1 - wall0) * self.cores)
        return seconds, others, (cpu1 - cpu0) / repeats, faults


def cpu_name() -> str:
    """The CPU's model name and the vector / matrix extensions that set its matmul rate
    (VMs often report only 'Intel(R) Xeon(R) Processor', whatever the host)."""
    features = set(_cpu_info("flags").split()) & {"avx2", "avx512f", "avx512_bf16",
                                                  "amx_tile", "amx_bf16"}
    return " ".join([_cpu_info("model name"), *sorted(features)])


def _cpu_info(field: str) -> str:
    """The first `field` line of /proc/cpuinfo ('model name', 'flags'), or ''."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def progress_log():
    """-> log(message): prints '[<seconds since this call> s] message' and flushes."""
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:.0f} s] {message}", flush=True)
    return log
