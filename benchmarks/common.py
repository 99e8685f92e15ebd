"""Shared timing and reporting helpers for the jax_moe benchmarks.

Headline time = GPU time per call: the summed durations of the kernels one
call launches, read with CUPTI through the hook JAX ships for Mosaic GPU
(`jax._src.lib.mosaic_gpu._mosaic_gpu_ext._cupti_*`), median over many calls.
Gaps between kernels and memcpy/memset are not counted. Host wall time per
call is kept as a secondary number: it is dispatch-bound for small problems.
Without CUPTI (a CPU-only machine) the headline falls back to wall time and
every report says so.

Inputs rotate over several random input sets so that the working set of a
timing loop exceeds 2x L2 (50 MB on H100), at most MAX_SETS sets.

JAX_MOE_BENCH_SMOKE=1: tiny shapes and a few iterations (checks the scripts
on a CPU-only machine). Reports go to stdout, are appended to
benchmarks/RESULTS.md (smoke runs: only to a file named by
JAX_MOE_BENCH_RESULTS) and, when $OUT is set, written to $OUT/<bench>.md
(RESULTS.md written on the GPU machine does not come back by itself).
Run the scripts as `python3 benchmarks/<name>.py` so that `import common`
finds this file.
"""
from __future__ import annotations

import datetime
import importlib
import os
import shlex
import statistics
import subprocess
import sys
import time

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")

import jax  # noqa: E402
import numpy as np  # noqa: E402

SMOKE = os.environ.get("JAX_MOE_BENCH_SMOKE", "") not in ("", "0")

MEM_BW = 3.0e12        # B/s: memory floor rate (H100 copy measured 3.03e12)
MATMUL_PEAK = 7.5e14   # flop/s: compute floor, cuBLAS bf16 8192^3 on H100
L2_BYTES = 50 * 10**6
ROTATE_TARGET = 2 * L2_BYTES
MAX_SETS = 32          # as the anchors: tiny inputs stay L2-resident anyway

HERE = os.path.dirname(os.path.abspath(__file__))
# Smoke runs append to RESULTS.md only where this variable names a file.
RESULTS_MD = os.environ.get("JAX_MOE_BENCH_RESULTS") or (
    None if SMOKE else os.path.join(HERE, "RESULTS.md"))


# ----------------------------------------------------------------- imports

def load_module(name):
    """Import `name`, or print why not and return None."""
    try:
        return importlib.import_module(name)
    except Exception as e:  # missing build, missing .so, syntax error...
        print(f"[warn] cannot import {name}: {type(e).__name__}: {e}",
              flush=True)
        return None


def get_fn(mod, name, *, quiet=False):
    """Attribute `name` of `mod`, or None (printing SKIP unless quiet)."""
    fn = getattr(mod, name, None) if mod is not None else None
    if fn is None and not quiet:
        owner = getattr(mod, "__name__", "jax_moe")
        print(f"SKIP {owner}.{name}: not implemented", flush=True)
    return fn


# ------------------------------------------------------------------ inputs

def nbytes(tree) -> int:
    return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)
                   if hasattr(x, "dtype")))


def n_sets_for(bytes_per_set: int) -> int:
    """Input sets needed for a working set of 2x L2 (capped)."""
    return int(max(1, min(MAX_SETS, -(-ROTATE_TARGET // max(bytes_per_set,
                                                             1)))))


def make_sets(make_one, key):
    """[make_one(k) for enough keys]: rotation sets of fresh random inputs."""
    first = make_one(jax.random.fold_in(key, 0))
    n = n_sets_for(nbytes(first))
    return [first] + [make_one(jax.random.fold_in(key, i))
                      for i in range(1, n)]


# ------------------------------------------------------------------ timing

_CUPTI = "unchecked"


def _cupti():
    """The CUPTI extension, or None (reason printed once)."""
    global _CUPTI
    if _CUPTI == "unchecked":
        _CUPTI = None
        if jax.default_backend() != "gpu":
            print("[info] no GPU backend: CUPTI absent, headline times are "
                  "host WALL time", flush=True)
        else:
            try:
                from jax._src.lib import mosaic_gpu as mgpu
                ext = mgpu._mosaic_gpu_ext
                ext._cupti_init  # noqa: B018  (attribute check)
                _CUPTI = ext
            except Exception as e:
                print(f"[warn] CUPTI unavailable ({type(e).__name__}: {e}); "
                      "headline times are host WALL time", flush=True)
    return _CUPTI


