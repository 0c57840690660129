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


def test_ncu_lines_attributes_samples_to_source_lines():
    """benchmarks/ncu_lines.py: instructions map to their function's lines by offset from the lowest address;
    an inlined header's instruction counts at the last line of the file of interest before it; only the named
    instantiation is read."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import ncu_lines

    dis = "\n".join([
        '\t.section\t.text._Z5OtherILi64EEv,"ax",@progbits',
        '//## File "/src/k.cu", line 1', "        /*0000*/ NOP ;",
        '\t.section\t.text._Z6KernelILi128EEv,"ax",@progbits',
        '//## File "/src/k.cu", line 10', "        /*0000*/ LDS R0, [R1] ;",
        '//## File "/usr/include/cuda_bf16.hpp", line 500', "        /*0010*/ F2F R2, R0 ;",
        '//## File "/src/k.cu", line 20', "        /*0020*/ BAR.SYNC 0x0 ;",
    ])
    hdr = ["Address", "Source", "Warp Stall Sampling (All Samples)", "L1 Wavefronts Shared", "stall_barrier"]
    rows = [["0x7f00", "LDS", "5", "4", "0"], ["0x7f10", "F2F", "3", "0", "0"], ["0x7f20", "BAR", "2", "0", "2"]]
    csv_text = "\n".join([",".join('"%s"' % c for c in r) for r in [["title"], hdr] + rows])
    lines = ncu_lines.line_map(dis.split("\n"), ["Kernel", "ILi128E"])
    assert lines == {0: ("k.cu", 10), 16: ("cuda_bf16.hpp", 500), 32: ("k.cu", 20)}
    agg = ncu_lines.attribute(ncu_lines.read_sass(csv_text.split("\n")), lines, "k.cu")
    assert agg[10]["Warp Stall Sampling (All Samples)"] == 8 and agg[10]["L1 Wavefronts Shared"] == 4
    assert agg[20]["Warp Stall Sampling (All Samples)"] == 2 and agg[20]["stall_barrier"] == 2
    assert ncu_lines.parse_ranges("1-15=a,16-30=b") == [(1, 15, "a"), (16, 30, "b")]


def test_overhead_reads_device_activity_from_a_perfetto_trace():
    """benchmarks/overhead.py: only the device processes' complete events count, and busy time is the union of
    their intervals (overlaps and nesting counted once)."""
    import sys
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    import overhead

    trace = {"traceEvents": [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
        {"ph": "X", "pid": 1, "ts": 0, "dur": 500, "name": "host op"},
        {"ph": "X", "pid": 2, "ts": 10, "dur": 100, "name": "PrepKernel"},
        {"ph": "X", "pid": 2, "ts": 50, "dur": 20, "name": "nested"},
        {"ph": "X", "pid": 2, "ts": 150, "dur": 50, "name": "RecurKernel"},
        {"ph": "i", "pid": 2, "ts": 160, "name": "instant"},
    ]}
    ev, names = overhead.device_events(trace)
    assert [e["name"] for e in ev] == ["PrepKernel", "nested", "RecurKernel"]
    assert names[2] == "/device:GPU:0"
    assert overhead.union_length([(e["ts"], e["ts"] + e["dur"]) for e in ev]) == 150
    assert overhead.union_length([(0, 10), (5, 20), (30, 40)]) == 30
