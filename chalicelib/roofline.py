"""Roofline model of one vLLM replica: does the model fit, and how many tokens per second.

A replica is ``pp_size`` instances; each runs one pipeline stage on ``tp_size`` GPUs with tensor
parallelism. Weights and the KV cache are BF16. docs/placement.md derives the formulas, lists
every coefficient with its source and compares the estimates with published vLLM measurements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from chalicelib.catalog import GIB, InstanceType, ModelArchitecture

BYTES_PER_PARAMETER = 2  # BF16 weights
KV_BYTES_PER_VALUE = 2  # BF16 KV cache (vLLM's kv_cache_dtype "auto" for a BF16 model)

# vLLM defaults (engine arguments): the share of GPU memory vLLM may use, the most sequences in
# one scheduler step, and the most tokens in one step (chunked prefill). NOTE: the defaults of
# max_num_seqs and max_num_batched_tokens differ between vLLM versions and GPUs; these are the
# values of the V0 engine arguments.
GPU_MEMORY_UTILIZATION = 0.9
MAX_NUM_SEQS = 256
MAX_NUM_BATCHED_TOKENS = 8192

# Estimates, not measurements: memory vLLM uses besides weights, activations and KV cache
# (CUDA context, cuBLAS workspace, CUDA graphs), plus NCCL buffers when GPUs communicate.
RUNTIME_OVERHEAD_GIB = 1.0
COMMUNICATION_BUFFERS_GIB = 0.5
# Logits are kept in FP32 for sampling, one row per scheduled sequence.
LOGIT_BYTES = 4

# Achievable fractions of the data-sheet peaks (estimates, see docs/placement.md): streaming
# reads reach about 3/4 of peak DRAM bandwidth and batched GEMMs about half of dense peak.
MEMORY_BANDWIDTH_EFFICIENCY = 0.75
COMPUTE_EFFICIENCY = 0.5
# Scheduling, sampling and kernel launches per engine step (estimate).
STEP_OVERHEAD_SECONDS = 1.5e-3
# One all-reduce's fixed cost on each link kind, and the share of nominal link bandwidth a
# ring all-reduce reaches (estimates).
ALLREDUCE_LATENCY_SECONDS = {"NVLink": 10e-6, "PCIe": 25e-6}
LINK_EFFICIENCY = 0.7
# Sending activations between pipeline stages on different instances (estimates).
STAGE_SEND_LATENCY_SECONDS = 50e-6
NETWORK_EFFICIENCY = 0.7

# Start-up before the first token: instance launch, image and engine start, then the weights
# read at WEIGHT_LOAD_BYTES_PER_SECOND per instance (estimates).
LAUNCH_SECONDS = 600.0
WEIGHT_LOAD_BYTES_PER_SECOND = 1e9


@dataclass(frozen=True, slots=True)
class Workload:
    num_requests: int
    avg_input_tokens: float
    max_input_tokens: int
    avg_output_tokens: float
    max_output_tokens: int

    @property
    def total_tokens(self) -> float:
        return self.num_requests * (self.avg_input_tokens + self.avg_output_tokens)

    @property
    def mean_context_tokens(self) -> float:
        """Mean KV cache length of a running sequence: its prompt and half its output."""
        return self.avg_input_tokens + self.avg_output_tokens / 2


@dataclass(frozen=True, slots=True)
class Rejection:
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class MemoryFit:
    usable_gib: float
    weights_gib: float
    activation_gib: float
    runtime_gib: float
    kv_cache_gib: float
    kv_bytes_per_token: int
    # Tokens of KV cache per GPU (each GPU of a replica stores its share of every token).
    kv_capacity_tokens: int


@dataclass(frozen=True, slots=True)
class StepEstimate:
    # Input plus output tokens per second of one replica, and output tokens alone.
    tokens_per_second: float
    output_tokens_per_second: float
    # Sequences decoding at once over all pipeline stages.
    batch: float
    step_seconds: float
    # "memory" or "compute": the roofline term that bounds one step.
    bound: str


def parallelism_problem(
    arch: ModelArchitecture, instance: InstanceType, tp: int, pp: int
) -> Rejection | None:
    """Returns why vLLM cannot shard the model this way, or None."""
    if tp > instance.gpu_count:
        return Rejection(
            "tp_exceeds_gpus",
            f"tp_size {tp} is more than the {instance.gpu_count} GPUs of {instance.instance_type}",
        )
    if pp > 1 and tp != instance.gpu_count:
        return Rejection(
            "pp_needs_full_node",
            f"pipeline stages span instances, so each stage uses all {instance.gpu_count} GPUs "
            f"of {instance.instance_type}; tp_size {tp} leaves GPUs idle",
        )
    if arch.num_attention_heads % tp:
        return Rejection(
            "tp_heads",
            f"tp_size {tp} does not divide the {arch.num_attention_heads} attention heads",
        )
    kv_heads = arch.num_key_value_heads
    if kv_heads % tp and tp % kv_heads:
        return Rejection(
            "tp_kv_heads",
            f"tp_size {tp} neither divides nor is a multiple of the {kv_heads} KV heads",
        )
    if pp > arch.num_hidden_layers:
        return Rejection(
            "pp_layers", f"pp_size {pp} is more than the {arch.num_hidden_layers} layers"
        )
    return None


def _stage_layers(arch: ModelArchitecture, pp: int) -> int:
    return math.ceil(arch.num_hidden_layers / pp)


def kv_bytes_per_token_per_gpu(arch: ModelArchitecture, tp: int, pp: int) -> int:
    """KV cache of one token on one GPU: the stage's layers and the GPU's KV heads.

    With more GPUs than KV heads, vLLM replicates heads, so each GPU stores at least one.
    """
    heads_per_gpu = math.ceil(arch.num_key_value_heads / tp)
    return 2 * _stage_layers(arch, pp) * heads_per_gpu * arch.head_dim * KV_BYTES_PER_VALUE


def memory_fit(
    arch: ModelArchitecture, instance: InstanceType, tp: int, pp: int, max_model_len: int
) -> MemoryFit | Rejection:
    """Sizes one GPU's memory and checks that the KV cache fits one max_model_len sequence.

    vLLM makes the same check before it starts.
    """
    gpu = instance.gpu
    usable = gpu.memory_gib * GIB * GPU_MEMORY_UTILIZATION
    # The largest stage has ceil(layers / pp) layers; embeddings are spread with the layers.
    stage_share = _stage_layers(arch, pp) / arch.num_hidden_layers
    weights = arch.num_parameters * BYTES_PER_PARAMETER * stage_share / tp
    # vLLM profiles one step of MAX_NUM_BATCHED_TOKENS tokens: hidden states and the MLP's
    # gate and up projections, plus the FP32 logits of MAX_NUM_SEQS sequences.
    mlp_width = arch.intermediate_size * (arch.num_experts_per_tok or 1)
    activations = (
        MAX_NUM_BATCHED_TOKENS * (8 * arch.hidden_size + 4 * mlp_width / tp)
        + MAX_NUM_SEQS * arch.vocab_size / tp * LOGIT_BYTES
    )
    runtime = RUNTIME_OVERHEAD_GIB * GIB
    if tp * pp > 1:
        runtime += COMMUNICATION_BUFFERS_GIB * GIB
    kv_cache = usable - weights - activations - runtime
    per_token = kv_bytes_per_token_per_gpu(arch, tp, pp)
    fit = MemoryFit(
        usable_gib=usable / GIB,
        weights_gib=weights / GIB,
        activation_gib=activations / GIB,
        runtime_gib=runtime / GIB,
        kv_cache_gib=max(kv_cache, 0.0) / GIB,
        kv_bytes_per_token=per_token,
        kv_capacity_tokens=max(int(kv_cache // per_token), 0),
    )
    if kv_cache <= 0:
        return Rejection(
            "memory_weights",
            f"weights need {fit.weights_gib:.1f} GiB per GPU and activations and runtime "
            f"{fit.activation_gib + fit.runtime_gib:.1f} GiB, more than the {fit.usable_gib:.1f} "
            f"GiB vLLM may use of a {gpu.memory_gib:g} GiB {gpu.name} at "
            f"gpu_memory_utilization {GPU_MEMORY_UTILIZATION}",
        )
    if fit.kv_capacity_tokens < max_model_len:
        return Rejection(
            "memory_kv_cache",
            f"after {fit.weights_gib:.1f} GiB of weights per GPU, the KV cache holds "
            f"{fit.kv_capacity_tokens} tokens, fewer than one {max_model_len}-token sequence "
            "(max_model_len)",
        )
    return fit


def step_seconds(
    arch: ModelArchitecture,
    instance: InstanceType,
    tp: int,
    pp: int,
    decode: float,
    prefill: float,
    context: float,
    prompt: float,
) -> tuple[float, str]:
    """Returns the time of one pipeline-stage step and its bound ("memory" or "compute").

    The step decodes one token for each of ``decode`` sequences with ``context`` tokens of KV
    cache, and prefills ``prefill`` tokens of prompts ``prompt`` tokens long. The memory term
    reads the stage's weights and the batch's KV cache. The compute term runs 2 x active
    parameters per token plus attention. A step takes the larger of the two, plus the
    tensor-parallel all-reduces, the send to the next stage and a fixed overhead.
    """
    gpu = instance.gpu
    tokens = decode + prefill
    gpus_per_replica = tp * pp
    experts = arch.expert_parameters()
    shared = arch.num_parameters - experts
    if experts:
        # Each token routes to k of E experts, so a step of n tokens touches 1 - (1 - k/E)^n of
        # the expert weights on average.
        routed = (arch.num_experts_per_tok or 0) / (arch.num_experts or 1)
        touched = 1 - (1 - routed) ** tokens
    else:
        touched = 0.0
    weight_bytes = (shared + experts * touched) * BYTES_PER_PARAMETER / gpus_per_replica
    per_token_kv = kv_bytes_per_token_per_gpu(arch, tp, pp)
    kv_bytes = (decode * context + prefill * prompt / 2) * per_token_kv
    memory = (weight_bytes + kv_bytes) / (
        gpu.memory_bandwidth_gb_per_s * 1e9 * MEMORY_BANDWIDTH_EFFICIENCY
    )

    attention_width = arch.num_hidden_layers * arch.num_attention_heads * arch.head_dim
    # A decode token attends over its whole context, with 4 FLOPs per position and dimension
    # (QK^T and PV). A prompt token attends over half the prompt on average (causal mask).
    attention_flops = (decode * 4 * context + prefill * 2 * prompt) * attention_width
    flops = (tokens * 2 * arch.active_parameters + attention_flops) / gpus_per_replica
    compute = flops / (gpu.bf16_dense_tflops * 1e12 * COMPUTE_EFFICIENCY)

    communication = 0.0
    if tp > 1:
        # Two all-reduces per layer (attention and MLP outputs) of tokens x hidden BF16 values;
        # a ring all-reduce moves 2 (tp - 1) / tp of the buffer over each link.
        buffer = tokens * arch.hidden_size * 2
        link = gpu.interconnect_gb_per_s * 1e9 * LINK_EFFICIENCY
        per_allreduce = ALLREDUCE_LATENCY_SECONDS[gpu.interconnect] + (
            2 * (tp - 1) / tp * buffer / link
        )
        communication += 2 * _stage_layers(arch, pp) * per_allreduce
    if pp > 1:
        network = instance.network_gbps / 8 * 1e9 * NETWORK_EFFICIENCY
        communication += STAGE_SEND_LATENCY_SECONDS + tokens * arch.hidden_size * 2 / network

    seconds = max(memory, compute) + communication + STEP_OVERHEAD_SECONDS
    return seconds, ("memory" if memory >= compute else "compute")


def replica_throughput(
    arch: ModelArchitecture,
    instance: InstanceType,
    tp: int,
    pp: int,
    workload: Workload,
    kv_capacity_tokens: int,
    request_cap: int,
) -> StepEstimate:
    """Estimates one replica's steady-state throughput under continuous batching.

    Each step decodes one token for each running sequence of a pipeline microbatch and
    prefills prompt tokens in the workload's input-to-output ratio (chunked prefill), up to
    MAX_NUM_BATCHED_TOKENS. The batch is the smallest of pp x MAX_NUM_SEQS, what the KV cache
    holds at the mean context and ``request_cap`` (the requests the replica has). With pp
    stages, pp microbatches are in flight and one leaves the pipeline per step.
    """
    context = workload.mean_context_tokens
    sequences = min(pp * MAX_NUM_SEQS, kv_capacity_tokens / max(context, 1.0), request_cap)
    batch = max(sequences / pp, 1.0)
    prompt_ratio = workload.avg_input_tokens / max(workload.avg_output_tokens, 1.0)
    decode = min(batch, MAX_NUM_BATCHED_TOKENS / (1 + prompt_ratio))
    prefill = decode * prompt_ratio
    seconds, bound = step_seconds(
        arch, instance, tp, pp, decode, prefill, context, workload.avg_input_tokens
    )
    return StepEstimate(
        tokens_per_second=(decode + prefill) / seconds,
        output_tokens_per_second=decode / seconds,
        batch=decode * pp,
        step_seconds=seconds,
        bound=bound,
    )


def drain_seconds(
    arch: ModelArchitecture, instance: InstanceType, tp: int, pp: int, workload: Workload
) -> float:
    """Estimates the tail of a job: the last, longest request decoding almost alone.

    Steady-state throughput assumes full batches. At the end of a job the batch empties while
    the longest requests finish, at one step through every stage per token.
    """
    context = workload.avg_input_tokens + workload.max_output_tokens / 2
    seconds, _ = step_seconds(arch, instance, tp, pp, 1.0, 0.0, context, 0.0)
    return workload.max_output_tokens * seconds * pp


def startup_seconds(arch: ModelArchitecture, tp: int, pp: int) -> float:
    """Launch time plus reading one stage's weights onto an instance."""
    stage_bytes = arch.num_parameters * BYTES_PER_PARAMETER * _stage_layers(arch, pp)
    stage_bytes /= arch.num_hidden_layers
    return LAUNCH_SECONDS + stage_bytes / WEIGHT_LOAD_BYTES_PER_SECOND
