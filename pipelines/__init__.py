"""The runnable jobs that chain the stages (``python -m pipelines.<job>``), and what the jobs share.

Jobs: train_tokenizer, extract_codes, train_prior, sample, evaluate, compare; a job never imports another job.
Shared: training (the one training loop), settings (every job's config), runs (reading a run folder: its job config,
seed, data settings and code files), datasets, cli (the one-line error exit), job_environment (process settings a
job applies where it starts).
"""
