"""Shared benchmark plumbing: machine state, timing (warm-up + median), ratios with their spread over
repeats, peak memory in a fresh subprocess, the matmul ceiling, FLOP counting, target entries, markdown tables
and JSON output.

A target whose value is a ratio of timings carries the spread of that ratio over the interleaved repeats
(``speedup``); `target` refuses to call it met or missed when the spread (max - min of the per-repeat ratios)
exceeds the margin between the value and the threshold: met is None, with the reason.

Peak memory: `VmHWM` from /proc/self/status (the high-water RSS of the process's own address space).
`ru_maxrss` is recorded too but is NOT used: on Linux `execve` carries the parent's high-water mark into the
child's `ru_maxrss` (measured here: a 10 MB child of a 300 MB parent reports 312 MB).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from diffseg_hf import allocator

REPO_ROOT = Path(__file__).resolve().parents[1]
CHILD_MARKER = "BENCH_CHILD_RESULT "


# ------------------------------------------------------------------------------------------- machine

def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _process_ticks() -> dict[int, tuple[str, int]]:
    """pid -> (name, utime + stime in clock ticks) of every process readable in /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:  # gone, or not ours to read
            continue
        rest = raw[raw.rindex(")") + 2:].split()  # fields from 3 (state) on; utime, stime are fields 14, 15
        out[int(entry.name)] = (raw[raw.index("(") + 1:raw.rindex(")")], int(rest[11]) + int(rest[12]))
    return out


def other_load(interval_s: float = 0.5, min_share: float = 0.05) -> dict[str, Any]:
    """What other processes did over ``interval_s`` while this one slept: the busy share of all CPUs and the
    processes that used at least ``min_share`` of one core (pid, name, share of one core)."""
    try:
        b0, t0 = _cpu_times()
        p0 = _process_ticks()
        time.sleep(interval_s)
        b1, t1 = _cpu_times()
        p1 = _process_ticks()
    except OSError:
        return {"cpu_busy_fraction": None, "busy_processes": None}
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = [{"pid": pid, "name": name, "cpu": round((ticks - p0[pid][1]) / hz / interval_s, 2)}
            for pid, (name, ticks) in p1.items()
            if pid in p0 and pid != os.getpid() and (ticks - p0[pid][1]) / hz / interval_s >= min_share]
    return {"cpu_busy_fraction": round((b1 - b0) / max(t1 - t0, 1), 3),
            "busy_processes": sorted(busy, key=lambda p: -p["cpu"])}


def cpu_busy_fraction(interval_s: float = 0.5) -> float | None:
    """Share of all CPUs busy over ``interval_s`` while this process sleeps (i.e. other processes' load)."""
    return other_load(interval_s)["cpu_busy_fraction"]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine_state(busy_interval_s: float = 0.5) -> dict[str, Any]:
    """Load from other processes and the software under test, recorded with every result."""
    import diffusers

    others = other_load(busy_interval_s)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "cpu_busy_fraction": others["cpu_busy_fraction"],
        "busy_processes": others["busy_processes"],  # others using >= 5% of a core while we slept
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "allocator": allocator.status(),  # diffseg_hf.allocator: kept freed memory, or the system malloc and why
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
    }


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def load_line(m: dict[str, Any]) -> str:
    """The machine load of a result in one line (for table headings)."""
    others = m.get("busy_processes")
    names = "" if not others else " (" + ", ".join(f"{p['name']} {p['cpu']:.0%}" for p in others[:3]) + ")"
    return (f"load {m['loadavg_1_5_15']} -> {m.get('loadavg_end')}, busy {m['cpu_busy_fraction']}, "
            f"{'?' if others is None else len(others)} other busy processes{names}, torch threads {m['torch_threads']}")


