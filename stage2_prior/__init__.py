"""Stage 2: an autoregressive transformer prior over the tokenizer's code sequences (raster order).

    from stage2_prior import PriorConfig, CodePrior, sample_codes
    prior = CodePrior(PriorConfig(codebook_size=K, sequence_length=h * w, num_classes=C))
    loss = prior(codes, labels)                       # mean NLL over code positions, nats
    codes = sample_codes(prior, 64, labels=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    prior.save_pretrained(path); CodePrior.from_pretrained(path)
"""
from .model import CodePrior, PriorConfig, build_transformer
from .sampling import filter_logits, sample_codes

__all__ = ["CodePrior", "PriorConfig", "build_transformer", "filter_logits", "sample_codes"]
