"""What every benchmark shares: timing, the machine description, JSON results and the README table."""

from __future__ import annotations

import json
import os
import platform
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def time_call(fn: Callable[[], object], repeats: int, warmup: int = 2) -> dict[str, float]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeats`` times; median / p90 / min in ms."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    t = np.asarray(times)
    return {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)), "min_ms": float(t.min()), "repeats": repeats}


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    import numba

    return {
        "cpu_count": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
    }


def write_results(name: str, results: dict[str, object]) -> Path:
    """Write ``benchmarks/results/<name>.json`` with the machine description."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%d"), "machine": machine(), **results}
    path.write_text(json.dumps(payload, indent=1) + "\n")
    return path


def update_readme_table(name: str, table: str) -> None:
    """Replace the block between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in README.md."""
    readme = ROOT / "README.md"
    text = readme.read_text()
    pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no <!-- bench:{name} --> block to update")
    readme.write_text(pattern.sub(lambda m: m.group(1) + table.rstrip() + "\n" + m.group(2), text))


def markdown_table(rows: list[dict[str, object]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


SERVE_CODE = ("import sys; from breathcast.stream.config import load_config; from breathcast.stream.daemon import serve; "
              "serve(load_config(sys.argv[1]))")
"""``python -c SERVE_CODE CONFIG.toml`` runs a daemon in its own process, as ``breathcast serve --config`` does."""


def wait_until_running(ctl, processes: list, timeout_s: float = 300.0, poll_s: float = 0.5) -> bool:
    """Poll a daemon's status (``ctl``, a ControlClient) until it is running: True; False when one of
    ``processes`` (subprocess.Popen) exits first or ``timeout_s`` passes."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end and all(p.poll() is None for p in processes):
        try:
            if ctl.status()["state"] == "running":
                return True
        except Exception:  # noqa: BLE001 - not listening yet, or still loading
            pass
        time.sleep(poll_s)
    return False

