"""The one Python sampler (MLX and ONNX Runtime use it) on hand-made logits, and the check that it
draws from the same distribution as llama.cpp's native chain, which the llama backend keeps."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeserve import Engine, SamplingParams
from edgeserve.sampling import Sampler

PROBS = [0.5, 0.3, 0.15, 0.05]
LOGITS = np.log(np.array(PROBS, dtype=np.float32))


def _draws(params: SamplingParams, logits: np.ndarray[Any, Any] = LOGITS, n: int = 200) -> Counter[int]:
    sample = Sampler(params)
    return Counter(sample(logits) for _ in range(n))


def test_greedy_bias_and_penalties() -> None:
    assert _draws(SamplingParams(temperature=0), n=3) == Counter({0: 3})
    assert _draws(SamplingParams(temperature=0, logit_bias={2: 5.0}), n=3) == Counter({2: 3})
    # After token 0 is drawn once, a strong presence penalty moves greedy to token 1, then 2, ...
    assert _draws(SamplingParams(temperature=0, presence_penalty=2.0), n=3) == Counter({0: 1, 1: 1, 2: 1})
    # Repetition penalty divides positive logits and multiplies negative ones (llama.cpp's rule).
    assert _draws(SamplingParams(temperature=0, repetition_penalty=3.0), n=2) == Counter({0: 1, 1: 1})


def test_the_sampler_leaves_the_runtime_logits_alone() -> None:
    logits = LOGITS.copy()
    sample = Sampler(SamplingParams(temperature=0, logit_bias={3: 9.0}, presence_penalty=1.0))
    sample(logits), sample(logits)
    assert np.array_equal(logits, LOGITS)


@pytest.mark.parametrize(
    ("narrow", "allowed"),
    [
        (dict(top_k=2), {0, 1}),
        (dict(top_p=0.5), {0}),  # the first token alone reaches 0.5
        (dict(top_p=0.81), {0, 1, 2}),
        (dict(min_p=0.5), {0, 1}),  # p >= 0.5 * 0.5
        (dict(min_p=0.11), {0, 1, 2}),  # p >= 0.055 leaves out 0.05
    ],
)
def test_truncation_keeps_exactly_the_allowed_tokens(narrow: dict[str, Any], allowed: set[int]) -> None:
    params = SamplingParams(**{"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 1, **narrow})
    assert set(_draws(params, n=300)) == allowed


def test_seeded_draws_repeat_and_follow_the_distribution() -> None:
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=11)
    a, b = _draws(params, n=400), _draws(params, n=400)
    assert a == b
    assert abs(a[0] / 400 - 0.5) < 0.08 and abs(a[3] / 400 - 0.05) < 0.04
    hot = _draws(SamplingParams(temperature=5.0, top_k=0, top_p=1.0, seed=11), n=400)
    assert hot[3] > a[3]  # a higher temperature flattens the distribution


def test_a_paused_sampler_resumes_its_random_stream() -> None:
    """The state is the object: drawing 5, then 5 more later, equals drawing 10 in a row."""
    params = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, seed=3, presence_penalty=0.5)
    straight = Sampler(params)
    paused = Sampler(params)
    first = [paused(LOGITS) for _ in range(5)]
    _draws(SamplingParams(temperature=1.0, seed=4), n=7)  # another request draws in between
    assert first + [paused(LOGITS) for _ in range(5)] == [straight(LOGITS) for _ in range(10)]


# ---- against llama.cpp's native chain -------------------------------------------------------

DRAWS = 3000


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.8, top_k=40, top_p=0.95),  # the defaults
        SamplingParams(temperature=1.3, top_k=100, top_p=0.9, min_p=0.02),
        SamplingParams(temperature=1.0, top_k=8, top_p=1.0, logit_bias={1000: 3.0}),
    ],
    ids=["defaults", "top_p-min_p", "top_k-bias"],
)
def test_python_and_native_samplers_draw_from_the_same_distribution(
    engine: Engine, default_model_path: Path, params: SamplingParams
) -> None:
    """On the real model's next-token logits, llama.cpp's chain (as the llama backend builds it,
    many seeds) draws from the exact distribution ours computes: a chi-square test cannot tell
    them apart. The logits come from a context of the test's own, so that the check depends on
    nothing inside the backend but its chain builder."""
    from llama_cpp import Llama, llama_get_logits_ith
    from scipy.stats import chisquare

    llm = Llama(str(default_model_path), n_ctx=256, n_threads=1, verbose=False)
    tokens = llm.tokenize(b"My favourite animal is the")
    llm.eval(tokens)
    logits = np.ctypeslib.as_array(llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),)).copy()
    build = engine.call(lambda backend: backend.sampler)  # it reads only the vocabulary size
    counts: Counter[int] = Counter()
    for seed in range(DRAWS):
        sampler = build(SamplingParams(**{**_fields(params), "seed": seed}))
        counts[int(sampler.sample(llm._ctx, -1))] += 1
        sampler.close()
    llm.close()
    ours = Sampler(params)
    ids, probs = ours.distribution(ours.adjusted(logits))
    expected = dict(zip(ids.tolist(), probs.tolist(), strict=True))
    assert set(counts) <= set(expected), "llama.cpp drew a token our chain truncates away"
    # Chi-square goodness of fit, tokens expected fewer than 5 times pooled into one bin.
    observed, want, rest_o, rest_e = [], [], 0.0, 0.0
    for token, p in expected.items():
        if p * DRAWS >= 5:
            observed.append(counts[token])
            want.append(p * DRAWS)
        else:
            rest_o, rest_e = rest_o + counts[token], rest_e + p * DRAWS
    if rest_e > 0:
        observed.append(rest_o)
        want.append(rest_e)
    p_value = chisquare(observed, want).pvalue
    tvd = 0.5 * sum(abs(counts[t] / DRAWS - p) for t, p in expected.items())
    assert p_value > 1e-3, f"the distributions differ: chi-square p={p_value:.2g}, total variation {tvd:.3f}"


def _fields(params: SamplingParams) -> dict[str, Any]:
    return {f: getattr(params, f) for f in params.__dataclass_fields__}


@pytest.mark.filterwarnings("error")
@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-300, top_k=0, top_p=1.0, seed=1),
        SamplingParams(temperature=1.0, top_k=0, top_p=0.9, seed=1, repetition_penalty=1e-30),
    ],
    ids=["tiny-temperature", "tiny-penalty"],
)
def test_extreme_values_still_give_a_distribution(params: SamplingParams) -> None:
    """Logits that overflow to inf give the softmax's limit (all mass on the largest), not NaN."""
    sample = Sampler(params)
    draws = [sample(LOGITS) for _ in range(5)]
    assert all(0 <= t < len(PROBS) for t in draws)
    _, probs = sample.distribution(sample.adjusted(LOGITS))
    assert np.isfinite(probs).all() and probs.sum() == pytest.approx(1.0)


def test_a_device_kernel_draws_through_the_same_random_stream() -> None:
    """draw_with hands the kernel the uniform __call__ would have used: the same tokens."""
    from edgeserve.kernels import sample_cpu

    params = SamplingParams(temperature=0.9, top_k=3, top_p=0.9, seed=5)
    host, device = Sampler(params), Sampler(params)
    assert device.plain
    picks = [device.draw_with(lambda u: sample_cpu.sample(LOGITS, 3, 0.9, 0.0, 0.9, u)) for _ in range(20)]
    assert picks == [host(LOGITS) for _ in range(20)] and list(device.history) == list(host.history)
    assert not Sampler(SamplingParams(logit_bias={1: 2.0})).plain
