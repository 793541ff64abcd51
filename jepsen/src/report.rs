//! What a run leaves behind besides `history.jsonl` (see [`crate::history`]): `results.json` and
//! `report.html` (a timeline of every client's operations with the nemesis windows shaded and
//! failing promises outlined).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::checker::{self, Anomaly};
use crate::history::{NemesisEvent, Op, OpKind, Outcome};

pub use crate::history::Setup;

/// Ops counted by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tally {
    pub ok: usize,
    pub fail: usize,
    pub info: usize,
}

impl Tally {
    fn of<'a>(ops: impl IntoIterator<Item = &'a Op>) -> Tally {
        let mut tally = Tally::default();
        for op in ops {
            match op.outcome {
                Outcome::Ok => tally.ok += 1,
                Outcome::Fail => tally.fail += 1,
                Outcome::Info => tally.info += 1,
            }
        }
        tally
    }
}

#[derive(Debug, Serialize)]
pub struct Results {
    pub valid: bool,
    /// The clients' ops (final reads are counted apart), and below them by outcome.
    pub ops: usize,
    pub ok: usize,
    pub fail: usize,
    pub info: usize,
    /// The clients' creates, resolves, rejects and cancels by outcome: most reads succeed even on
    /// a cluster that takes no write, so these are the numbers that show progress.
    pub writes: Tally,
    /// Acknowledged writes per shard (index = shard id, by the cluster's placement rule): the
    /// workload must reach every shard.
    pub ok_writes_by_shard: Vec<usize>,
    /// The clients' ops per kind ("create", "search", ...), by outcome.
    pub by_kind: BTreeMap<String, Tally>,
    /// Writes invoked after the final heal that succeeded: the cluster came back.
    pub ok_writes_after_heal: usize,
    /// Reads of every promise from every node after the heal (part of the checked history).
    pub final_reads: usize,
    pub anomalies: Vec<Anomaly>,
    /// The pipeline workload's chains, when the run had it.
    pub pipelines: Option<crate::history::PipelineTally>,
    pub nemesis: Vec<NemesisEvent>,
    /// Flattened: `seed`, `nodes`, `shards`, ... are top-level fields of `results.json`.
    #[serde(flatten)]
    pub setup: Setup,
}

impl Results {
    pub fn new(ops: &[Op], anomalies: Vec<Anomaly>, nemesis: Vec<NemesisEvent>, setup: Setup) -> Results {
        let client_ops: Vec<&Op> = ops.iter().filter(|op| op.kind != OpKind::FinalRead).collect();
        let all = Tally::of(client_ops.iter().copied());
        let is_write =
            |op: &&&Op| matches!(op.kind, OpKind::Create | OpKind::Resolve | OpKind::Reject | OpKind::Cancel);
        let heal_ns = checker::final_heal_ns(&nemesis);
        let mut ok_writes_by_shard = vec![0; setup.shards.max(1) as usize];
        for op in client_ops.iter().filter(is_write).filter(|op| op.outcome == Outcome::Ok) {
            ok_writes_by_shard[shard_of(&op.key, setup.shards.max(1)) as usize] += 1;
        }
        let mut by_kind: BTreeMap<String, Vec<&Op>> = BTreeMap::new();
        for op in &client_ops {
            let kind = serde_json::to_value(op.kind).ok().and_then(|v| v.as_str().map(str::to_owned));
            by_kind.entry(kind.unwrap_or_default()).or_default().push(op);
        }
        Results {
            valid: anomalies.is_empty(),
            ops: client_ops.len(),
            ok: all.ok,
            fail: all.fail,
            info: all.info,
            writes: Tally::of(client_ops.iter().filter(is_write).copied()),
            ok_writes_after_heal: Tally::of(
                client_ops.iter().filter(is_write).copied().filter(|op| op.invoke_ns >= heal_ns),
            )
            .ok,
            ok_writes_by_shard,
            by_kind: by_kind.into_iter().map(|(kind, ops)| (kind, Tally::of(ops))).collect(),
            final_reads: ops.len() - client_ops.len(),
            anomalies,
            pipelines: None,
            nemesis,
            setup,
        }
    }

    /// With what the pipeline workload did.
    pub fn with_pipelines(mut self, pipelines: Option<crate::history::PipelineTally>) -> Results {
        self.pipelines = pipelines;
        self
    }

    /// The one summary line a run prints.
    pub fn summary(&self) -> String {
        let kinds: BTreeSet<&str> = self.anomalies.iter().map(|a| a.kind.as_str()).collect();
        format!(
            "valid={} ops={} ok={} fail={} info={} ok_writes={} ok_writes_after_heal={} ok_writes_by_shard={:?} \
             final_reads={}{} anomalies={}{} nemesis_events={} nodes={} shards={} seed={}",
            self.valid,
            self.ops,
            self.ok,
            self.fail,
            self.info,
            self.writes.ok,
            self.ok_writes_after_heal,
            self.ok_writes_by_shard,
            self.final_reads,
            self.pipelines.as_ref().map_or(String::new(), |p| format!(
                " chains={} chains_acknowledged={} chains_completed={} function_calls={}",
                p.submitted, p.acknowledged, p.completed, p.function_calls
            )),
            self.anomalies.len(),
            if kinds.is_empty() { String::new() } else { format!(" {kinds:?}") },
            self.nemesis.len(),
            self.setup.nodes,
            self.setup.shards,
            self.setup.seed
        )
    }
}

