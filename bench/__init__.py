"""jobsvc benchmarks: each one measures jobsvc and a baseline in the same run and reports the ratio.

Run with `python -m bench` from the repository root (see bench/README.md).
"""
