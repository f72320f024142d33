"""Benchmarks: parallelmethods against every usual way to map a method, in one run.

    python -m pip install -e ".[bench]"
    python benchmarks/run.py            # full sizes (several minutes)
    python benchmarks/run.py --quick    # smaller sizes, under ~2 minutes
    python benchmarks/run.py --smoke    # tiny sizes, for the test suite

Every method runs in this one process, repeats are interleaved and the order
is shuffled each repeat with a fixed seed (whatever runs right after a serial
method, such as the plain loop, is measurably slower, about 5% on W2, so no
method may always hold that place), every result is checked against a plain loop, and the table
reports medians and ratios. Methods that would take far too long at full size
(naive joblib pickles self per task) run on a prefix of the items and are
extrapolated linearly; they are marked with ``*``.
Writes ``benchmarks/results/latest.json`` and ``docs/benchmark.png``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import pickle
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import joblib  # noqa: E402
import numpy as np  # noqa: E402
from joblib import Parallel, delayed  # noqa: E402

from parallelmethods import parallelizable  # noqa: E402

WORKERS = 2


# --------------------------------------------------------------------------
# Workload objects (module level: importable in workers, as users' code is).
# --------------------------------------------------------------------------


class Squares:
    def __init__(self) -> None:
        self.k = 1

    @parallelizable
    def square(self, i: int) -> int:
        return i * i * self.k

    def plain(self, i: int) -> int:
        return i * i * self.k


def _burn(iterations: int) -> int:
    """A fixed amount of pure-Python CPU work (holds the GIL, unlike a sleep)."""
    total = 0
    for k in range(iterations):
        total += k * k % 7
    return total


def calibrate(seconds: float) -> int:
    """Iterations of :func:`_burn` that take about ``seconds`` here."""
    n = 10_000
    while True:
        t0 = time.perf_counter()
        _burn(n)
        elapsed = time.perf_counter() - t0
        if elapsed > 0.05:
            return max(1, int(n * seconds / elapsed))
        n *= 2


class Busy:
    def __init__(self, seconds: float) -> None:
        self.iterations = calibrate(seconds)

    @parallelizable
    def work(self, i: int) -> int:
        _burn(self.iterations)
        return i

    def plain(self, i: int) -> int:
        _burn(self.iterations)
        return i


class ArrayHolder:
    def __init__(self, n_floats: int) -> None:
        self.a = np.arange(n_floats, dtype=np.float64)

    @parallelizable
    def lookup(self, i: int) -> float:
        return float(self.a[(i * 7919) % len(self.a)])

    def plain(self, i: int) -> float:
        return float(self.a[(i * 7919) % len(self.a)])


class DictHolder:
    def __init__(self, n_keys: int) -> None:
        self.table = {f"key{i}": (i, float(i), str(i) * 3) for i in range(n_keys)}
        self.n = n_keys

    @parallelizable
    def lookup(self, i: int) -> float:
        return self.table[f"key{(i * 7919) % self.n}"][1]

    def plain(self, i: int) -> float:
        return self.table[f"key{(i * 7919) % self.n}"][1]


def square_fn(i: int) -> int:
    return i * i


def unwrap_self(arg: tuple[Any, int]) -> Any:
    """The classic workaround: a global function taking (self, x)."""
    obj, x = arg
    return obj.plain(x)


_SHARED: Any = None


def _init_shared(obj: Any) -> None:
    global _SHARED
    _SHARED = obj


def _call_shared(x: int) -> Any:
    return _SHARED.plain(x)


def _mpire_call(shared: Any, x: int) -> Any:
    return shared.plain(x)


# --------------------------------------------------------------------------
# Methods: each takes (obj, items) and returns the list of results.
# --------------------------------------------------------------------------


def m_loop(obj: Any, items: list[int]) -> list[Any]:
    return [obj.plain(i) for i in items]


def _pm(backend: str) -> Callable[[Any, list[int]], list[Any]]:
    def run(obj: Any, items: list[int]) -> list[Any]:
        bound = getattr(obj, _PM_METHOD[type(obj).__name__])
        return bound.map(items, backend=backend, n_jobs=WORKERS)  # type: ignore[no-any-return]

    return run


_PM_METHOD = {"Squares": "square", "Busy": "work", "ArrayHolder": "lookup", "DictHolder": "lookup"}


def m_joblib_naive(obj: Any, items: list[int]) -> list[Any]:
    return Parallel(n_jobs=WORKERS)(delayed(obj.plain)(i) for i in items)  # type: ignore[no-any-return]


def m_unwrap_self(obj: Any, items: list[int]) -> list[Any]:
    return Parallel(n_jobs=WORKERS)(delayed(unwrap_self)((obj, i)) for i in items)  # type: ignore[no-any-return]


def m_joblib_function(obj: Any, items: list[int]) -> list[Any]:
    return Parallel(n_jobs=WORKERS)(delayed(square_fn)(i) for i in items)  # type: ignore[no-any-return]


def m_pool_map(obj: Any, items: list[int]) -> list[Any]:
    with multiprocessing.get_context("fork").Pool(WORKERS) as pool:
        return pool.map(obj.plain, items)


def m_pool_initializer(obj: Any, items: list[int]) -> list[Any]:
    with multiprocessing.get_context("fork").Pool(WORKERS, initializer=_init_shared, initargs=(obj,)) as pool:
        return pool.map(_call_shared, items)


def m_ppe(obj: Any, items: list[int]) -> list[Any]:
    chunk = max(1, math.ceil(len(items) / (4 * WORKERS)))
    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(WORKERS, mp_context=ctx) as ex:
        return list(ex.map(obj.plain, items, chunksize=chunk))


def m_mpire(obj: Any, items: list[int]) -> list[Any]:
    from mpire import WorkerPool

    with WorkerPool(n_jobs=WORKERS, shared_objects=obj, start_method="fork") as pool:
        return pool.map(_mpire_call, items)  # type: ignore[no-any-return]


METHODS: dict[str, Callable[[Any, list[int]], list[Any]]] = {
    "plain loop": m_loop,
    "pm loky": _pm("loky"),
    "pm multiprocessing (fork)": _pm("multiprocessing"),
    "pm threading": _pm("threading"),
    "joblib delayed(obj.method)": m_joblib_naive,
    "joblib unwrap_self": m_unwrap_self,
    "joblib module fn, no state": m_joblib_function,
    "Pool.map(obj.method)": m_pool_map,
    "fork Pool + initializer": m_pool_initializer,
    "ProcessPoolExecutor chunked": m_ppe,
    "mpire shared_objects": m_mpire,
}

# Methods that pickle self per task: run on a prefix when that would be slow.
PER_TASK_PICKLERS = {"joblib delayed(obj.method)", "joblib unwrap_self"}


# --------------------------------------------------------------------------
# Memory: peak PSS of the process tree (shared pages count once).
# --------------------------------------------------------------------------


class PeakPSS:
    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> int:
        import psutil

        me = psutil.Process()
        total = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                total += p.memory_full_info().pss
            except Exception:
                pass
        return total

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, self._sample())
            if self._stop.wait(0.01):
                return

    def __enter__(self) -> PeakPSS:
        # Baseline: the tree before the run. The caller kills idle workers
        # first, so this is this process alone, which already holds self.
        self.base = self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    title: str
    make: Callable[[], Any]
    n_items: int
    methods: list[str]
    times: dict[str, list[float]] = field(default_factory=dict)
    extrapolated: dict[str, int] = field(default_factory=dict)
    peak_mb: dict[str, float] = field(default_factory=dict)
    floor: float | None = None
    self_mb: float | None = None


def _sizes(mode: str) -> dict[str, Any]:
    if mode == "smoke":
        return {
            "w1": 2000,
            "w2_items": 8,
            "w2_s": 0.002,
            "w3a": 200_000,
            "w3b": 20_000,
            "w3_items": 50,
            "w5_calls": 2,
            "w5_items": 20,
            "repeats": 1,
            "budget": 5.0,
        }
    if mode == "quick":
        return {
            "w1": 50_000,
            "w2_items": 32,
            "w2_s": 0.02,
            "w3a": 6_250_000,
            "w3b": 200_000,
            "w3_items": 2000,
            "w5_calls": 5,
            "w5_items": 100,
            "repeats": 1,
            "budget": 8.0,
        }
    return {
        "w1": 200_000,
        "w2_items": 64,
        "w2_s": 0.02,
        "w3a": 25_000_000,
        "w3b": 1_000_000,
        "w3_items": 2000,
        "w5_calls": 10,
        "w5_items": 100,
        "repeats": 3,
        "budget": 30.0,
    }


def run_order(methods: list[str], repeat: int) -> list[str]:
    """The order of one repeat: listed order first, then shuffled (seeded, so runs repeat)."""
    order = list(methods)
    if repeat:
        random.Random(repeat).shuffle(order)
    return order


def run_workload(w: Workload, repeats: int, budget: float, memory: bool) -> None:
    obj = w.make()
    items = list(range(w.n_items))
    expected = m_loop(obj, items)
    if w.name.startswith("W3"):
        t0 = time.perf_counter()
        blob = pickle.dumps(obj, protocol=5)
        pickle.loads(blob)
        w.floor = time.perf_counter() - t0
    for repeat in range(repeats):
        # A new state each repeat: every timed call is a first call on that
        # state (warm, unchanged-object calls are what W5 measures).
        obj.epoch = repeat
        for name in run_order(w.methods, repeat):
            fn = METHODS[name]
            use = items
            if name in PER_TASK_PICKLERS and w.floor is not None:
                # Each task pickles self: estimate and cap the work to the budget.
                per_item = w.floor * 1.1
                n = max(2 * WORKERS, min(len(items), int(budget / per_item)))
                if n < len(items):
                    use = items[:n]
                    w.extrapolated[name] = n
            t0 = time.perf_counter()
            got = fn(obj, use)
            elapsed = time.perf_counter() - t0
            if got != expected[: len(use)]:
                msg = f"{w.name}/{name}: results differ from the plain loop"
                raise AssertionError(msg)
            w.times.setdefault(name, []).append(elapsed * len(items) / len(use))
            print(
                f"  {w.name:4} {name:30} {elapsed:8.3f}s"
                + (f" (on {len(use)} items)" if len(use) < len(items) else ""),
                flush=True,
            )
    if memory:
        # Separate, untimed runs: no idle workers at the start, so the peak
        # counts every worker this method starts, and shared pages once (PSS).
        w.self_mb = obj_size_mb(obj)
        for name in w.methods:
            if name == "plain loop":
                continue
            _kill_idle_workers()
            use = items[: w.extrapolated.get(name, len(items))]
            with PeakPSS() as mon:
                METHODS[name](obj, use)
                mon.peak = max(mon.peak, mon._sample())
            w.peak_mb[name] = (mon.peak - mon.base) / 1e6
        _kill_idle_workers()
        _warm()  # the next timings must not pay worker start-up


def _warm(names: list[str] | None = None) -> None:
    """Start pools/executors outside the timings."""
    warm = Squares()
    for name in names or ["pm loky", "joblib module fn, no state"]:
        assert METHODS[name](warm, [1, 2, 3, 4]) == [1, 4, 9, 16]


def obj_size_mb(obj: Any) -> float:
    sizes = [getattr(v, "nbytes", 0) for v in vars(obj).values()]
    return max(sizes) / 1e6 if any(sizes) else len(pickle.dumps(obj, protocol=5)) / 1e6


def _kill_idle_workers() -> None:
    from joblib.externals.loky import get_reusable_executor

    get_reusable_executor().shutdown(wait=True, kill_workers=True)
    time.sleep(0.2)


def run_w5(obj: Any, calls: int, n_items: int) -> dict[str, Any]:
    """W5: the same object mapped `calls` times (warm workers): first vs later calls."""
    items = list(range(n_items))
    expected = m_loop(obj, items)
    out: dict[str, Any] = {}
    for name, fn in (
        ("pm loky", _pm("loky")),
        ("ProcessPoolExecutor chunked", m_ppe),
        ("fork Pool + initializer", m_pool_initializer),
    ):
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            assert fn(obj, items) == expected
            times.append(time.perf_counter() - t0)
        out[name] = {
            "first": times[0],
            "later_median": statistics.median(times[1:]) if len(times) > 1 else times[0],
            "total": sum(times),
        }
        print(f"  W5   {name:30} first {times[0]:.3f}s, later median {out[name]['later_median']:.3f}s", flush=True)
    return out


def run_dask_w3b(obj: Any, n_items: int) -> dict[str, float] | None:
    try:
        from distributed import Client, LocalCluster
    except ImportError:
        return None
    items = list(range(n_items))
    expected = m_loop(obj, items)
    cluster = LocalCluster(
        n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    )
    client = Client(cluster)
    try:
        client.submit(sum, [1]).result()  # warm
        t0 = time.perf_counter()
        assert obj.lookup.map(items, backend="dask") == expected
        pm_t = time.perf_counter() - t0

        def chunk_call(o: Any, chunk: list[int]) -> list[Any]:
            return [o.plain(i) for i in chunk]

        t0 = time.perf_counter()
        fut = client.scatter(obj, broadcast=True)
        size = max(1, math.ceil(n_items / (4 * WORKERS)))
        chunks = [items[i : i + size] for i in range(0, n_items, size)]
        futures = client.map(chunk_call, [fut] * len(chunks), chunks)
        got = [x for part in client.gather(futures) for x in part]
        dask_t = time.perf_counter() - t0
        assert got == expected
    finally:
        client.close()
        cluster.close()
    print(f"  W3b  pm dask {pm_t:.3f}s, dask scatter+chunked map {dask_t:.3f}s", flush=True)
    return {"pm dask": pm_t, "dask scatter + chunked map": dask_t}


def run_ray_w3b(obj: Any, n_items: int, budget: float) -> dict[str, Any] | None:
    """W3b on a local Ray (WORKERS CPUs): pm vs ray.put once + chunked tasks vs naive joblib-on-Ray.

    Runs last: Ray's joblib backend rewires joblib's PicklingPool to Ray's
    pool for the rest of the process (ray.util.joblib.ray_backend.configure).
    """
    if "ray" not in sys.modules:
        os.environ.setdefault(
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0"
        )  # a local Ray on 127.0.0.1 only (see tests/test_ray.py)
    try:
        import ray
        from ray.util.joblib import register_ray
    except ImportError:
        return None
    if type(obj).__module__ == "__main__":
        # Ray's workers do not import the driver's __main__ (dask's spawned
        # ones do): the same class from this file imported as a module, as a
        # user's class would be; the workers find it through PYTHONPATH.
        import importlib

        obj = getattr(importlib.import_module("benchmarks.run"), type(obj).__name__)(obj.n)
    items = list(range(n_items))
    expected = m_loop(obj, items)
    path = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)
    ray.init(
        num_cpus=WORKERS,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        runtime_env={"env_vars": {"PYTHONPATH": path}},
    )
    register_ray()
    try:

        @ray.remote(max_retries=0)
        def chunk_call(o: Any, chunk: list[int]) -> list[Any]:
            return [o.plain(i) for i in chunk]

        # Warm both routes on a small object of the same class: workers
        # started, modules imported (neither route pays that in the timings).
        small = type(obj)(100)
        assert small.lookup.map(items[:8], backend="ray") == [small.plain(i) for i in items[:8]]
        ray.get([chunk_call.remote(ray.put(small), [1]) for _ in range(WORKERS)])

        def own_route(n_chunks: int) -> list[Any]:
            ref = ray.put(obj)
            size = max(1, math.ceil(n_items / n_chunks))
            return [
                x
                for part in ray.get([chunk_call.remote(ref, items[i : i + size]) for i in range(0, n_items, size)])
                for x in part
            ]

        routes: dict[str, Callable[[], list[Any]]] = {
            "pm ray": lambda: obj.lookup.map(items, backend="ray"),  # type: ignore[no-any-return]
            f"ray.put + {WORKERS} chunked tasks": lambda: own_route(WORKERS),
            f"ray.put + {4 * WORKERS} chunked tasks": lambda: own_route(4 * WORKERS),
        }
        times: dict[str, list[float]] = {k: [] for k in routes}
        for repeat in range(3):
            for name in run_order(list(routes), repeat):
                obj.epoch = (repeat, name)  # a new state: every timed call is a first call on it
                t0 = time.perf_counter()
                got = routes[name]()
                times[name].append(time.perf_counter() - t0)
                assert got == expected
        pm_t = statistics.median(times.pop("pm ray"))
        own = {k: statistics.median(v) for k, v in times.items()}

        # Naive: joblib's Ray backend, self pickled with every task; on a prefix, extrapolated.
        t0 = time.perf_counter()
        blob = pickle.dumps(obj, protocol=5)
        pickle.loads(blob)
        per_item = (time.perf_counter() - t0) * 1.1
        n = max(2 * WORKERS, min(n_items, int(budget / per_item)))
        # Its fixed cost (a new Ray actor pool per call) is measured apart and
        # not extrapolated: only the per-item part is scaled to all items.
        t0 = time.perf_counter()
        Parallel(n_jobs=WORKERS, backend="ray")(delayed(abs)(-i) for i in range(WORKERS))
        fixed = time.perf_counter() - t0
        t0 = time.perf_counter()
        got = Parallel(n_jobs=WORKERS, backend="ray")(delayed(obj.plain)(i) for i in items[:n])
        naive_t = fixed + max(0.0, time.perf_counter() - t0 - fixed) * n_items / n
        assert got == expected[:n]
    finally:
        ray.shutdown()
    best_name = min(own, key=lambda k: own[k])
    for k, v in own.items():
        print(f"  W3b  {k:30} {v:8.3f}s", flush=True)
    print(
        f"  W3b  pm ray {pm_t:.3f}s (medians of 3); naive Parallel(backend='ray') {naive_t:.3f}s* (on {n} items)",
        flush=True,
    )
    return {
        "pm ray": pm_t,
        **own,
        "best own": own[best_name],
        "best own route": best_name,
        "naive": naive_t,
        "naive extrapolated from": n,
    }  # type: ignore[dict-item]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="smaller sizes, under ~2 minutes")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite's smoke run)")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG chart")
    parser.add_argument("--replot", action="store_true", help="only redraw the chart from --out's JSON")
    parser.add_argument("--no-dask", action="store_true", help="skip the dask row")
    parser.add_argument(
        "--no-ray",
        action="store_true",
        help="skip the Ray row (runs last: Ray's joblib backend rewires joblib's multiprocessing pool)",
    )
    parser.add_argument(
        "--clusters-only", action="store_true", help="run only the dask and Ray W3b rows (no JSON, no chart)"
    )
    parser.add_argument(
        "--only",
        default="",
        help="run only these rows, comma-separated: W1,W2,W3a,W3b,W4,W6,W6b,W7,W8,W5f (no JSON, no chart)",
    )
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "latest.json"))
    parser.add_argument("--chart", default=os.path.join(ROOT, "docs", "benchmark.png"))
    args = parser.parse_args(argv)
    if args.replot:
        _chart(_load(args.out), args.chart)
        print(f"chart: {args.chart}")
        return 0
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    s = _sizes(mode_name)
    have_mpire = _importable("mpire")
    everything = [m for m in METHODS if have_mpire or m != "mpire shared_objects"]
    stateful = [m for m in everything if m != "joblib module fn, no state"]
    workloads = [
        Workload("W1", f"square(self, i) x {s['w1']:,}", Squares, s["w1"], everything),
        Workload(
            "W2",
            f"~{s['w2_s'] * 1000:.0f} ms of pure-Python CPU per item x {s['w2_items']}",
            lambda: Busy(s["w2_s"]),
            s["w2_items"],
            [m for m in stateful if m != "pm threading"] + ["pm threading"],
        ),
        Workload(
            "W3a",
            f"self holds a {s['w3a'] * 8 / 1e6:.0f} MB float64 array, lookup x {s['w3_items']}",
            lambda: ArrayHolder(s["w3a"]),
            s["w3_items"],
            stateful,
        ),
        Workload(
            "W3b",
            f"self holds a dict of {s['w3b']:,} keys, lookup x {s['w3_items']}",
            lambda: DictHolder(s["w3b"]),
            s["w3_items"],
            stateful,
        ),
    ]
    print(
        f"parallelmethods benchmarks ({mode_name}), {WORKERS} workers, joblib {joblib.__version__}, Python {sys.version.split()[0]}"
    )
    if args.only:
        only = args.only.split(",")
        chosen = [w for w in workloads if w.name in only]
        if chosen:
            _warm(everything)
        for w in chosen:
            print(f"{w.name}: {w.title}", flush=True)
            run_workload(w, s["repeats"], s["budget"], memory=w.name.startswith("W3") and _importable("psutil"))
        if chosen:
            print(_report(chosen, {}, None, None))
        rows = run_result_rows(mode_name, [r for r in only if r in RESULT_ROWS])
        if rows:
            print(result_rows_report(rows))
        return 0
    if args.clusters_only:
        dask_row = None if args.no_dask else run_dask_w3b(DictHolder(s["w3b"]), s["w3_items"])
        ray_row = None if args.no_ray else run_ray_w3b(DictHolder(s["w3b"]), s["w3_items"], s["budget"])
        print("\n".join(_cluster_lines(dask_row, ray_row)))
        return 0
    started = time.perf_counter()
    _warm(everything)
    for w in workloads:
        print(f"{w.name}: {w.title}", flush=True)
        run_workload(w, s["repeats"], s["budget"], memory=w.name.startswith("W3") and _importable("psutil"))
    print("W5: the W3b object mapped again and again (warm workers)", flush=True)
    w5 = run_w5(DictHolder(s["w3b"]), s["w5_calls"], s["w5_items"])
    dask_row = None if args.no_dask else run_dask_w3b(DictHolder(s["w3b"]), s["w3_items"])
    # Not in the smoke run (the test suite's): tests/test_ray.py covers Ray, and a Ray start costs ~4 s.
    ray_row = (
        None if args.no_ray or mode_name == "smoke" else run_ray_w3b(DictHolder(s["w3b"]), s["w3_items"], s["budget"])
    )
    report = _report(workloads, w5, dask_row, ray_row)
    print(report)
    rows = run_result_rows(mode_name, list(RESULT_ROWS))
    print(result_rows_report(rows))
    print(f"total {time.perf_counter() - started:.0f}s")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(
            {
                "mode": mode_name,
                "workloads": {
                    w.name: {
                        "title": w.title,
                        "median_s": {k: statistics.median(v) for k, v in w.times.items()},
                        "extrapolated_from": w.extrapolated,
                        "extra_pss_mb": w.peak_mb,
                        "self_mb": w.self_mb,
                        "copy_once_floor_s": w.floor,
                    }
                    for w in workloads
                },
                "W5": w5,
                "dask_W3b": dask_row,
                "ray_W3b": ray_row,
                "results_and_cold_start": rows,
            },
            f,
            indent=2,
        )
    if not args.no_chart and _importable("matplotlib"):
        _chart(workloads, args.chart)
        print(f"chart: {args.chart}")
    return 0


def _load(path: str) -> list[Workload]:
    with open(path) as f:
        data = json.load(f)
    out = []
    for name, w in data["workloads"].items():
        wl = Workload(name, w["title"], object, 0, list(w["median_s"]))
        wl.times = {k: [v] for k, v in w["median_s"].items()}
        wl.extrapolated = w["extrapolated_from"]
        out.append(wl)
    return out


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _cluster_lines(dask_row: dict[str, float] | None, ray_row: dict[str, Any] | None) -> list[str]:
    lines = []
    if dask_row:
        ratio = dask_row["pm dask"] / dask_row["dask scatter + chunked map"]
        lines.append(
            f"\nW3b on a {WORKERS}-worker LocalCluster: pm dask {dask_row['pm dask']:.3f}s vs dask scatter + chunked map {dask_row['dask scatter + chunked map']:.3f}s (ratio {ratio:.2f})"
        )
    if ray_row:
        pm, best, naive = ray_row["pm ray"], ray_row["best own"], ray_row["naive"]
        lines.append(
            f"\nW3b on a {WORKERS}-CPU local Ray: pm ray {pm:.3f}s vs {ray_row['best own route']} {best:.3f}s "
            f"(ratio {pm / best:.2f}); naive Parallel(backend='ray') {naive:.3f}s* (pm is {naive / pm:.0f}x faster)"
        )
    return lines


def _report(
    workloads: list[Workload],
    w5: dict[str, Any],
    dask_row: dict[str, float] | None,
    ray_row: dict[str, Any] | None = None,
) -> str:
    lines = []
    for w in workloads:
        med = {k: statistics.median(v) for k, v in w.times.items()}
        loop = med["plain loop"]
        lines.append(
            f"\n{w.name}: {w.title}"
            + (f"   (pickle dumps+loads of self, the copy-once floor: {w.floor:.3f}s)" if w.floor else "")
        )
        if w.self_mb:
            lines.append(
                f"  (memory: extra PSS of the process tree over the caller alone; self's data is {w.self_mb:.0f} MB)"
            )
        lines.append(f"  {'method':32} {'median s':>10} {'x loop':>8} {'x pm best':>10} {'extra MB':>12}")
        best_pm = min(v for k, v in med.items() if k.startswith("pm "))
        for k, v in sorted(med.items(), key=lambda kv: kv[1]):
            star = "*" if k in w.extrapolated else " "
            mem = (f"{w.peak_mb[k]:12.0f}" if w.peak_mb[k] > 5 else f"{'~0 †':>12}") if k in w.peak_mb else " " * 12
            lines.append(f"  {k:31}{star} {v:10.3f} {v / loop:8.2f} {v / best_pm:10.2f} {mem}")
    if w5:
        lines.append("\nW5 (same object, repeated calls):")
    for k, v in w5.items():
        lines.append(
            f"  {k:32} first {v['first']:.3f}s  later (median) {v['later_median']:.3f}s  ratio {v['later_median'] / v['first']:.2f}"
        )
    lines.extend(_cluster_lines(dask_row, ray_row))
    lines.append("\n* run on a prefix of the items and extrapolated linearly (it pickles self per task)")
    lines.append(
        "† no measurable extra memory: threads share self; forked workers share its pages copy-on-write"
        " (after a fork the caller's PSS drops as pages become shared, so small or negative deltas read as ~0)"
    )
    return "\n".join(lines)


def _chart(workloads: list[Workload], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(13, 9))
    for ax, w in zip(grid.flat, workloads, strict=True):
        med = {k: statistics.median(v) for k, v in w.times.items()}
        names = sorted(med, key=lambda k: med[k])
        colors = ["#2a7ab9" if n.startswith("pm ") else "#999999" for n in names]
        ax.barh(range(len(names)), [med[n] for n in names], color=colors)
        ax.set_yticks(range(len(names)), [n + ("*" if n in w.extrapolated else "") for n in names], fontsize=8)
        wide = max(med.values()) / max(min(med.values()), 1e-9) > 20
        if wide:
            ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("seconds" + (" (log scale)" if wide else "") + "; lower is better")
        ax.set_title(f"{w.name}: {w.title}", fontsize=9)
    fig.suptitle("parallelmethods (blue) vs the alternatives, 2 workers", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=110)


# --------------------------------------------------------------------------
# W6 / W6b: results coming back (large arrays; ~1 MB of plain data per item).
# W7: cold start, measured as whole fresh processes.
# W8: one transient worker crash in 200 items of ~10 ms (retries=1).
# W5f: warm after a failure: W5 with a failing call in the middle.
# Run alone with: python benchmarks/run.py --only W6,W6b,W7,W8,W5f [--quick]
# --------------------------------------------------------------------------

RESULT_ROWS = ("W6", "W6b", "W7", "W8", "W5f")


class ResultMaker:
    """Returns a large float64 array (W6) or ~1 MB of plain data (W6b) per item."""

    def __init__(self, n_floats: int, n_rows: int) -> None:
        self.n_floats = n_floats
        self.n_rows = n_rows

    def _array(self, i: int) -> Any:
        a = np.empty(self.n_floats)
        a.fill(float(i))
        return a

    def _records(self, i: int) -> Any:
        return {"id": i, "rows": [(j, j * 0.5, f"row{j}") for j in range(self.n_rows)]}

    @parallelizable
    def make(self, i: int) -> Any:
        return self._array(i)

    def plain_make(self, i: int) -> Any:
        return self._array(i)

    @parallelizable
    def records(self, i: int) -> Any:
        return self._records(i)

    def plain_records(self, i: int) -> Any:
        return self._records(i)


def _result_methods(pm_name: str, plain_name: str) -> dict[str, Callable[[Any, list[int]], list[Any]]]:
    def pm(backend: str) -> Callable[[Any, list[int]], list[Any]]:
        return lambda obj, items: getattr(obj, pm_name).map(items, backend=backend, n_jobs=WORKERS)  # type: ignore[no-any-return]

    return {
        "plain loop": lambda obj, items: [getattr(obj, plain_name)(i) for i in items],
        "pm threading": pm("threading"),
        "joblib delayed(obj.method)": lambda obj, items: Parallel(n_jobs=WORKERS)(
            delayed(getattr(obj, plain_name))(i) for i in items
        ),
        "pm loky": pm("loky"),
        "pm multiprocessing (fork)": pm("multiprocessing"),
    }


def _same(got: list[Any], expected: list[Any]) -> bool:
    if len(got) != len(expected):
        return False
    return all(np.array_equal(g, e) if isinstance(e, np.ndarray) else g == e for g, e in zip(got, expected))


def _touch(results: list[Any]) -> None:
    """Read every result, as a user would: mapped pages count in PSS only once touched."""
    for r in results:
        if isinstance(r, np.ndarray):
            float(r.sum())


def run_results_row(name: str, mode: str) -> dict[str, Any]:
    """W6 or W6b: every method side by side, medians; peak extra PSS over the results' size."""
    n_items = {"smoke": 4, "quick": 32, "full": 64}[mode]
    repeats = 1 if mode != "full" else 3
    obj = ResultMaker(2_000_000 if name == "W6" else 0, 0 if name == "W6" else 50_000)
    methods = _result_methods(*(("make", "plain_make") if name == "W6" else ("records", "plain_records")))
    items = list(range(n_items))
    expected = methods["plain loop"](obj, items)
    size = sum(getattr(r, "nbytes", 0) for r in expected) if name == "W6" else len(pickle.dumps(expected, protocol=5))
    times: dict[str, list[float]] = {}
    for repeat in range(repeats):
        for m in run_order(list(methods), repeat):
            t0 = time.perf_counter()
            got = methods[m](obj, items)
            times.setdefault(m, []).append(time.perf_counter() - t0)
            if not _same(got, expected):
                raise AssertionError(f"{name}/{m}: results differ from the plain loop")
            del got
            print(f"  {name:4} {m:30} {times[m][-1]:8.3f}s", flush=True)
    del expected
    peak: dict[str, float] = {}
    if name == "W6" and _importable("psutil"):
        for m in methods:
            _kill_idle_workers()
            with PeakPSS() as mon:
                got = methods[m](obj, items)
                _touch(got)
                mon.peak = max(mon.peak, mon._sample())
            del got
            peak[m] = (mon.peak - mon.base) / size
        _kill_idle_workers()
    return {
        "title": f"{'a 16 MB float64 array' if name == 'W6' else '~1 MB of plain data (tuples in a dict)'} per item x {n_items}",
        "median_s": {m: statistics.median(v) for m, v in times.items()},
        "results_mb": size / 1e6,
        "peak_pss_x_results": peak,
    }


