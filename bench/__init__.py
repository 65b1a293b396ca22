"""Speed and memory benchmarks: each compares against a reference measured in the same process."""
