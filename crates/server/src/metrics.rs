//! Request counters and latency sums for `/metrics`, kept in atomics (no locks on the request path).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tonic::Status;

const METHODS: [&str; 7] = ["create", "get", "resolve", "reject", "cancel", "await", "search"];
const OUTCOMES: [&str; 3] = ["ok", "domain", "error"];

/// Counts of requests by method and outcome class, and their total latency.
#[derive(Debug, Default)]
pub struct Metrics {
    counts: [[AtomicU64; 3]; 7],
    micros: [AtomicU64; 7],
    awaits_waiting: AtomicU64,
    routed_sent: AtomicU64,
    routed_served: AtomicU64,
}

/// Counts one Await as waiting (`vow_awaits_waiting`) for as long as it lives.
#[derive(Debug)]
pub struct Waiting<'a>(&'a AtomicU64);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    pub fn record<T>(&self, method: &str, result: &Result<T, Status>, elapsed: Duration) {
        let Some(m) = METHODS.iter().position(|x| *x == method) else { return };
        let o = match result {
            Ok(_) => 0,
            // Replicated domain answers (exists, settled, not found, bad input) are not failures.
            Err(s)
                if matches!(
                    s.code(),
                    tonic::Code::AlreadyExists
                        | tonic::Code::FailedPrecondition
                        | tonic::Code::NotFound
                        | tonic::Code::InvalidArgument
                ) =>
            {
                1
            }
            Err(_) => 2,
        };
        self.counts[m][o].fetch_add(1, Ordering::Relaxed);
        self.micros[m].fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
    }

    /// Counts a request this node's router sent to another node's leader.
    pub fn routed_sent(&self) {
        self.routed_sent.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a routed request this node served for another node.
    pub fn routed_served(&self) {
        self.routed_served.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks an Await as waiting on this node until the returned guard is dropped.
    pub fn await_waiting(&self) -> Waiting<'_> {
        self.awaits_waiting.fetch_add(1, Ordering::Relaxed);
        Waiting(&self.awaits_waiting)
    }

    /// Appends the request metrics in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let _ = writeln!(out, "# TYPE vow_awaits_waiting gauge");
        let _ = writeln!(out, "vow_awaits_waiting {}", self.awaits_waiting.load(Ordering::Relaxed));
        let _ = writeln!(out, "# TYPE vow_routed_requests_total counter");
        let sent = self.routed_sent.load(Ordering::Relaxed);
        let _ = writeln!(out, "vow_routed_requests_total{{direction=\"sent\"}} {sent}");
        let served = self.routed_served.load(Ordering::Relaxed);
        let _ = writeln!(out, "vow_routed_requests_total{{direction=\"served\"}} {served}");
        let _ = writeln!(out, "# TYPE vow_requests_total counter");
        for (m, method) in METHODS.iter().enumerate() {
            for (o, outcome) in OUTCOMES.iter().enumerate() {
                let n = self.counts[m][o].load(Ordering::Relaxed);
                let _ = writeln!(out, "vow_requests_total{{method=\"{method}\",outcome=\"{outcome}\"}} {n}");
            }
        }
        let _ = writeln!(out, "# TYPE vow_request_seconds_sum counter");
        for (m, method) in METHODS.iter().enumerate() {
            let s = self.micros[m].load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "vow_request_seconds_sum{{method=\"{method}\"}} {s}");
        }
    }
}
