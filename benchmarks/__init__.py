"""make bench: is the lookup faster than the matmul it replaces? (run: python -m benchmarks.run)"""