/// The shard of a promise id: vow's placement rule (README.md, "Placement"), FNV-1a 64 over the
/// id's hash tag (the text between the first `{` and the next `}`, when not empty) or the whole
/// id, modulo the shard count. Kept here rather than taken from the server, which the harness
/// must not depend on.
pub fn shard_of(id: &str, shards: u32) -> u32 {
    let key = id
        .find('{')
        .and_then(|open| {
            let rest = &id[open + 1..];
            rest.find('}').filter(|&close| close > 0).map(|close| &rest[..close])
        })
        .unwrap_or(id);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in key.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % u64::from(shards.max(1))) as u32
}

/// The file of a run's results, in its output directory.
pub const RESULTS: &str = "results.json";

/// Writes `results.json` and `report.html` (the history is already on disk).
pub fn write_all(dir: &Path, results: &Results, ops: &[Op]) -> anyhow::Result<()> {
    std::fs::write(dir.join(RESULTS), serde_json::to_string_pretty(results)?)?;
    std::fs::write(dir.join("report.html"), html(results, ops))?;
    Ok(())
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn html(results: &Results, ops: &[Op]) -> String {
    let bad_keys: BTreeSet<&str> = results.anomalies.iter().map(|a| a.key.as_str()).collect();
    let end_ns =
        ops.iter().map(|o| o.complete_ns).chain(results.nemesis.iter().map(|e| e.at_ns)).max().unwrap_or(1).max(1);
    let processes: BTreeSet<u64> = ops.iter().map(|o| o.process).collect();
    let row = |p: u64| processes.iter().position(|x| *x == p).unwrap_or(0);
    let (width, row_h, top) = (1600.0, 18.0, 20.0);
    let x = |ns: u64| ns as f64 / end_ns as f64 * width;
    let height = top + row_h * processes.len() as f64 + 20.0;
    let mut svg = format!(r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">"#);
    // Nemesis windows: from each fault event to the next heal.
    let mut open: Option<&NemesisEvent> = None;
    for e in &results.nemesis {
        if e.action == "heal" {
            if let Some(s) = open.take() {
                let _ = write!(
                    svg,
                    r##"<rect x="{:.1}" y="0" width="{:.1}" height="{height}" fill="#999" opacity="0.2"><title>{}: {}</title></rect><text x="{:.1}" y="12" font-size="10">{}</text>"##,
                    x(s.at_ns),
                    (x(e.at_ns) - x(s.at_ns)).max(1.0),
                    escape(&s.action),
                    escape(&s.detail),
                    x(s.at_ns),
                    escape(&s.action)
                );
            }
        } else if open.is_none() && e.action != "crashed" {
            // A crash is found at a heal, not a fault the nemesis opened.
            open = Some(e);
        }
    }
    for op in ops {
        let color = match op.outcome {
            Outcome::Ok => match op.kind {
                OpKind::Create => "#4a90d9",
                OpKind::Resolve | OpKind::Reject | OpKind::Cancel => "#2e7d32",
                OpKind::Get | OpKind::Await | OpKind::LocalGet | OpKind::Search | OpKind::FinalRead => "#9ccc65",
            },
            Outcome::Fail => "#ef9a9a",
            Outcome::Info => "#ffb300",
        };
        let bad = bad_keys.contains(op.key.as_str());
        let y = top + row(op.process) as f64 * row_h;
        let _ = write!(
            svg,
            r##"<rect x="{:.2}" y="{y:.1}" width="{:.2}" height="{:.1}" fill="{color}"{}><title>#{} p{} {:?} {} {} → {:?} {:?} {}</title></rect>"##,
            x(op.invoke_ns),
            (x(op.complete_ns) - x(op.invoke_ns)).max(0.5),
            row_h - 4.0,
            if bad { r##" stroke="#d50000" stroke-width="2""## } else { "" },
            op.id,
            op.process,
            op.kind,
            escape(&op.key),
            escape(op.value.as_deref().unwrap_or("")),
            op.outcome,
            op.observed,
            escape(&op.detail)
        );
    }
    svg.push_str("</svg>");
    let mut anomalies = String::new();
    for a in &results.anomalies {
        let _ = write!(
            anomalies,
            "<li><b>{}</b> on <code>{}</code>: {} (ops {:?})</li>",
            escape(&a.kind),
            escape(&a.key),
            escape(&a.detail),
            a.op_ids
        );
    }
    format!(
        r#"<!doctype html><html><head><meta charset="utf-8"><title>vow-jepsen report</title>
<style>body{{font-family:sans-serif}} svg{{border:1px solid #ccc}}</style></head><body>
<h1>vow-jepsen: {}</h1>
<p>{}</p>
<p>Rows are clients; bars are operations from invocation to completion (blue create, green settle, light green read,
red refused, amber unknown). Grey bands are fault windows. Operations on failing promises are outlined in red.</p>
<h2>Anomalies</h2><ul>{}</ul>
{svg}
</body></html>"#,
        if results.valid { "valid" } else { "INVALID" },
        escape(&results.summary()),
        if anomalies.is_empty() { "<li>none</li>".to_string() } else { anomalies }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked examples of README.md's placement section.
    #[test]
    fn placement_follows_the_documented_rule() {
        assert_eq!(shard_of("{user-42}:order-7", 8), 3);
        assert_eq!(shard_of("café", 8), 1);
        assert_eq!(shard_of("{}x", 8), 7);
        assert_eq!(shard_of("{user-42}:cart", 8), shard_of("{user-42}:order-7", 8));
        assert_eq!(shard_of("anything", 1), 0);
    }
}
