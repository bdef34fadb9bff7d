"""Compares the roofline estimates with published vLLM throughput measurements.

Run: python bench/roofline_check.py. It prints, for each measurement docs/placement.md cites,
the steady-state estimate and the estimate with the job's tail for a range of longest outputs
(the publications do not state the longest output), against the measured tokens per second.
Nothing is measured here; the numbers come from chalicelib/roofline.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from _harness import machine_line

from chalicelib import catalog, roofline
from chalicelib.catalog import ModelArchitecture
from chalicelib.roofline import Workload


@dataclass(frozen=True)
class Measurement:
    label: str
    source: str
    arch: ModelArchitecture
    instance_type: str
    tp: int
    requests: int
    avg_input: float
    avg_output: float
    # Input plus output tokens per second, as published (or derived from the published numbers).
    measured_tokens_per_second: float
    longest_outputs: tuple[int, ...]


QWEN15_7B = catalog.architecture_from_request(
    "Qwen/Qwen1.5-7B-Chat",
    {
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "num_parameters": 7.72e9,
        "intermediate_size": 11008,
    },
)

MEASUREMENTS = (
    Measurement(
        "Llama-3-8B, 2 x A10G tp 2 (g5.12xlarge)",
        "github.com/arc53/llm-price-compass/issues/6",
        catalog.find_model("meta-llama/Meta-Llama-3-8B-Instruct"),
        "g5.12xlarge",
        2,
        1000,
        215.196,
        43.14,
        (215196 + 43140) / 97.65,
        (500, 1000, 1800),
    ),
    Measurement(
        "Llama-3.3-70B, 4 x A100 80 GB tp 4",
        "github.com/vllm-project/vllm/issues/12315",
        catalog.find_model("meta-llama/Llama-3.3-70B-Instruct"),
        "p4de.24xlarge",
        4,
        200,
        (1414.42 - 714.48) / 3.28,
        714.48 / 3.28,
        1414.42,
        (500, 1000, 1800),
    ),
    Measurement(
        "Qwen1.5-7B, 1 x A100 80 GB, 1000 in / 1000 out",
        "github.com/QwenLM/Qwen3/issues/244",
        QWEN15_7B,
        "p4de.24xlarge",
        1,
        100,
        1000,
        1000,
        2 * 1000,
        (1000,),
    ),
)


def main() -> None:
    print(machine_line())
    instances = catalog.instance_by_name()
    for m in MEASUREMENTS:
        instance = instances[m.instance_type]
        context = int(m.avg_input + max(m.longest_outputs))
        fit = roofline.memory_fit(m.arch, instance, m.tp, 1, context)
        assert isinstance(fit, roofline.MemoryFit), fit
        workload = Workload(m.requests, m.avg_input, int(m.avg_input), m.avg_output, 1)
        steady = roofline.replica_throughput(
            m.arch, instance, m.tp, 1, workload, fit.kv_capacity_tokens, m.requests
        )
        error = 100 * (steady.tokens_per_second / m.measured_tokens_per_second - 1)
        print(
            f"{m.label} [{m.source}]: measured {m.measured_tokens_per_second:.0f} tokens/s; "
            f"steady-state estimate {steady.tokens_per_second:.0f} ({error:+.0f}%), "
            f"{steady.bound}-bound, batch {steady.batch:.0f}"
        )
        for longest in m.longest_outputs:
            tail_workload = Workload(
                m.requests, m.avg_input, int(m.avg_input), m.avg_output, longest
            )
            tail = roofline.drain_seconds(m.arch, instance, m.tp, 1, tail_workload)
            seconds = workload.total_tokens / steady.tokens_per_second + tail
            rate = workload.total_tokens / seconds
            error = 100 * (rate / m.measured_tokens_per_second - 1)
            print(f"  with the tail, longest output {longest}: {rate:.0f} tokens/s ({error:+.0f}%)")


if __name__ == "__main__":
    main()
