"""Peak memory of a streaming quantize does not grow with model size (RSS, in a subprocess)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from .conftest import write_safetensors

# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report the
# pytest parent's peak. VmHWM belongs to the fresh address space.
# Two compute workers whatever the machine: the pipeline's depth and the number of threads
# that can sit in a quantize transient at once then match on every machine (8 workers on a
# CI machine made the peak a max over many more coincidences: 30-45 MiB of spread).
CHILD = """
import sys, q, q.convert
q.convert.default_workers = lambda: 2
q.quantize(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
status = open("/proc/self/status").read()
print(int(status.split("VmHWM:")[1].split()[0]))  # KiB
"""


def peak_rss_kib(model, scheme, out) -> int:
    proc = subprocess.run([sys.executable, "-c", CHILD, str(model), scheme, str(out)],
                          capture_output=True, text=True, check=True)
    return int(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("scheme", ["fp8-block", "wint4"])
def test_peak_rss_independent_of_model_size(tmp_path, scheme):
    g = torch.Generator().manual_seed(0)
    sizes = {}
    # Both sizes must be longer than the read/compute/write pipeline is deep, or the larger
    # model fills queues the smaller one never reaches and the difference is the pipeline,
    # not growth with size. Tensors in flight: (workers + 1) in each of the two queues, one
    # per compute thread, one held by the reader and one by the writer: 10 with 2 workers.
    # (A CI machine with more cores, 8 workers and 28 deep, once saw 8 -> 40 grow 33 MiB.)
    workers = 2
    depth = 3 * workers + 4
    small = depth + 6
    for layers in (small, small + 32):
        tensors = {f"model.layers.{i}.mlp.up_proj.weight":
                   torch.randn(1024, 2048, generator=g).bfloat16() for i in range(layers)}
        model = write_safetensors(tmp_path / f"m{layers}", tensors)
        # the smaller of two runs: a peak can only be inflated by timing (a writer that
        # falls behind while the suite's other processes hold the cores: once 38 MiB, where
        # a quiet run grows 8-14 MiB), never hidden, so growth with model size shows in both
        sizes[layers] = min(peak_rss_kib(model, scheme, tmp_path / f"o{layers}-{run}")
                            for run in range(2))
    model_growth_mib = 32 * 1024 * 2048 * 2 / 2**20  # 128 MiB more weights
    rss_growth_mib = (sizes[small + 32] - sizes[small]) / 1024
    assert rss_growth_mib < 0.25 * model_growth_mib, (
        f"peak RSS grew {rss_growth_mib:.0f} MiB for {model_growth_mib:.0f} MiB more weights "
        f"({small} -> {small + 32} layers, {workers} workers: "
        f"{sizes[small] / 1024:.0f} -> {sizes[small + 32] / 1024:.0f} MiB)"
    )
