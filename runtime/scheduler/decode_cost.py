"""What a request placed on an engine adds beyond its own first token: its decode there, and
what it does to the sequences already decoding there (each engine's decode step model,
step_model.py). The policy places a request where its first token plus this is least.

Priced against the SLOs: a request's first token and its time per output token are two
different promises, and a delay costs each request by what it does to the number the SLO
judges. A first token later by d ms costs d; a sequence of n tokens that waits d ms in all
over its decode has its TPOT raised by d / n, which costs `tpot_price` x d / n (tpot_price:
the TTFT SLO over the TPOT SLO, 10 for 1,000 and 100 ms). So the same stall costs a
23-token sequence five times what it costs a 120-token one, and a request's own decode
costs its TPOT there, not its TPOT times its length. Results are in first-token ms.
"""

from __future__ import annotations

import numpy as np

from runtime.scheduler.loads import ReplicaColumns


def decode_cost_ms(table: ReplicaColumns, prompt_len: int, max_tokens: int,
                   output_fraction: float, tpot_price: float, now_s: float) -> np.ndarray:
    """Every replica's cost, first-token ms (module docstring):
      - the request's own TPOT: its n decode steps at the step time with it in the batch,
        and the prefills that share those steps (the long one running there now, a chunk
        per step while it lasts, or, if more, those its recent prefill work says will come:
        at utilization u (work.utilization) the engine prefills a share u of the time, so n
        steps of pure decode D take D / (1 - u)), over n;
      - s1 on every step of each sequence already there while both decode (their TPOTs),
        and on every step of the prefills there while it decodes (the first tokens of
        others);
      - its prefill's time on every step of those sequences that it shares (prefill_delay_ms).
    n: max_tokens x output_fraction (the fraction of it recent requests used); theirs
    likewise, less what they generated."""
    n = max(1.0, output_fraction * max_tokens)
    s0, s1 = table.decode_step()
    work = table.work
    own_decode = n * (s0 + s1 * (table.booked_seqs + 1))
    _, long_left = work.remaining_ms(now_s)
    utilization = work.utilization(now_s)
    prefills = np.maximum(np.minimum(long_left, n * work.long_chunk_ms()),
                          own_decode * utilization / (1.0 - utilization))
    # each sequence there decodes beside it min(n, its tokens left) steps, over its length
    others_tpot = s1 * np.minimum(n * inverse_lengths(table, output_fraction),
                                  table.sequences_left())
    return tpot_price * ((own_decode + prefills) / n + others_tpot) \
        + prefill_delay_ms(table, prompt_len, output_fraction, tpot_price) \
        + s1 * n * utilization


def prefill_delay_ms(table: ReplicaColumns, prompt_len: int, output_fraction: float,
                     tpot_price: float) -> np.ndarray:
    """Every replica's cost of prefilling the prompt there to the sequences decoding there,
    first-token ms: each waits for all of a short prompt's prefill, or for a chunk of a long
    one's per token it still decodes, at most the whole prefill; that wait
    over its own tokens is what its TPOT gains (module docstring)."""
    work = table.work
    prefill_ms = work.expected_ms(prompt_len)
    own_chunk_ms = prefill_ms * min(1.0, work.chunk_tokens / max(1, prompt_len))
    # sum over sequences i of min(prefill, chunk x left_i) / n_i
    return tpot_price * np.minimum(prefill_ms * inverse_lengths(table, output_fraction),
                                   own_chunk_ms * table.sequences_left())


def inverse_lengths(table: ReplicaColumns, output_fraction: float) -> np.ndarray:
    """Every replica's 1 / n summed over the sequences placed there (n: a sequence's
    expected tokens, output_fraction of its max_tokens). A long prompt sent to an engine
    runs its chunks beside every token the others there still decode: one that has not
    started decoding has all of its tokens ahead (in `mixed` runs at 2/s, a 5,206-token
    prompt's 23 tokens took 42-72 ms each, decoded beside the chunks of a 7,303-token
    prompt placed on its engine while it prefilled or had just begun to decode)."""
    return table.inverse_max_tokens / max(output_fraction, 1e-3)

