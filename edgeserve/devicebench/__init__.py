"""``edgeserve bench``: one device report that runs unchanged on Apple Silicon, Jetson, NVIDIA and CPUs.

Per installed backend (or ``--backends``), on the model of ``--model`` (default: Gemma 3 270M), at
each context of ``--contexts`` it measures prefill and decode rates, TTFT, the KV state's size and
the cost of parking and restoring it; beside them the process's peak RSS, the device's memory
bandwidth, and decode as a share of the bandwidth roofline. See ``measure`` (how a run goes),
``roofline`` (bandwidth and bytes per token) and ``breakdown`` (llama.cpp's step, part by part).

The JSON (schema ``edgeserve.device_report/1``) is what the handoff planner reads as device rates.
Rates are tokens a second, times milliseconds unless named ``_s``, sizes bytes; ``null`` means not
measured (never guessed)::

    schema            "edgeserve.device_report/1"
    created           UTC time, ISO 8601;  edgeserve: version;  command: the command line
    device            system, machine, cpu, physical_cores, logical_cores, memory_bytes, cuda, metal,
                      python, nice, load_avg_1m (list: before, then after each backend)
    memory_bandwidth  method, buffer_bytes, repeats, read_gbs {threads: GB/s}, copy_gbs {threads: GB/s}
    settings          model, contexts, decode_tokens, reps, threads, threads_pinned
    backends          {name: backend}
    backend           status "ok" | "skipped" | "failed", reason (when not ok); when ok:
                      device ("cpu", "gpu", "cuda", ...), threads, model_path, load_s,
                      rss_before_load_bytes, peak_rss_bytes (psutil, sampled; the whole process,
                      so earlier backends' leftovers too), peak_rss_added_bytes (peak - before),
                      weights {bytes_read_per_token, file_bytes, output_layer_bytes, source},
                      bandwidth_gbs (the ceiling used; null off the CPU) and bandwidth_note,
                      kv_bytes_per_token: KV each further token adds at the longest contexts
                      (sliding-window layers stop growing; null when parking carries tokens, not
                      KV) and kv_note, contexts [context row], default_sampling {context, params,
                      decode_tok_s, greedy_decode_tok_s, sampling_ms_per_token},
                      breakdown (llama on a CPU with --breakdown, else absent)
    context row       context, reps, prefill_tok_s, ttft_ms, decode_tok_s (median),
                      decode_tok_s_best, park_ms, restore_ms, park_bytes (the blob as shipped),
                      state_tokens, kv_bytes (the KV state parked after decoding), kv_bytes_per_token
                      (its average), bytes_read_per_token (weights + kv_bytes), roofline_tok_s
                      (bandwidth / bytes_read_per_token), roofline_pct (decode_tok_s / roofline)
    breakdown         context, method, by_threads {threads: {step_ms, lm_head_ms, rest_ms,
                      sample_greedy_ms, lm_head_share, lm_head_bytes, rest_bytes, lm_head_gbs,
                      rest_gbs, ceiling_gbs}}

A reader should accept added keys: the schema string changes only when a key changes meaning.
"""

from edgeserve.devicebench.runner import SCHEMA

__all__ = ["SCHEMA"]