def time_source() -> str:
    return "gpu" if _cupti() is not None else "wall"


def _run(f, arg_sets, n):
    r = None
    for i in range(n):
        r = f(*arg_sets[i % len(arg_sets)])
    jax.block_until_ready(r)  # consume: the work cannot be skipped


def _wall_us(f, arg_sets, n, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        _run(f, arg_sets, n)
        times.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(times)


def _gpu_us(ext, f, arg_sets, iters):
    """(median µs per call, kernels per call, kernel names) via CUPTI, or
    None when the calls launched no kernel (e.g. a plain memcpy)."""
    ext._cupti_init()
    try:
        _run(f, arg_sets, iters)
    finally:
        timings = ext._cupti_get_timings(False)  # [(name, ms)] in order
    if not timings:
        return None
    if len(timings) % iters:  # launches differ between calls: mean only
        return (sum(t for _, t in timings) * 1e3 / iters,
                len(timings) / iters, [])
    k = len(timings) // iters
    per_call = [sum(t for _, t in timings[i * k:(i + 1) * k]) * 1e3
                for i in range(iters)]
    return statistics.median(per_call), k, [n for n, _ in timings[:k]]


def time_fn(f, arg_sets, *, max_iters=200, target_s=0.1, wall_reps=3):
    """Time jitted f over rotated arg_sets.

    Returns dict(us, src, kernels, wall_us, kernel_names): `us` is GPU time
    per call when CUPTI works, else wall time; src says which.
    """
    jax.block_until_ready(f(*arg_sets[0]))  # compile
    t0 = time.perf_counter()
    _run(f, arg_sets, len(arg_sets))  # touch every set once, estimate cost
    one = max((time.perf_counter() - t0) / len(arg_sets), 1e-6)
    if SMOKE:
        max_iters = min(max_iters, 3)
    n = int(max(1, min(max_iters, target_s / one)))
    wall = _wall_us(f, arg_sets, n, wall_reps)
    rec = dict(us=wall, src="wall", kernels=None, wall_us=wall,
               kernel_names=[])
    ext = _cupti()
    if ext is not None:
        iters = int(max(min(5, max_iters), n))
        gpu = _gpu_us(ext, f, arg_sets, iters)
        if gpu is None:  # nothing to time on the GPU: keep the wall time
            rec.update(kernels=0)
        else:
            rec.update(us=gpu[0], src="gpu", kernels=gpu[1],
                       kernel_names=gpu[2])
    return rec


def measure(label, f, arg_sets, *, bytes_=None, flops=None, **kw):
    """time_fn plus rates; never raises: errors land in rec['error']."""
    rec = dict(label=label, bytes=bytes_, flops=flops, sets=len(arg_sets))
    try:
        rec.update(time_fn(f, arg_sets, **kw))
    except Exception as e:
        first = str(e).splitlines()[0][:300] if str(e) else ""
        rec["error"] = f"{type(e).__name__}: {first}"
        print(f"{label:<58} ERROR {rec['error']}", flush=True)
        return rec
    us = rec["us"]
    if bytes_:
        rec["gbs"] = bytes_ / us / 1e3
        rec["mem_floor_us"] = bytes_ / MEM_BW * 1e6
        rec["x_mem_floor"] = us / rec["mem_floor_us"]
    if flops:
        rec["tflops"] = flops / us / 1e6
        rec["compute_floor_us"] = flops / MATMUL_PEAK * 1e6
        rec["x_compute_floor"] = us / rec["compute_floor_us"]
    print(f"{label:<58} {rec['src']} {us:10.2f} us  k={rec['kernels']}  "
          f"wall {rec['wall_us']:9.1f} us  sets={len(arg_sets)}"
          + (f"  {rec['gbs']:7.1f} GB/s" if bytes_ else "")
          + (f"  {rec['tflops']:6.1f} TFLOP/s" if flops else ""),
          flush=True)
    if rec["kernel_names"]:  # which kernels: tells a fused call from a chain
        print("    kernels: " + ", ".join(n[:48] for n in
                                          rec["kernel_names"][:6]),
              flush=True)
    return rec


# --------------------------------------------------------------- reporting

def fmt(x):
    """Table cell: '-' for missing, 3 significant digits or one decimal."""
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.1f}" if 100 <= abs(x) < 1e6 else f"{x:.3g}"
    return str(x)


