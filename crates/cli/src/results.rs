//! Rows of `vow bench` results, shared by the bench that measures them and the plots that
//! draw them (`results.json` is a list of these).

use hdrhistogram::Histogram;
use serde::Serialize;

/// One row of results: a target, a workload and a client count.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BenchResult {
    pub target: String,
    pub workload: String,
    pub clients: usize,
    /// Which entry of `--clients` this run was (from 0). A count given twice makes two steps, and
    /// each target's row is compared with the other target's run of the same step.
    pub step: usize,
    pub ops: u64,
    pub ops_per_sec: f64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub errors: u64,
}

/// One row of `results.json` for the chain workload.
#[derive(Debug, Clone, Serialize)]
pub struct ChainResult {
    pub variant: String,
    pub rtt_ms: u64,
    pub steps: usize,
    pub iterations: usize,
    pub p50_us: u64,
    pub p99_us: u64,
    pub max_us: u64,
    /// This variant's p50 over the pipelined p50 at the same delay.
    pub p50_vs_pipelined: f64,
}

/// The latency histogram every run records into: 1 µs to 60 s at 3 significant digits.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds are valid")
}
