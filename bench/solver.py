"""Times the placement solver over the whole catalog, 8 regions and both markets.

Run: python bench/solver.py [--runs N]. Each model is solved ``--runs`` times after one warm-up
and the median is printed; the target is under 100 ms per solve.

The quota and price sources are static, so the time is the solver's alone. Every instance type
gets a synthetic spot price (half its on-demand price) so that spot candidates are priced and
ranked too. These numbers only exercise the code and are not prices.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _harness import machine_line

from chalicelib import catalog, placement, prices, quotas
from chalicelib.roofline import Workload

MODELS = ("meta-llama/Llama-3.1-70B-Instruct", "meta-llama/Llama-3.1-8B-Instruct")
# 100,000 requests of 800 prompt and 300 output tokens, 8 hours.
WORKLOAD = Workload(
    num_requests=100_000,
    avg_input_tokens=800,
    max_input_tokens=4000,
    avg_output_tokens=300,
    max_output_tokens=1024,
)
DEADLINE_HOURS = 8.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21, help="timed solves per model")
    args = parser.parse_args()

    regions = quotas.DEFAULT_REGIONS
    synthetic_spot = {
        "*": {
            i.instance_type: i.on_demand_usd_per_hour / 2
            for i in catalog.instance_types()
            if i.on_demand_usd_per_hour
        }
    }
    price_source = prices.StaticPriceSource(spot=synthetic_spot)
    quota_source = quotas.StaticQuotaSource(
        {"*": {"G": {"on_demand": 4096, "spot": 4096}, "P": {"on_demand": 4096, "spot": 4096}}}
    )
    options = placement.Options(regions=regions)

    print(machine_line())
    print(
        f"catalog: {len(catalog.instance_types())} instance types, {len(regions)} regions, "
        f"markets {', '.join(placement.MARKETS)}; workload {WORKLOAD.num_requests} requests, "
        f"deadline {DEADLINE_HOURS} h; {args.runs} runs after one warm-up"
    )
    for name in MODELS:
        arch = catalog.find_model(name)
        solution = placement.solve(
            arch, WORKLOAD, DEADLINE_HOURS, options, quota_source, price_source
        )
        timings, cpu_timings = [], []
        for _ in range(args.runs):
            started, cpu_started = time.perf_counter(), time.process_time()
            solution = placement.solve(
                arch, WORKLOAD, DEADLINE_HOURS, options, quota_source, price_source
            )
            timings.append((time.perf_counter() - started) * 1000)
            # CPU time varies less than wall-clock time when other work shares the machine.
            cpu_timings.append((time.process_time() - cpu_started) * 1000)
        top = solution.placements[0]
        print(
            f"{name}: median {statistics.median(timings):.1f} ms (min {min(timings):.1f}, "
            f"max {max(timings):.1f}), CPU median {statistics.median(cpu_timings):.1f} ms; "
            f"{solution.fitting_configs} configurations fit, "
            f"{len(solution.placements)} placements ranked, {len(solution.dropped)} dropped; "
            f"top: {top['replicas']} x {top['instance_type']} tp{top['tp_size']} "
            f"pp{top['pp_size']} {top['market']} {top['region']}"
        )


if __name__ == "__main__":
    main()
