"""What a request placed on an engine adds beyond its own first token: its decode there, and
what it does to the sequences already decoding there (each engine's decode step model,
step_model.py). The policy places a request where its first token plus this is least."""

from __future__ import annotations

import numpy as np

from runtime.scheduler.loads import ReplicaColumns


def decode_cost_ms(table: ReplicaColumns, prompt_len: int, max_tokens: int,
                   output_fraction: float, now_s: float) -> np.ndarray:
    """Every replica's cost, ms:
      - the request's own n decode steps at the step time with it in the batch;
      - the prefills that share those steps: the long one running there now (a chunk per
        step while it lasts), or, if more, those its recent prefill work says will come:
        at utilization u (work.utilization) the engine prefills a share u of the time, so n
        steps of pure decode D take D / (1 - u);
      - s1 on every step of each sequence already there while both decode, and on every
        step of the prefills there while it decodes (the first tokens of others);
      - its prefill's time on every step of those sequences that it shares (prefill_delay_ms).
    n: max_tokens x output_fraction (the fraction of it recent requests used); theirs:
    tokens_left."""
    n = max(1.0, output_fraction * max_tokens)
    s0, s1 = table.decode_step()
    others_left = tokens_left(table, output_fraction)
    work = table.work
    own_decode = n * (s0 + s1 * (table.booked_seqs + 1))
    _, long_left = work.remaining_ms(now_s)
    utilization = work.utilization(now_s)
    prefills = np.maximum(np.minimum(long_left, n * work.long_chunk_ms()),
                          own_decode * utilization / (1.0 - utilization))
    return own_decode + prefills \
        + prefill_delay_ms(table, prompt_len, output_fraction) \
        + s1 * (np.minimum(table.booked_seqs * n, others_left) + n * utilization)


def prefill_delay_ms(table: ReplicaColumns, prompt_len: int,
                     output_fraction: float) -> np.ndarray:
    """Every replica's cost of prefilling the prompt there to the sequences decoding there:
    each waits for all of a short prompt's prefill, or for a chunk of a long one's per token
    it still decodes (tokens_left)."""
    work = table.work
    prefill_ms = work.expected_ms(prompt_len)
    own_chunk_ms = prefill_ms * min(1.0, work.chunk_tokens / max(1, prompt_len))
    others_left = tokens_left(table, output_fraction)
    return np.minimum(table.booked_seqs * prefill_ms, others_left * own_chunk_ms)


def tokens_left(table: ReplicaColumns, output_fraction: float) -> np.ndarray:
    """Every replica's tokens still to decode by the sequences placed there:
    output_fraction of their max_tokens less the tokens each generated so far (the ingress
    counts them as they stream, ReplicaColumns.progressed). A long prompt sent to an engine
    runs its chunks beside every token the others there still decode: one that has not
    started decoding has all of its tokens ahead (in `mixed` runs at 2/s, a 5,206-token
    prompt's 23 tokens took 42-72 ms each, decoded beside the chunks of a 7,303-token
    prompt placed on its engine while it prefilled or had just begun to decode, when half
    its tokens were counted as done)."""
    return output_fraction * table.tokens_left()
