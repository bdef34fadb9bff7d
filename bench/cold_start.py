"""Cold-start import time of ``app.py`` and what dominates it.

Each run starts a fresh interpreter (the venv's Python, so its site-packages are on the path) in
the project directory with the dev stage's environment variables, as Lambda sets them before it
imports the handler module. Runs of ``python -c "import app"`` alternate with runs of the bare
``python -c pass``, so both see the same machine load. The figure is the median of the first
minus the median of the second, in wall-clock time and in CPU time (user + system of the child
process). Lambda runs this import in the init phase of every cold start, before the first
request.

Then ``python -X importtime -c "import app"`` (``--profile-runs`` runs, medians) attributes the
import's own time (the "self" column) to top-level packages, and lists the slowest modules that
``app`` imports itself. ``-X importtime`` adds its own overhead, so its total is larger than the
wall-clock figure.

Run: ``python bench/cold_start.py [--runs 15]``; the target is under 500 ms above the bare
interpreter.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from _harness import PROJECT_DIR, machine_line

TARGET_MS = 500.0


def _stage_environment() -> dict[str, str]:
    config = json.loads((PROJECT_DIR / ".chalice" / "config.json").read_text())
    environment = {**os.environ, **config.get("environment_variables", {})}
    environment.update(config["stages"]["dev"].get("environment_variables", {}))
    environment.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    # No byte-code cache writes, so every run reads the same cached .pyc files.
    environment["PYTHONDONTWRITEBYTECODE"] = "1"
    return environment


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _time_once(code: str, environment: dict[str, str]) -> tuple[float, float]:
    """Returns the wall-clock and CPU (user + system) milliseconds of one fresh interpreter."""
    cpu_before = _children_cpu_seconds()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=PROJECT_DIR, env=environment, check=True)
    wall_ms = (time.perf_counter() - started) * 1000
    return wall_ms, (_children_cpu_seconds() - cpu_before) * 1000


def measure(
    runs: int, environment: dict[str, str]
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """Returns (wall, CPU) milliseconds of ``runs`` bare starts and ``runs`` app imports."""
    # One untimed import fills the OS file cache and writes any missing .pyc files.
    subprocess.run(
        [sys.executable, "-c", "import app"],
        cwd=PROJECT_DIR,
        env={**environment, "PYTHONDONTWRITEBYTECODE": ""},
        check=True,
    )
    bare, imported = [], []
    for _ in range(runs):
        bare.append(_time_once("pass", environment))
        imported.append(_time_once("import app", environment))
    return bare, imported


def import_profile(environment: dict[str, str]) -> list[tuple[str, int, int, int]]:
    """Returns (module, self us, cumulative us, depth) rows of ``-X importtime``."""
    finished = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "import app"],
        cwd=PROJECT_DIR,
        env=environment,
        check=True,
        capture_output=True,
        text=True,
    )
    rows = []
    for line in finished.stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cumulative_us, name = line[len("import time:") :].split("|")
        depth = (len(name) - len(name.lstrip(" "))) // 2
        rows.append((name.strip(), int(self_us), int(cumulative_us), depth))
    return rows


def _first_of_app(rows: list[tuple[str, int, int, int]], app_index: int) -> int:
    """Returns the index of the first module that ``import app`` imported.

    ``-X importtime`` lists a module after the modules it imported, so app's own imports are
    the rows above its row back to the last top-level row (site and the editable-install finder
    that start-up imports).
    """
    first = app_index
    while first > 0 and rows[first - 1][3] > 0:
        first -= 1
    return first


def _self_ms_by_package(rows: list[tuple[str, int, int, int]]) -> dict[str, float]:
    """Adds up the self time of app's imports by top-level package, in milliseconds."""
    app_index = next(i for i, row in enumerate(rows) if row[0] == "app")
    totals: collections.Counter[str] = collections.Counter()
    for name, self_us, _, _ in rows[_first_of_app(rows, app_index) : app_index + 1]:
        totals[name.split(".")[0]] += self_us / 1000
    return totals


def _median_of(values: list[float], runs: int) -> float:
    # A module that one run did not import (a lazy import) counts as 0 ms in that run.
    return statistics.median(values + [0.0] * (runs - len(values)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs of each command")
    parser.add_argument("--top", type=int, default=12, help="rows of each profile table")
    parser.add_argument("--profile-runs", type=int, default=5, help="-X importtime runs")
    args = parser.parse_args()

    environment = _stage_environment()
    print(machine_line())
    bare, imported = measure(args.runs, environment)
    print(f"{args.runs} runs each, alternating; median (min, max) ms:")
    net = {}
    # CPU time counts only this process's work, so it varies less than wall-clock time on a
    # machine shared with other work.
    for column, label in ((0, "wall-clock"), (1, "CPU (user + system)")):
        bare_values = [run[column] for run in bare]
        imported_values = [run[column] for run in imported]
        bare_ms, imported_ms = statistics.median(bare_values), statistics.median(imported_values)
        net[label] = imported_ms - bare_ms
        print(f"  {label}:")
        print(
            f"    python -c pass:         {bare_ms:7.1f} "
            f"({min(bare_values):.1f}, {max(bare_values):.1f})"
        )
        print(
            f"    python -c 'import app': {imported_ms:7.1f} "
            f"({min(imported_values):.1f}, {max(imported_values):.1f})"
        )
        print(f"    import app above the bare interpreter: {net[label]:.1f}")
    print(f"  target: under {TARGET_MS:.0f} ms above the bare interpreter")
    net_ms = net["CPU (user + system)"]

    by_package: dict[str, list[float]] = collections.defaultdict(list)
    direct: dict[str, list[float]] = collections.defaultdict(list)
    app_cumulative = []
    for _ in range(args.profile_runs):
        rows = import_profile(environment)
        for name, self_ms in _self_ms_by_package(rows).items():
            by_package[name].append(self_ms)
        app_index = next(i for i, row in enumerate(rows) if row[0] == "app")
        app_cumulative.append(rows[app_index][2] / 1000)
        for name, _, cumulative_us, depth in rows[_first_of_app(rows, app_index) : app_index]:
            if depth == 1:
                direct[name].append(cumulative_us / 1000)
    medians = {name: _median_of(values, args.profile_runs) for name, values in by_package.items()}
    total_ms = sum(medians.values())
    print(
        f"\n-X importtime, median of {args.profile_runs} runs: app cumulative "
        f"{statistics.median(app_cumulative):.1f} ms; self time by package:"
    )
    for package, self_ms in sorted(medians.items(), key=lambda item: -item[1])[: args.top]:
        print(f"  {package:<28} {self_ms:7.1f} ms  {100 * self_ms / total_ms:5.1f}%")
    print("\nslowest modules imported by app.py itself (cumulative ms, median):")
    direct_medians = {
        name: _median_of(values, args.profile_runs) for name, values in direct.items()
    }
    for name, cumulative_ms in sorted(direct_medians.items(), key=lambda item: -item[1])[
        : args.top
    ]:
        print(f"  {name:<40} {cumulative_ms:7.1f}")
    return 0 if net_ms < TARGET_MS else 1


if __name__ == "__main__":
    sys.exit(main())
