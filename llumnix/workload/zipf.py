"""The authors' Short / Medium / Long length generator: a rescaled, capped discrete Zipf.

Table 1's S / M / L rows are the statistics of ``gen_random_response_lens(distribution="zipf", ...)`` in
``benchmarks-repo/benchmark_throughput.py`` of the authors' artifact (github.com/AlibabaPAI/llumnix, branch
``osdi24ae``, commit 92f6f9d5cbd6eb4f7a6692789042cc21c29b1a03, lines 734-786). This is our own implementation of
what that function does, checked line by line:

* ranks ``1 .. 2*mean - 1`` (``np.arange(1, len_mean*2)``, line 753);
* exponent by (mean, cap): 1024 -> 1.0005, 512 -> 1.15, 256 -> 1.5, 128 -> 2.0, all with the cap 6,144 that every
  Fig-11 config passes (``irange=6144``, ``oranges=6144`` in ``benchmarks-repo/configs/prefill_load_control_exp``);
  lines 754-761. Any other (mean, cap) falls back to exponent 1.0 there, for which ``scipy.stats.zipf.pmf`` is NaN,
  so ``np.random.choice`` raises: the artifact supports only those four means. :func:`zipf_exponent` raises instead.
* probabilities ``k**-alpha`` normalised over the truncated support (``zipf.pmf`` then ``/= sum``, lines 764-765),
  one draw per request by inverse CDF (``np.random.choice(..., p=...)``, line 766);
* the whole batch is rescaled to the mean: ``ceil(k * mean / mean(batch))`` (lines 769-770). The factor is the
  batch's own sample mean, so a trace's lengths depend on its size (a batch of one is exactly the mean), as in the
  artifact, which draws each trace's prompts in one batch of ``num_prompts`` (10,000) and its outputs in another;
* then capped: ``min(length, cap)`` (lines 771-772), so the cap acts after the rescale and the mean ends slightly
  below the target (Short ~127.5).

Lengths are multiples of the rescale factor rounded up (Short: ~35, 69, 104, ...), so P95 / P99 move in steps
between seeds. The artifact seeds numpy's global state with ``0xCADE`` for every run (lines 942-953) and draws the
prompts' batch first, then the outputs' (lines 954-967). With that legacy stream
(``np.random.RandomState(0xCADE)``) and 10,000 draws, :meth:`ZipfLengths.sample` returns exactly the artifact's
prompt lengths, and their P50 / P80 / P95 / P99 are Table 1's S / M / L percentiles to the token (Short 38 / 113 /
413 / 1,464; Medium 32 / 173 / 1,288 / 4,208; Long 55 / 582 / 3,113 / 5,166; tested): Table 1 is the statistics of
that one batch. Its means are the nominal ones (the batch's are 128.0 / 253.7 / 512.7). Traces here pass a seeded
``numpy.random.Generator`` instead, so each seed gives a different batch; the spread over seeds is in
``docs/workload-lengths.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: The artifact's cap on generated lengths (``--random_prompt_lens_range`` / ``--variable_response_lens_range``).
AUTHORS_CAP_TOKENS = 6144

#: Zipf exponent by mean length, valid with the 6,144 cap (``benchmark_throughput.py`` lines 754-761).
AUTHORS_EXPONENTS: dict[int, float] = {1024: 1.0005, 512: 1.15, 256: 1.5, 128: 2.0}


def zipf_exponent(mean_tokens: int, cap_tokens: int = AUTHORS_CAP_TOKENS) -> float:
    """The artifact's exponent for this (mean, cap); a clear error where the artifact itself fails."""
    if cap_tokens != AUTHORS_CAP_TOKENS or mean_tokens not in AUTHORS_EXPONENTS:
        raise ValueError(
            f"the authors' Zipf generator is defined only for mean {sorted(AUTHORS_EXPONENTS)} tokens with cap "
            f"{AUTHORS_CAP_TOKENS}, got mean {mean_tokens}, cap {cap_tokens} (their code falls back to exponent 1.0, "
            "for which the Zipf pmf is undefined). Fix: use one of those means, or --lengths table1."
        )
    return AUTHORS_EXPONENTS[mean_tokens]


@dataclass(frozen=True)
class ZipfLengths:
    """Discrete Zipf over ranks ``1 .. 2*mean-1``, each batch rescaled to ``mean_tokens`` (ceil), then capped."""

    mean_tokens: int
    exponent: float
    cap_tokens: int = AUTHORS_CAP_TOKENS

    def __post_init__(self) -> None:
        if self.mean_tokens < 1 or self.cap_tokens < 1 or not self.exponent > 0:
            raise ValueError(f"ZipfLengths needs mean >= 1, cap >= 1 and exponent > 0, got {self}")

    @classmethod
    def authors(cls, mean_tokens: int) -> ZipfLengths:
        """The artifact's generator for one of its means (128, 256, 512, 1024)."""
        return cls(mean_tokens, zipf_exponent(mean_tokens))

    @property
    def ranks(self) -> np.ndarray:
        return np.arange(1, 2 * self.mean_tokens, dtype=np.int64)

    @property
    def rank_probabilities(self) -> np.ndarray:
        weights = self.ranks.astype(float) ** -self.exponent
        return weights / weights.sum()

    def sample(self, n: int, rng: np.random.Generator | np.random.RandomState) -> np.ndarray:
        """``n`` integer lengths in ``[1, cap_tokens]``: one batch, rescaled by its own sample mean.

        ``rng.choice(..., p=...)`` draws by inverse CDF from one uniform per length in both numpy APIs, so a
        ``RandomState`` seeded like the artifact reproduces its lengths exactly.
        """
        if n < 1:
            raise ValueError(f"need at least one length, got n={n}")
        ranks = rng.choice(self.ranks, size=n, p=self.rank_probabilities)
        scale = self.mean_tokens / ranks.mean()
        return np.minimum(np.ceil(ranks * scale), self.cap_tokens).astype(np.int64)


#: The generated traces' letters (``S-L``: Short prompts, Long outputs) -> the artifact's generator.
SHORT_ZIPF = ZipfLengths.authors(128)
MEDIUM_ZIPF = ZipfLengths.authors(256)
LONG_ZIPF = ZipfLengths.authors(512)
ZIPF_BY_LETTER: dict[str, ZipfLengths] = {"S": SHORT_ZIPF, "M": MEDIUM_ZIPF, "L": LONG_ZIPF}
