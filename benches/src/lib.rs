//! Criterion micro-benchmarks of the hot paths live in `benches/`.
