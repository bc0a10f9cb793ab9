"""Codebook statistics from pooled code histograms, and the one perplexity every package uses."""
import math

import pytest
import torch

from eval.codebook import code_histogram, codebook_statistics
from stage1_tokenizer.quantizers import code_perplexity
from stage1_tokenizer.quantizers.base import perplexity


def test_perplexity_and_usage_on_hand_made_indices():
    assert code_perplexity(torch.tensor([3, 3, 3, 3]), 8).item() == pytest.approx(1.0)
    assert code_perplexity(torch.arange(8), 8).item() == pytest.approx(8.0)
    assert code_perplexity(torch.tensor([0, 0, 1, 1]), 8).item() == pytest.approx(2.0)
    stats = codebook_statistics(code_histogram(torch.tensor([[0, 0], [1, 5]]), 8))
    probs = torch.tensor([0.5, 0.25, 0.25])
    assert stats["perplexity"] == pytest.approx(math.exp(-(probs * probs.log()).sum().item()))
    assert stats["usage"] == pytest.approx(3 / 8) and stats["dead_codes"] == 5 and stats["codebook_size"] == 8
    with pytest.raises(ValueError):
        codebook_statistics(torch.zeros(4, dtype=torch.long))


def test_one_perplexity_for_histograms_and_distributions():
    counts = torch.tensor([[4.0, 4.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])
    assert torch.allclose(perplexity(counts, dim=1), torch.tensor([2.0, 1.0]))
    assert torch.allclose(perplexity(counts / counts.sum(1, keepdim=True), dim=1), torch.tensor([2.0, 1.0]))
    assert codebook_statistics(counts[0])["perplexity"] == pytest.approx(2.0)
