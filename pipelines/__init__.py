"""The runnable jobs that chain the stages (``python -m pipelines.<job>``), and what the jobs share.

Jobs: train_tokenizer, extract_codes, train_prior, sample, evaluate, compare. Shared, never a job: training (the one
training loop), runs (reading a run folder: its job config, seed, data settings and code files), datasets, cli (the
one-line error exit), job_environment (process settings applied where a job starts).
"""
