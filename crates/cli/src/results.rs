//! One row of `vow bench` results, shared by the bench that measures it and the plots that
//! draw it (`results.json` is a list of these).

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
