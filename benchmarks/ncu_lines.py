"""Where one kernel spends its time, by source line: ncu's per-instruction SASS metrics mapped to source lines.

    ncu --import-source yes --section SourceCounters --section WarpStateStats -k regex:KERNEL -o rep python3 ...
    ncu -i rep.ncu-rep --page source --csv --print-source sass > sass.csv
    cuobjdump -xelf all <extension .so>; nvdisasm -g -c <the cubin holding KERNEL> > dis.txt
    python3 benchmarks/ncu_lines.py sass.csv dis.txt --function PrepKernel,ILi128E13__nv_bfloat16Lb1E \
        [--ranges kda_fwd_prep.cu:400-574=rows,595-699=tasks] [--top 40]

The csv of `--print-source cuda` carries no metrics; the SASS one does, one row per instruction of the profiled
function (its addresses are absolute: the lowest is the function's start). `nvdisasm -g` names each
instruction's innermost source line; an instruction of an inlined header (cuda_bf16.hpp, mma helpers) is
counted at the last line of the file of interest before it (--file), so phases given as line ranges of that
file take their inlined helpers with them. benchmarks/gpu_check.sh's `lines` stage runs all of this.
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import pathlib
import re

_METRICS = ("Warp Stall Sampling (All Samples)", "Instructions Executed", "L1 Wavefronts Shared",
            "L1 Wavefronts Shared Excessive")


def _open(path):
    return gzip.open(path, "rt", errors="replace") if path.endswith(".gz") else open(path, errors="replace")


def line_map(dis_lines, function: list[str]) -> dict:
    """{offset in the function: (file name, line)} of the first disassembled function whose section name holds
    every string of `function`."""
    out, cur, inside = {}, None, False
    for ln in dis_lines:
        if ".text." in ln and (".section" in ln or ln.lstrip().startswith(".text.")):
            if inside and out:
                break
            inside = all(w in ln for w in function)
            continue
        if not inside:
            continue
        m = re.search(r'//## File "([^"]+)", line (\d+)', ln)
        if m:
            cur = (m.group(1).rsplit("/", 1)[-1], int(m.group(2)))
            continue
        m = re.search(r"/\*([0-9a-f]{4,})\*/", ln)
        if m and cur:
            out[int(m.group(1), 16)] = cur
    return out


def read_sass(csv_lines) -> list[tuple[int, dict]]:
    """[(absolute address, {column: value})] of the SASS csv's instruction rows."""
    rows = list(csv.reader(csv_lines))
    hi = next(i for i, r in enumerate(rows) if "Address" in r)
    hdr = rows[hi]
    out = []
    for r in rows[hi + 1:]:
        if len(r) != len(hdr):
            continue
        try:
            addr = int(r[hdr.index("Address")], 16)
        except ValueError:
            continue
        out.append((addr, dict(zip(hdr, r))))
    return out


def _num(x: str) -> float:
    try:
        return float(x.replace(",", ""))
    except (ValueError, AttributeError):
        return 0.0


def attribute(sass, lines: dict, file: str) -> dict:
    """{line of `file` (0: before its first): Counter of the metrics and stall reasons} (inlined code counted
    at the last line of `file` before it, in address order)."""
    base = min(a for a, _ in sass)
    agg = collections.defaultdict(collections.Counter)
    last = 0
    for addr, row in sorted(sass, key=lambda x: x[0]):
        src = lines.get(addr - base)
        if src and src[0] == file:
            last = src[1]
        for k, v in row.items():
            if k in _METRICS or (k.startswith("stall_") and "Not Issued" not in k):
                agg[last][k] += _num(v)
    return agg


def parse_ranges(spec: str) -> list[tuple[int, int, str]]:
    """'400-574=rows,595-699=tasks' -> [(400, 574, 'rows'), (595, 699, 'tasks')]."""
    out = []
    for part in filter(None, spec.split(",")):
        span, name = part.split("=")
        lo, hi = span.split("-")
        out.append((int(lo), int(hi), name))
    return out


def table(groups: dict, total: collections.Counter, label: str) -> list[str]:
    s, ins, wf = _METRICS[0], _METRICS[1], _METRICS[2]
    rows = [f"{label:24s} samp%  inst%   wf%  xs%  top stalls"]
    for key, c in sorted(groups.items(), key=lambda kv: -kv[1][s]):
        stalls = collections.Counter({k[6:]: v for k, v in c.items() if k.startswith("stall_")})
        top = " ".join(f"{k}={v:.0f}" for k, v in stalls.most_common(2))
        rows.append(f"{str(key):24s} {100 * c[s] / max(total[s], 1):5.1f} {100 * c[ins] / max(total[ins], 1):5.1f} "
                    f"{100 * c[wf] / max(total[wf], 1):5.1f} {100 * c[_METRICS[3]] / max(total[wf], 1):5.1f}  {top}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sass_csv")
    ap.add_argument("disasm")
    ap.add_argument("--function", required=True, help="comma-separated substrings of the mangled kernel name")
    ap.add_argument("--file", default=None, help="source file of interest (default: the one with most lines)")
    ap.add_argument("--ranges", default="", help="FILE_LINES ranges naming phases: 400-574=rows,595-699=tasks")
    ap.add_argument("--top", type=int, default=40)
    a = ap.parse_args(argv)
    with _open(a.disasm) as f:
        lines = line_map(f, a.function.split(","))
    with _open(a.sass_csv) as f:
        sass = read_sass(f)
    file = a.file or collections.Counter(fl for fl, _ in lines.values()).most_common(1)[0][0]
    agg = attribute(sass, lines, file)
    total = collections.Counter()
    for c in agg.values():
        total.update(c)
    print(f"{len(sass)} instructions, {len(lines)} mapped; {file}; {total[_METRICS[0]]:.0f} stall samples, "
          f"{total[_METRICS[2]]:.0f} shared wavefronts ({100 * total[_METRICS[3]] / max(total[_METRICS[2]], 1):.0f}% "
          f"bank-conflict excess)")
    ranges = parse_ranges(a.ranges)
    if ranges:
        phases = collections.defaultdict(collections.Counter)
        for line, c in agg.items():
            phases[next((n for lo, hi, n in ranges if lo <= line <= hi), "other")].update(c)
        print("\n".join(table(phases, total, "phase")))
    # Source text from this checkout's cutlass/ or cpp/ (right only when the profiled wheel was built from it).
    root = pathlib.Path(__file__).resolve().parents[1]
    path = next((p for p in (root / "cutlass" / file, root / "cpp" / file) if p.exists()), None)
    src = dict(enumerate(path.read_text().split("\n"), 1)) if path else {}
    top = dict(sorted(agg.items(), key=lambda kv: -kv[1][_METRICS[0]])[:a.top])
    for row in table({f"{line}": c for line, c in top.items()}, total, f"{file} line"):
        line = row.split()[0]
        print(row + (f" | {src.get(int(line), '').strip()[:70]}" if line.isdigit() else ""))


if __name__ == "__main__":
    main()
