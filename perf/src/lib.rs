//! ferry-perf: benchmarks (not built yet).
