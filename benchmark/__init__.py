"""GPU throughput / MFU benchmarks and their recorded results (RESULTS.md). Scripts run from the project root."""