_W7_SCRIPT = """
import sys, time
import numpy as np
{extra_import}
from joblib import Parallel, delayed
from parallelmethods import parallelizable

class Model:
    def __init__(self):
        self.w = np.arange(1000.0)

    @parallelizable
    def f(self, i):
        return float(self.w[i % 1000]) * 2

m = Model()
how = sys.argv[1]
if how == "pm default":
    out = m.f.map(range(200))
elif how == "pm multiprocessing":
    out = m.f.map(range(200), backend="multiprocessing", n_jobs={workers})
elif how == "naive joblib":
    out = Parallel(n_jobs={workers})(delayed(m.f)(i) for i in range(200))
else:
    import multiprocessing
    with multiprocessing.get_context("fork").Pool({workers}) as pool:
        out = pool.map(m.f, range(200))
assert out == [float(i % 1000) * 2 for i in range(200)], out[:5]
"""


def run_w7(mode: str) -> dict[str, Any]:
    """W7: a fresh ``python -c`` per run (imports included), median wall time."""
    import compileall
    import subprocess

    # As pip installs a wheel: byte-compiled. Why: an editable install under
    # PYTHONDONTWRITEBYTECODE=1 compiles the package's source in the caller and
    # in every fresh worker, on every run (~0.15 s here), which no installed
    # package pays (joblib and numpy are byte-compiled by pip).
    compileall.compile_dir(os.path.join(ROOT, "parallelmethods"), quiet=1)

    sklearn = _importable("sklearn")
    script = _W7_SCRIPT.format(extra_import="import sklearn.linear_model" if sklearn else "", workers=WORKERS)
    repeats = {"smoke": 1, "quick": 3, "full": 5}[mode]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    methods = ["pm default", "pm multiprocessing", "naive joblib", "fork Pool"]
    times: dict[str, list[float]] = {}
    for repeat in range(repeats):
        for m in run_order(methods, repeat):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", script, m], check=True, env=env)
            times.setdefault(m, []).append(time.perf_counter() - t0)
            print(f"  W7   {m:30} {times[m][-1]:8.3f}s", flush=True)
    return {
        "title": f"fresh process: import numpy{' + scikit-learn' if sklearn else ' (scikit-learn not installed)'}, map 200 cheap items"
        " (package byte-compiled, as pip installs it)",
        "median_s": {m: statistics.median(v) for m, v in times.items()},
    }


