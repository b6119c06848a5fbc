"""bench/alpaca_data.py: the Alpaca-length approximation matches its documented numbers; the synthetic data set."""

from __future__ import annotations

import numpy as np

from llama_adapter_triton.bench import alpaca_data as ad


def test_alpaca_length_approximation_matches_its_documented_numbers():
    lengths, prompts = ad.ALPACA_LENGTHS.draw(ad.ALPACA_EXAMPLES, np.random.default_rng(0))
    assert 150 <= lengths.mean() <= 170  # "about 158 tokens"
    assert 125 <= np.median(lengths) <= 145 and np.percentile(lengths, 99) > 400 and lengths.max() <= 512
    assert prompts.min() >= 37 and (lengths > prompts).all()  # BOS + template at least, and a response
    again, _ = ad.ALPACA_LENGTHS.draw(ad.ALPACA_EXAMPLES, np.random.default_rng(0))
    assert (again == lengths).all()  # seeded
    short, short_prompts = ad.ALPACA_LENGTHS.draw(1000, np.random.default_rng(1), scale=0.1, max_len=64)
    assert short.max() <= 64 and short_prompts.min() >= 1 and (short > short_prompts).all()
    data = ad.synthetic_dataset(50, 512, seed=0, scale=1.0, max_len=512)
    assert len(data) == 50 and int(data.tokens.max()) < 512 and int(data.num_targets.min()) >= 1
