"""The GPU check script and the GPU tests name the backward's first-version kernels in two places
(benchmarks/gpu_check.sh times them; tests/test_cuda_bwd.py runs them against the oracle): they must agree, and
every switch must be one the kernels read (docs/ffi.md lists them). CPU only: reads text."""

import os
import re

from test_cuda_bwd import FIRST_VERSION_ENV

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read(*parts):
    with open(os.path.join(ROOT, *parts)) as f:
        return f.read()


def test_first_version_switches_agree():
    m = re.search(r'^\s*FIRST_VERSION="([^"]*)"', _read("benchmarks", "gpu_check.sh"), re.M)
    assert m, "gpu_check.sh defines FIRST_VERSION"
    script = dict(kv.split("=", 1) for kv in m.group(1).split())
    assert script == FIRST_VERSION_ENV


def test_first_version_switches_are_read_by_the_kernels():
    sources = "".join(_read("cutlass", f) for f in os.listdir(os.path.join(ROOT, "cutlass")) if f.endswith(".cu"))
    docs = _read("docs", "ffi.md")
    for name, value in FIRST_VERSION_ENV.items():
        assert f'EnvEquals("{name}", "{value}")' in sources, (name, value)
        assert f"`{name}` | `{value}`" in docs, (name, value)