class Transient:
    """``work(i)``: ~``seconds`` of CPU; on item ``crash_at`` the first run ends its worker (``os._exit``) half-way."""

    def __init__(self, seconds: float, crash_at: int, folder: str, crash: bool) -> None:
        self.seconds = seconds
        self.crash_at = crash_at
        self.folder = folder
        self.crash = crash

    def _burn(self, seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass

    @parallelizable
    def work(self, i: int) -> int:
        marker = os.path.join(self.folder, "crashed")
        if self.crash and i == self.crash_at and not os.path.exists(marker):
            with open(marker, "w"):
                pass
            self._burn(self.seconds / 2)
            os._exit(1)
        self._burn(self.seconds)
        with open(os.path.join(self.folder, f"end-{i}-{os.getpid()}-{time.perf_counter_ns()}"), "w"):
            pass
        return i


def run_w8(mode: str) -> dict[str, Any]:
    """W8: 200 items of ~10 ms, one worker dies once (retries=1): total vs a clean run; items that ended twice."""
    import tempfile

    n_items = {"smoke": 40, "quick": 200, "full": 200}[mode]
    repeats = {"smoke": 1, "quick": 2, "full": 3}[mode]
    items = list(range(n_items))
    times: dict[str, list[float]] = {}
    twice: dict[str, int] = {}
    for _ in range(repeats):
        for backend in ("loky", "multiprocessing"):
            for crash in (False, True):
                name = f"pm {backend} {'one crash' if crash else 'clean'}"
                with tempfile.TemporaryDirectory() as folder:
                    obj = Transient(0.01, n_items // 2, folder, crash)
                    t0 = time.perf_counter()
                    got = obj.work.map(items, backend=backend, n_jobs=WORKERS, retries=1)
                    times.setdefault(name, []).append(time.perf_counter() - t0)
                    if got != items:
                        raise AssertionError(f"W8/{name}: results differ from the plain loop")
                    ends: dict[int, int] = {}
                    for f in os.listdir(folder):
                        if f.startswith("end-"):
                            ends[int(f.split("-")[1])] = ends.get(int(f.split("-")[1]), 0) + 1
                    twice[name] = max(twice.get(name, 0), sum(1 for c in ends.values() if c > 1))
                print(f"  W8   {name:30} {times[name][-1]:8.3f}s  (items that ended twice: {twice[name]})", flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    lines = [f"  {'backend':16} {'clean s':>8} {'one crash s':>12} {'crash/clean':>12} {'items ended twice':>18}"]
    for backend in ("loky", "multiprocessing"):
        clean, crash = med[f"pm {backend} clean"], med[f"pm {backend} one crash"]
        lines.append(
            f"  {backend:16} {clean:8.3f} {crash:12.3f} {crash / clean:12.2f} {twice[f'pm {backend} one crash']:18}"
        )
    return {
        "title": f"{n_items} items of ~10 ms, one worker dies once (retries=1), target crash/clean <= 1.5",
        "median_s": med,
        "ended_twice": twice,
        "lines": lines,
    }


def run_w5f(mode: str) -> dict[str, Any]:
    """W5f: the W3b object: a first (cold) call, a warm call, a failing call, then the call after the failure."""
    s = _sizes(mode)
    obj = DictHolder(s["w3b"])
    items = list(range(s["w5_items"]))
    expected = m_loop(obj, items)
    failing = [*items[: len(items) // 2], None, *items[len(items) // 2 :]]  # None: a TypeError in lookup
    run = _pm("loky")
    _kill_idle_workers()
    t: dict[str, float] = {}
    for step in ("first call", "warm call", "failing call", "call after the failure", "one more"):
        t0 = time.perf_counter()
        if step == "failing call":
            try:
                run(obj, failing)
            except TypeError:
                pass
            else:
                raise AssertionError("W5f: the failing call did not raise")
        elif run(obj, items) != expected:
            raise AssertionError(f"W5f/{step}: results differ from the plain loop")
        t[step] = time.perf_counter() - t0
        print(f"  W5f  {step:30} {t[step]:8.3f}s", flush=True)
    ratio = t["call after the failure"] / t["first call"]
    return {
        "title": "pm loky, the W3b object: call after a failing call vs the first call (target <= 0.25)",
        "median_s": t,
        "after_failure_over_first": ratio,
        "lines": [f"  {k:32} {v:10.3f}" for k, v in t.items()]
        + [f"  call after the failure / first call: {ratio:.2f}"],
    }


def run_result_rows(mode: str, only: list[str]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    special = {"W7": run_w7, "W8": run_w8, "W5f": run_w5f}
    for name in only:
        print(f"{name}:", flush=True)
        rows[name] = special[name](mode) if name in special else run_results_row(name, mode)
    return rows


def result_rows_report(rows: dict[str, Any]) -> str:
    lines = []
    for name, row in rows.items():
        if "lines" in row:
            lines.append(f"\n{name}: {row['title']}")
            lines.extend(row["lines"])
            continue
        med = row["median_s"]
        anchor = "naive joblib" if name == "W7" else "joblib delayed(obj.method)"
        lines.append(
            f"\n{name}: {row['title']}" + (f"   (results: {row['results_mb']:.0f} MB)" if row.get("results_mb") else "")
        )
        peak = row.get("peak_pss_x_results") or {}
        lines.append(
            f"  {'method':32} {'median s':>10} {'x naive':>8}" + (f" {'peak PSS / results':>19}" if peak else "")
        )
        for m, v in sorted(med.items(), key=lambda kv: kv[1]):
            lines.append(f"  {m:32} {v:10.3f} {v / med[anchor]:8.2f}" + (f" {peak[m]:19.2f}" if m in peak else ""))
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
