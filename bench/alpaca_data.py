"""bench_finetune's examples: Alpaca-like lengths drawn at random (AlpacaLengths: an approximation of Alpaca-52K with
the Alpaca template and the LLaMA tokenizer; no data set can be downloaded here), or a real Alpaca file tokenized as
train/finetune.py does; DataStats, the lengths' summary the benchmark reports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llama_adapter_triton.model.tokenizer import Tokenizer
from llama_adapter_triton.train.data import TokenizedDataset, load_records, tokenize_records

ALPACA_EXAMPLES = 52_002  # Alpaca-52K (tatsu-lab/stanford_alpaca's alpaca_data.json)


@dataclass(frozen=True)
class AlpacaLengths:
    """An approximation of the token counts of Alpaca-52K examples with the Alpaca template and the LLaMA
    tokenizer (sentencepiece, 32000 pieces), as train/data.py tokenizes them: BOS + template + instruction
    [+ input] + response + EOS. Not measured: no tokenizer or data set can be downloaded here. The numbers:

    - template: "Below is an instruction that describes a task. Write a response ...### Instruction:\\n ...
      ### Response:" is about 36 LLaMA tokens (the 105-character sentence ~21, each "\\n\\n### Name:\\n" header
      ~7-8: newlines are byte pieces); the variant with an input ("..., paired with an input that provides
      further context. ...", plus "### Input:") about 52; +1 for BOS.
    - input_share: the share of examples with a non-empty input, about 40% (assumption, from the Alpaca
      data's make-up).
    - instruction, input, response (EOS included): lognormal token counts (median, sigma), chosen so that the
      whole matches Alpaca's size: a Hugging Face copy of Alpaca-52K (disham993/alpaca-train-validation-test-split,
      its data set card) lists 47.8 MB for its 52,002 examples, each holding instruction, input, output and the
      templated text ("text"), i.e. about 540 characters of templated text per example, 140-170 LLaMA tokens at
      3.2-3.8 characters per token. Means here: instruction 17.7, input 27.1 (when present), response 85.4.
    Drawn for 52,002 examples: mean 156 tokens, median 136, p90 253, p99 482; 0.8% reach the padded length
    (512, the official script's max_seq_len) and are truncated to it. The brief's own estimate for a real
    Alpaca example with the template was 150-200 tokens."""

    template: int = 37  # BOS + template, no input
    template_with_input: int = 53  # BOS + template with an input
    input_share: float = 0.40
    instruction: tuple[float, float] = (16.0, 0.45)  # (median, sigma) of a lognormal
    input: tuple[float, float] = (18.0, 0.9)
    response: tuple[float, float] = (62.0, 0.8)

    def draw(self, n: int, rng: np.random.Generator, *, scale: float = 1.0,
             max_len: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(lengths, prompt_lens) of n examples, int64; every count times scale (smoke runs), each example at
        most max_len tokens with at least one response token."""
        lognormal = lambda median_sigma: rng.lognormal(np.log(median_sigma[0]), median_sigma[1], n)  # noqa: E731
        has_input = rng.random(n) < self.input_share
        prompt = np.where(has_input, self.template_with_input + lognormal(self.input), self.template)
        prompt = prompt + lognormal(self.instruction)
        response = lognormal(self.response)
        prompt = np.clip(np.rint(prompt * scale), 1, max_len - 1).astype(np.int64)
        response = np.maximum(np.rint(response * scale), 1).astype(np.int64)
        return np.minimum(prompt + response, max_len), prompt


ALPACA_LENGTHS = AlpacaLengths()


def synthetic_dataset(n: int, vocab_size: int, *, seed: int, scale: float, max_len: int) -> TokenizedDataset:
    """n examples of random tokens with Alpaca-like lengths (ALPACA_LENGTHS) and train/data.py's labels."""
    rng = np.random.default_rng(seed)
    lengths, prompt_lens = ALPACA_LENGTHS.draw(n, rng, scale=scale, max_len=max_len)
    tokens = torch.randint(0, vocab_size, (int(lengths.sum()),), generator=torch.Generator().manual_seed(seed))
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.from_numpy(lengths).cumsum(0)])
    return TokenizedDataset(tokens, offsets, torch.from_numpy(prompt_lens), torch.arange(n), pad_id=0)


def real_dataset(data: str, tokenizer: str, *, max_len: int) -> tuple[TokenizedDataset, int]:
    """The records of an Alpaca JSON / JSONL file tokenized as train/finetune.py does (truncated to max_len);
    returns (dataset, the tokenizer's vocabulary size)."""
    tok = Tokenizer(tokenizer)
    records, _ = load_records(data)
    dataset, _ = tokenize_records(records, tok, max_seq_len=max_len)
    return dataset, tok.vocab_size


@dataclass(frozen=True)
class DataStats:
    source: str
    examples: int
    mean: float
    p50: float
    p90: float
    longest: int
    at_max: float  # share of examples at the padded length (truncated, or exactly that long)

    @classmethod
    def of(cls, data: TokenizedDataset, source: str, max_len: int) -> DataStats:
        lengths = data.lengths
        return cls(source, len(lengths), float(lengths.mean()), float(np.percentile(lengths, 50)),
                   float(np.percentile(lengths, 90)), int(lengths.max()), float((lengths >= max_len).mean()))

    def line(self) -> str:
        return (f"{self.source}: {self.examples} examples, tokens per example mean {self.mean:.1f}, median "
                f"{self.p50:.0f}, p90 {self.p90:.0f}, longest {self.longest}, {100 * self.at_max:.2f}% at the "
                "padded length")
