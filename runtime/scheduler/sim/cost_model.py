"""Time of prefill, decode steps and KV transfer on one replica, from first principles.

prefill(n tokens after c cached) = (2 P n + 4 L H n (c + n/2)) / (peak FLOP/s x MFU) + overhead
decode step(batch B, K KV tokens)  = max((P bytes + K kv_bytes) / (HBM B/s x eff),
                                         2 P B / (peak x MFU)) + overhead
transfer(n tokens)                 = n kv_bytes / link B/s + latency
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.scheduler.prefill_model import PrefillModel
from runtime.scheduler.step_model import DecodeStepModel


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_params: float
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    bytes_per_param: int = 2

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * self.bytes_per_param


@dataclass(frozen=True)
class HardwareSpec:
    """One replica's accelerators together (e.g. 8 GPUs with tensor parallelism)."""

    name: str
    peak_flops: float
    hbm_bytes_per_s: float
    hbm_bytes: float
    link_bytes_per_s: float  # KV transfer between replicas
    mfu: float = 0.5
    hbm_efficiency: float = 0.8
    step_overhead_s: float = 0.002
    link_latency_s: float = 0.0005


LLAMA3_70B = ModelSpec("llama-3-70b", 70.6e9, 80, 8192, 8, 128)
LLAMA3_8B = ModelSpec("llama-3-8b", 8.0e9, 32, 4096, 8, 128)
# H100 SXM: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, 80 GB; 400 Gb/s RDMA = 50 GB/s per GPU.
H100 = HardwareSpec("h100", 989e12, 3.35e12, 80e9, 50e9)
H100X8 = HardwareSpec("8xh100", 8 * 989e12, 8 * 3.35e12, 8 * 80e9, 8 * 50e9)


@dataclass(frozen=True)
class CostModel:
    model: ModelSpec
    hardware: HardwareSpec

    def prefill_s(self, num_tokens: int, num_cached: int = 0) -> float:
        m, h = self.model, self.hardware
        linear = 2.0 * m.num_params * num_tokens
        attention = 4.0 * m.num_layers * m.hidden_size * num_tokens * (num_cached
                                                                         + num_tokens / 2)
        return (linear + attention) / (h.peak_flops * h.mfu) + h.step_overhead_s

    def chunk_s(self, num_tokens: int, num_cached: int = 0) -> float:
        """A prefill chunk's share of an engine step (prefill_s without the step overhead)."""
        return self.prefill_s(num_tokens, num_cached) - self.hardware.step_overhead_s

    def prefill_model(self) -> PrefillModel:
        """prefill_s as the scheduler's quadratic model (ms): what it would calibrate to."""
        m, h = self.model, self.hardware
        flops_per_ms = h.peak_flops * h.mfu / 1e3
        return PrefillModel(1e3 * h.step_overhead_s, 2.0 * m.num_params / flops_per_ms,
                            2.0 * m.num_layers * m.hidden_size / flops_per_ms)

    def decode_step_s(self, batch: int, kv_tokens: float) -> float:
        m, h = self.model, self.hardware
        memory = (m.num_params * m.bytes_per_param + kv_tokens * m.kv_bytes_per_token) \
            / (h.hbm_bytes_per_s * h.hbm_efficiency)
        compute = 2.0 * m.num_params * batch / (h.peak_flops * h.mfu)
        return max(memory, compute) + h.step_overhead_s

    def decode_step_model(self, context_tokens: float = 2048.0,
                          max_batch: int = 64) -> DecodeStepModel:
        """decode_step_s as the replicas' step model (ms): what a replica would fit, over
        batches of 1 to max_batch sequences of context_tokens each (a line through both
        ends: memory-bound steps are nearly linear in the batch's KV)."""
        one = self.decode_step_s(1, context_tokens)
        full = self.decode_step_s(max_batch, max_batch * context_tokens)
        s1 = (full - one) / (max_batch - 1)
        return DecodeStepModel(1e3 * (one - s1), 1e3 * s1)

    def transfer_s(self, num_tokens: int) -> float:
        h = self.hardware
        return num_tokens * self.model.kv_bytes_per_token / h.link_bytes_per_s \
            + h.link_latency_s

    @property
    def kv_capacity_tokens(self) -> int:
        m, h = self.model, self.hardware
        free = 0.9 * h.hbm_bytes - m.num_params * m.bytes_per_param
        return max(0, int(free / m.kv_bytes_per_token))

    @property
    def prefill_tokens_per_s(self) -> float:
        return 4096 / self.prefill_s(4096)
