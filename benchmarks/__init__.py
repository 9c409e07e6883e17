"""clipfuse.benchmarks: latency/throughput of every backend against the PyTorch reference."""