def ok(rec) -> bool:
    """A measurement that exists and did not fail."""
    return bool(rec) and "error" not in rec and "us" in rec


def speedup(ref, new):
    """ref time / new time, or None when either is missing."""
    return ref["us"] / new["us"] if ok(ref) and ok(new) else None


COMPARE_HEADERS = ["min MB", "floor µs", "anchor µs", "k", "jax_moe µs", "k",
                   "GB/s", "× floor", "speed-up"]


def compare_cells(bytes_, anchor, new):
    """Cells under COMPARE_HEADERS: anchor and jax_moe side by side."""
    def t(rec):
        return "ERR" if rec and "error" in rec else (rec or {}).get("us")
    new_ok = ok(new)
    return [bytes_ / 1e6, bytes_ / MEM_BW * 1e6, t(anchor),
            (anchor or {}).get("kernels"), t(new),
            new.get("kernels") if new_ok else None,
            new.get("gbs") if new_ok else None,
            new.get("x_mem_floor") if new_ok else None,
            speedup(anchor, new)]


def md_table(headers, rows) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:"
                            for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def target_line(what, measured_us, target_us) -> str:
    """One informational PASS/MISS line (a miss never fails the run)."""
    if measured_us is None:
        return f"- TARGET {what}: n/a (not measured)"
    verdict = "PASS" if measured_us <= target_us else "MISS"
    return (f"- TARGET {what}: {measured_us:.2f} µs vs target "
            f"{target_us:.2f} µs -> {verdict}")


def git_commit() -> str:
    env = os.environ.get("JAX_MOE_COMMIT")
    if env:
        return env
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                              cwd=HERE, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
    except Exception:  # not a git checkout (the GPU machine's copy)
        return "unknown"


def header(title) -> str:
    d = jax.devices()[0]
    now = datetime.datetime.now(datetime.timezone.utc)
    cmd = " ".join(shlex.quote(a) for a in [os.path.basename(
        sys.executable)] + sys.argv)
    if SMOKE:
        cmd = "JAX_MOE_BENCH_SMOKE=1 " + cmd
    src = time_source()
    timing = ("GPU time per call: median of summed kernel durations (CUPTI;"
              " memcpy/memset and launch gaps not counted)"
              if src == "gpu" else
              "**host WALL time per call (CUPTI absent): not GPU time**")
    return "\n".join([
        f"## {title} — {now:%Y-%m-%d %H:%M} UTC", "",
        f"- device: {getattr(d, 'device_kind', str(d))} "
        f"({jax.default_backend()}), jax {jax.__version__}, "
        f"commit {git_commit()}",
        f"- command: `{cmd}`",
        f"- timing: {timing}; inputs rotate over up to {MAX_SETS} random "
        f"sets (>= 2x L2 where sizes allow); memory floor = min bytes / "
        f"{MEM_BW / 1e12:.1f} TB/s"
        + ("; SMOKE mode (tiny shapes)" if SMOKE else ""), ""])


def publish(bench, title, body):
    """Print a report section and save it to RESULTS.md and $OUT/<bench>.md.

    Call it last: its table ends the output, which the device tool keeps.
    """
    section = header(title) + "\n" + body.rstrip() + "\n"
    if RESULTS_MD:
        with open(RESULTS_MD, "a") as fh:
            fh.write("\n" + section)
    out = os.environ.get("OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, f"{bench}.md"), "w") as fh:
            fh.write(section)
    print("\n" + section, flush=True)


def try_call(what, fn, *args):
    """fn(*args), or None after printing why (a failed check or setup step
    must not end the run)."""
    try:
        return fn(*args)
    except Exception as e:
        first = str(e).splitlines()[0][:300] if str(e) else ""
        print(f"{what}: ERROR {type(e).__name__}: {first}", flush=True)
        return None


def rel_err(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64."""
    out = np.asarray(out, np.float64)
    ref = np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref),
                                                 1e-300))
