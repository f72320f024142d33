"""The measurement behind the README's opening claim, at full size:

a 200-item map over an object holding a ~50 MB (pickled) dict, with
parallelmethods on each route against ``joblib.Parallel()(delayed(obj.method)(i) ...)``.

    python benchmarks/issue2_200_items.py            # naive joblib takes minutes
    python benchmarks/issue2_200_items.py --skip-naive
"""

from __future__ import annotations

import os
import pickle
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from joblib import Parallel, delayed
from run import DictHolder, _warm


def main() -> None:
    obj = DictHolder(1_000_000)
    print(f"self pickles to {len(pickle.dumps(obj, protocol=5)) / 1e6:.1f} MB")
    items = list(range(200))
    expected = [obj.plain(i) for i in items]
    _warm()
    rows = []
    for backend in ("loky", "multiprocessing", "threading"):
        obj.epoch = backend  # a new state: a first call, not a warm one
        t0 = time.perf_counter()
        assert obj.lookup.map(items, backend=backend, n_jobs=2) == expected
        rows.append((f"parallelmethods backend={backend!r}", time.perf_counter() - t0))
        if backend == "loky":  # the same, unchanged object again: warm workers
            t0 = time.perf_counter()
            assert obj.lookup.map(items, backend=backend, n_jobs=2) == expected
            rows.append(("parallelmethods loky, same object again", time.perf_counter() - t0))
    if "--skip-naive" not in sys.argv:
        t0 = time.perf_counter()
        assert Parallel(n_jobs=2)(delayed(obj.plain)(i) for i in items) == expected
        rows.append(("joblib.Parallel()(delayed(obj.method)(i) ...)", time.perf_counter() - t0))
    naive = rows[-1][1] if "--skip-naive" not in sys.argv else None
    for name, seconds in rows:
        ratio = f"  ({naive / seconds:,.0f}x faster than naive joblib)" if naive and seconds != naive else ""
        print(f"{name:50} {seconds:9.3f} s{ratio}")


if __name__ == "__main__":
    main()
