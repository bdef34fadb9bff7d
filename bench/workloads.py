"""Generate synthetic OpenAI batch JSONL inputs for benchmarks and tests.

Prompts are built from a fixed list of openers, subjects and follow-up questions about LLM
inference, so a given seed always produces the same file. Lines average about 400 bytes, so
1,000,000 requests make a file of about 400 MB.

Usage: python -m bench.workloads OUTPUT_PATH NUM_REQUESTS [--seed N] [--url URL]
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

CHAT_URL = "/v1/chat/completions"
COMPLETIONS_URL = "/v1/completions"

_OPENERS = (
    "Explain",
    "Compare",
    "Describe",
    "Analyze",
    "Summarize",
    "Write a short guide to",
    "Give a worked example of",
    "List the trade-offs of",
    "Critically evaluate",
    "Design a benchmark for",
)
_SUBJECTS = (
    "tensor parallelism",
    "pipeline parallelism",
    "continuous batching in vLLM",
    "PagedAttention and KV cache paging",
    "FP8 and INT4 weight quantization",
    "speculative decoding",
    "prefix caching for shared system prompts",
    "mixture-of-experts routing",
    "FlashAttention-2",
    "NVLink versus PCIe bandwidth",
    "spot instance interruptions during batch inference",
    "the prefill and decode phases",
    "LoRA and QLoRA fine-tuning",
    "the roofline model for GPU kernels",
    "autoscaling an inference fleet",
    "KV cache eviction policies",
)
_SETTINGS = (
    "for a 70B parameter model on 8 H100 GPUs",
    "for Qwen3-32B served on 4 L40S GPUs",
    "when requests have very different prompt lengths",
    "in an offline batch job with a fixed deadline",
    "on a single A10G with 24 GB of memory",
    "for a workload of one million short prompts",
    "when the cluster mixes A100 and H100 nodes",
    "under a strict cost budget per million tokens",
)
_FOLLOW_UPS = (
    "Include the memory requirements and the main bottleneck.",
    "Quantify the effect on throughput and time to first token.",
    "Point out common mistakes and how to detect them.",
    "Give concrete numbers where you can and state your assumptions.",
    "Discuss how the choice changes with batch size and sequence length.",
    "Explain which metrics you would monitor and why.",
    "Keep the answer under five hundred words.",
    "Finish with a short recommendation for a production deployment.",
    "Compare the cost per million output tokens of each option.",
    "Describe how failures are detected and retried.",
)


def _prompt_text(rng: random.Random) -> str:
    """Build one prompt of about 100 to 400 characters (about 230 on average)."""
    sentences = [f"{rng.choice(_OPENERS)} {rng.choice(_SUBJECTS)} {rng.choice(_SETTINGS)}."]
    for _ in range(rng.randint(1, 4)):
        sentences.append(rng.choice(_FOLLOW_UPS))
    return " ".join(sentences)


def _request_line(index: int, url: str, prompt: str, max_tokens: int) -> str:
    body: dict[str, object]
    if url == CHAT_URL:
        body = {
            "model": "placeholder",
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
        }
    elif url == COMPLETIONS_URL:
        body = {"model": "placeholder", "prompt": prompt, "max_tokens": max_tokens}
    else:
        raise ValueError(f"url must be {CHAT_URL} or {COMPLETIONS_URL}, got {url!r}")
    request = {"custom_id": f"req-{index:07d}", "method": "POST", "url": url, "body": body}
    return json.dumps(request, separators=(", ", ": ")) + "\n"


def write_batch_file(
    path: str | Path,
    num_requests: int,
    *,
    seed: int = 0,
    url: str = CHAT_URL,
    max_tokens: int = 128,
) -> int:
    """Write ``num_requests`` valid batch requests to ``path`` and return the bytes written.

    The output depends only on the arguments. Lines are written in groups as they are
    generated, so memory does not grow with ``num_requests``.
    """
    if url not in (CHAT_URL, COMPLETIONS_URL):
        raise ValueError(f"url must be {CHAT_URL} or {COMPLETIONS_URL}, got {url!r}")
    rng = random.Random(seed)
    written = 0
    group: list[str] = []
    with open(path, "w", encoding="utf-8", newline="\n") as output:
        for index in range(num_requests):
            group.append(_request_line(index, url, _prompt_text(rng), max_tokens))
            if len(group) == 10_000:
                text = "".join(group)
                output.write(text)
                written += len(text.encode("utf-8"))
                group.clear()
        text = "".join(group)
        output.write(text)
        written += len(text.encode("utf-8"))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description="Write a synthetic batch JSONL input file.")
    parser.add_argument("path", help="output file path")
    parser.add_argument("num_requests", type=int, help="number of request lines to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--url", default=CHAT_URL, help=f"request url (default {CHAT_URL})")
    parser.add_argument(
        "--max-tokens", type=int, default=128, help="body.max_tokens of every request"
    )
    args = parser.parse_args()
    size = write_batch_file(
        args.path, args.num_requests, seed=args.seed, url=args.url, max_tokens=args.max_tokens
    )
    print(f"wrote {args.num_requests} requests, {size} bytes, to {args.path}")


if __name__ == "__main__":
    main()