def log(message: str) -> None:
    """Progress on stderr (stdout holds the tables)."""
    print(f"[bench {time.strftime('%H:%M:%S')} load {load_now()[0]}] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------- timing

@dataclass
class Timing:
    median_s: float
    times_s: list[float]
    warmup: int

    def per_second(self, items: float) -> float:
        return items / self.median_s


def time_it(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed calls."""
    return time_interleaved({"fn": fn}, warmup=warmup, repeats=repeats)["fn"]


def time_interleaved(fns: dict[str, Callable[[], object]], *, warmup: int = 1, repeats: int = 5,
                     warmup_fns: dict[str, Callable[[], object]] | None = None,
                     sync: Callable[[], object] | None = None) -> dict[str, Timing]:
    """Like ``time_it`` for several functions, run round-robin (one call of each per round) so that
    load from other processes drifts over all of them alike and their ratios stay fair.
    ``warmup_fns`` (same keys) replace ``fns`` in the warm-up rounds, e.g. a shorter run of the same code.
    ``sync`` (e.g. ``torch.cuda.synchronize``) runs before the clock starts and before it stops."""
    assert repeats >= 1 and warmup >= 0, f"repeats={repeats}, warmup={warmup}"
    sync = sync or (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            if r < warmup:
                (warmup_fns or fns)[name]()
                continue
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    sync()
    rounded = {name: [round(t, 5) for t in ts] for name, ts in times.items()}  # 10 us: the median and the spread
    return {name: Timing(statistics.median(ts), ts, warmup) for name, ts in rounded.items()}  # come from one list


def spread_of(values: Sequence[float]) -> dict[str, float]:
    """min, max and (population) std of repeated measurements."""
    return {"min": float(min(values)), "max": float(max(values)), "std": float(statistics.pstdev(values))}


def speedup(fast: Timing, slow: Timing, scale: float = 1.0) -> dict[str, Any]:
    """How many times faster ``fast`` ran than ``slow`` (``scale`` x slow's time / fast's time; ``scale`` corrects
    for unequal work per call) from timings taken in the same interleaved rounds: "value" is the ratio of the
    medians; "min", "max" and "std" are over the per-round ratios (round i of one against round i of the other)."""
    assert len(fast.times_s) == len(slow.times_s), (len(fast.times_s), len(slow.times_s))
    per_round = [scale * s / max(f, 1e-12) for f, s in zip(fast.times_s, slow.times_s)]
    return {"value": scale * slow.median_s / fast.median_s, **spread_of(per_round), "repeats": len(per_round)}


def span(ratio: dict[str, Any] | None, digits: int = 3) -> list[float] | None:
    """[min, max] of a `speedup` (the spread column of a table row)."""
    return None if ratio is None else [round(ratio["min"], digits), round(ratio["max"], digits)]


# ------------------------------------------------------------------------------------------- memory

def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_mb() -> float:
    """High-water RSS of this process in MiB (VmHWM; ru_maxrss where /proc is missing). The kernel updates VmHWM
    lazily, so right after `reset_peak_rss` it can sit below the current VmRSS: the peak is the larger of the two."""
    kb = _status_kb("VmHWM")
    if kb is None:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(max(kb, _status_kb("VmRSS") or 0) / 1024, 1)


def reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux: write 5 to /proc/self/clear_refs), so that
    ``peak_rss_mb`` afterwards is the peak of what follows; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_mb() -> float:
    """Current RSS of this process in MiB."""
    kb = _status_kb("VmRSS")
    return round(kb / 1024, 1) if kb is not None else float("nan")


def run_child(target: str, kwargs: dict[str, Any], *, timeout_s: float = 1800) -> dict[str, Any]:
    """Run ``module:function(**kwargs)`` in a fresh Python process; its returned dict plus
    ``peak_rss_mb`` (VmHWM at exit), ``rss_after_import_mb`` and ``ru_maxrss_mb``.

    The child inherits the environment (OMP_NUM_THREADS), this process's torch thread count and its allocator
    setting (`diffseg_hf.allocator`: kept freed memory or the system malloc).
    """
    payload = json.dumps({"target": target, "kwargs": kwargs, "threads": torch.get_num_threads(),
                          "keep_freed_memory": allocator.kept()})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "bench.common", payload], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(CHILD_MARKER)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-15:]
        raise RuntimeError(f"benchmark child {target} failed (rc={proc.returncode}):\n" + "\n".join(tail))
    return json.loads(lines[-1][len(CHILD_MARKER):])


def _child_main(payload: str) -> None:
    spec = json.loads(payload)
    if spec.get("keep_freed_memory"):
        allocator.keep_freed_memory()
    torch.set_num_threads(spec["threads"])
    module, func = spec["target"].split(":")
    fn = getattr(importlib.import_module(module), func)
    after_import = peak_rss_mb()
    out = dict(fn(**spec["kwargs"]))
    out.update(peak_rss_mb=peak_rss_mb(), rss_after_import_mb=after_import,
               ru_maxrss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    print(CHILD_MARKER + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------- FLOPs

def matmul_ceiling(dtype: torch.dtype, *, n: int = 2048, warmup: int = 1, repeats: int = 5) -> float:
    """GFLOP/s of an n x n @ n x n matmul in ``dtype`` (the ceiling achieved GFLOP/s is compared with)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    timing = time_it(lambda: torch.matmul(a, b), warmup=warmup, repeats=repeats)
    return 2 * n**3 / timing.median_s / 1e9


def _conv_backward_flop_grouped(grad_out_shape, x_shape, w_shape, _bias, _stride, _padding, _dilation,
                                transposed, _output_padding, groups, output_mask, out_shape, *,
                                overcount: list[int], **_) -> int:
    """torch's conv_backward_flop with the weight-gradient term divided by ``groups``.

    torch 2.13 counts grad_weight as conv(x^T, grad_out^T) with c_in * c_out channel pairs, ignoring
    groups: a depthwise conv's weight gradient comes out ``groups`` times too large. What torch would have
    added on top is accumulated in ``overcount[0]``."""
    from torch.utils.flop_counter import conv_flop_count, get_shape

    def t(shape):
        return [shape[1], shape[0], *shape[2:]]

    flops = 0
    if output_mask[0]:
        flops += conv_flop_count(grad_out_shape, w_shape, get_shape(out_shape[0]), not transposed)
    if output_mask[1]:
        gw = get_shape(out_shape[1])
        pair = (t(grad_out_shape), t(x_shape)) if transposed else (t(x_shape), t(grad_out_shape))
        raw = conv_flop_count(*pair, t(gw), transposed=False)
        flops += raw // groups
        overcount[0] += raw - raw // groups
    return flops


def count_flops(fn: Callable[[], object]) -> dict[str, int]:
    """FLOPs of one call of ``fn`` (e.g. forward + backward), counted by ``FlopCounterMode``: "raw" as torch
    counts them, "corrected" with the grouped-conv weight gradient divided by groups."""
    from functools import partial

    from torch.utils.flop_counter import FlopCounterMode

    overcount = [0]
    mapping = {torch.ops.aten.convolution_backward: partial(_conv_backward_flop_grouped, overcount=overcount)}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    total = counter.get_total_flops()
    return {"raw": total + overcount[0], "corrected": total}


def profile_ops(fn: Callable[[], object], *, top: int = 10) -> list[dict[str, Any]]:
    """The ``top`` aten ops of one call of ``fn`` by self CPU time (torch.profiler), with their share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in events) or 1
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count,
             "share": round(e.self_cpu_time_total / total, 3)} for e in events[:top]]


# ------------------------------------------------------------------------------------------- output

def _rounded(spread: dict[str, Any] | None) -> dict[str, Any] | None:
    if spread is None:
        return None
    return {k: spread[k] if k == "repeats" else float(f"{spread[k]:.4g}")
            for k in ("min", "max", "std", "repeats") if k in spread}


def target(name: str, value: float | None, op: str, threshold: float, note: str = "",
           spread: dict[str, Any] | None = None) -> dict[str, Any]:
    """One target entry: {"name", "value", "target", "met", "note", "spread", "reason"}; ``op`` is ">=", ">", "<="
    or "<". ``spread`` ({"min", "max", ...} of the value over repeats, e.g. a `speedup`): when max - min exceeds
    the margin |value - threshold|, "met" is never printed: met is None and "reason" says why, unless even the
    best repeat misses the target (then it is missed, met False). An unmeasured value (None) has met None too."""
    ops = {">=": float.__ge__, ">": float.__gt__, "<=": float.__le__, "<": float.__lt__}
    met, reason = None, "not measured"
    if value is not None:
        met, reason = bool(ops[op](float(value), float(threshold))), None
        width = None if spread is None else spread["max"] - spread["min"]
        if width is not None and width > abs(float(value) - float(threshold)):
            best_misses = not any(ops[op](float(spread[k]), float(threshold)) for k in ("min", "max"))
            met, reason = (False, None) if best_misses else (
                None, f"unclear (spread {width:.3g} > margin {abs(float(value) - float(threshold)):.3g})")
    shown = None if value is None else float(f"{float(value):.4g}")
    return {"name": name, "value": shown, "target": f"{op} {threshold:g}", "met": met, "note": note,
            "spread": _rounded(spread), "reason": reason}


def info(name: str, value: float | None, note: str = "", spread: dict[str, Any] | None = None) -> dict[str, Any]:
    """A row shown with the targets but judged against none (target and met None), e.g. a retired target."""
    shown = None if value is None else float(f"{float(value):.4g}")
    return {"name": name, "value": shown, "target": None, "met": None, "note": note, "spread": _rounded(spread),
            "reason": "info (no target)"}


def verdict(t: dict[str, Any]) -> str:
    """How a target entry reads in a table: yes, NO, info, or the reason it is unclear."""
    if t["target"] is None:
        return "info"
    if t["met"] is None:
        return t.get("reason") or "unclear"
    return "yes" if t["met"] else "NO"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return "(" + ", ".join(_fmt(x) for x in v) + ")"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def targets_table(targets: Sequence[dict[str, Any]]) -> str:
    rows = [dict(t, met=verdict(t),
                 spread=None if not t.get("spread") else f"{t['spread']['min']:.3g}-{t['spread']['max']:.3g}")
            for t in targets]
    return markdown_table(rows, ["name", "value", "spread", "target", "met", "note"])


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable) + "\n")
    tmp.replace(path)
    return path


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    if isinstance(obj, (torch.dtype, Path)):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


def result(benchmark: str, config: Any, machine: dict, rows: list[dict], targets: list[dict],
           **extra: Any) -> dict[str, Any]:
    """One benchmark's output; ``machine["loadavg_end"]`` is taken now."""
    machine = dict(machine, loadavg_end=load_now())
    return {"benchmark": benchmark, "config": asdict(config) if hasattr(config, "__dataclass_fields__") else config,
            "machine": machine, "rows": rows, "targets": targets, **extra}


def cli(description: str, argv: Sequence[str] | None = None,
        add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
        profile: bool = True) -> argparse.Namespace:
    """--quick, --json and (where supported) --profile, plus the script's own arguments."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small repeats and sizes (minutes on 2 cores)")
    parser.add_argument("--json", type=Path, default=None, help="write the result to this JSON file")
    parser.add_argument("--system-malloc", action="store_true",
                        help="leave glibc malloc as it is (default: keep freed memory, as `diffseg` and train() do)")
    if profile:
        parser.add_argument("--profile", action="store_true",
                            help="also record the top ops (torch.profiler) of the runs each target compares")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if not args.system_malloc:
        allocator.keep_freed_memory()
    return args


def report(res: dict[str, Any], columns: Sequence[str], json_path: str | os.PathLike | None) -> None:
    """Print the rows and targets as markdown tables; write the JSON when a path is given."""
    m = res["machine"]
    print(f"\n## {res['benchmark']}  ({load_line(m)})\n")
    print(markdown_table(res["rows"], columns))
    if res["targets"]:
        print("\n" + targets_table(res["targets"]))
    for name, ops in res.get("profile", {}).items():
        print(f"\nprofile {name}:\n" + markdown_table(ops, ["op", "self_ms", "calls", "share"]))
    if json_path is not None:
        print(f"\nwrote {write_json(json_path, res)}")


if __name__ == "__main__":
    _child_main(sys.argv[1])
