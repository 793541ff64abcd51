//! `vow pipeline submit FILE` and `vow pipeline show`: pipelines described in YAML or JSON.
//!
//! ```yaml
//! idempotency_key: order-42        # optional; a retry with the same key completes the graph
//! wait_for: "{o42}/uploaded"       # optional; `--wait` without it waits for the last target
//! promises:
//!   - id: "{o42}/small"
//!     deadline_in: 10m             # or deadline_ms (absolute); default: the cluster's
//!     tags: { order: "42" }
//! continuations:
//!   - id: resize
//!     sources: ["{o42}/input"]
//!     target: "{o42}/small"
//!     on: resolved                 # resolved (default) | rejected | settled
//!     invoke: { url: "http://fn.local/resize", timeout_ms: 5000, prewarm: true }
//!   - id: done
//!     sources: ["{o42}/small", "{o42}/thumb"]
//!     combinator: all              # all | any | race, with several sources
//!     target: "{o42}/uploaded"
//!     forward: {}                  # or { recover: true } on a catch step
//! ```

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::json;
use vow_client::{Client, pb};

use crate::output::Output;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineFile {
    #[serde(default)]
    pub idempotency_key: String,
    #[serde(default)]
    pub wait_for: String,
    #[serde(default)]
    pub traceparent: String,
    #[serde(default)]
    pub promises: Vec<PromiseSpec>,
    #[serde(default)]
    pub continuations: Vec<ContinuationSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromiseSpec {
    pub id: String,
    #[serde(default)]
    pub deadline_ms: i64,
    /// Relative to now, e.g. `30s`, `10m`.
    #[serde(default)]
    pub deadline_in: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// UTF-8 text as the param's data.
    #[serde(default)]
    pub param: Option<String>,
    #[serde(default)]
    pub idempotency_key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContinuationSpec {
    #[serde(default)]
    pub id: String,
    pub sources: Vec<String>,
    pub target: String,
    #[serde(default)]
    pub combinator: Option<String>,
    #[serde(default)]
    pub on: Option<String>,
    #[serde(default)]
    pub invoke: Option<InvokeSpec>,
    #[serde(default)]
    pub forward: Option<ForwardSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InvokeSpec {
    pub url: String,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub timeout_ms: u32,
    #[serde(default)]
    pub prewarm: bool,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ForwardSpec {
    #[serde(default)]
    pub recover: bool,
}

/// Reads a pipeline file: JSON if it starts with `{`, YAML otherwise.
pub fn parse(text: &str) -> anyhow::Result<PipelineFile> {
    if text.trim_start().starts_with('{') {
        serde_json::from_str(text).context("reading the pipeline as JSON")
    } else {
        serde_yaml_ng::from_str(text).context("reading the pipeline as YAML")
    }
}

impl PipelineFile {
    /// The Submit request, with relative deadlines resolved on `now_ms`.
    pub fn to_request(&self, now_ms: i64) -> anyhow::Result<pb::SubmitRequest> {
        let mut promises = Vec::new();
        for p in &self.promises {
            let deadline_ms = match &p.deadline_in {
                Some(d) => {
                    let d =
                        crate::parse_duration(d).map_err(|e| anyhow::anyhow!("promise {}: deadline_in: {e}", p.id))?;
                    now_ms.saturating_add(d.as_millis() as i64)
                }
                None => p.deadline_ms,
            };
            promises.push(pb::CreateRequest {
                id: p.id.clone(),
                param: p.param.as_ref().map(|t| pb::Value { headers: HashMap::new(), data: t.as_bytes().to_vec() }),
                deadline_ms,
                tags: p.tags.clone().into_iter().collect(),
                idempotency_key: p.idempotency_key.clone(),
                ..Default::default()
            });
        }
        let mut continuations = Vec::new();
        for c in &self.continuations {
            let name = if c.id.is_empty() { format!("to {}", c.target) } else { c.id.clone() };
            let combinator = match c.combinator.as_deref() {
                None => pb::Combinator::Unspecified,
                Some("all") => pb::Combinator::All,
                Some("any") => pb::Combinator::Any,
                Some("race") => pb::Combinator::Race,
                Some(other) => bail!("continuation {name}: combinator {other:?} is not all, any or race"),
            };
            let on = match c.on.as_deref() {
                None | Some("resolved") => pb::On::Resolved,
                Some("rejected") => pb::On::Rejected,
                Some("settled") => pb::On::Settled,
                Some(other) => bail!("continuation {name}: on {other:?} is not resolved, rejected or settled"),
            };
            let action = match (&c.invoke, &c.forward) {
                (Some(i), None) => pb::continuation::Action::Invoke(pb::Invoke {
                    url: i.url.clone(),
                    headers: i.headers.clone().into_iter().collect(),
                    timeout_ms: i.timeout_ms,
                    prewarm: i.prewarm,
                }),
                (None, Some(f)) => pb::continuation::Action::Forward(pb::Forward { recover: f.recover }),
                _ => bail!("continuation {name}: give exactly one of invoke or forward"),
            };
            continuations.push(pb::Continuation {
                id: c.id.clone(),
                sources: c.sources.clone(),
                target: c.target.clone(),
                combinator: combinator as i32,
                on: on as i32,
                action: Some(action),
            });
        }
        Ok(pb::SubmitRequest {
            promises,
            continuations,
            wait_for: self.wait_for.clone(),
            wait_timeout_ms: 0,
            idempotency_key: self.idempotency_key.clone(),
            traceparent: self.traceparent.clone(),
        })
    }

    /// What `--wait` waits for: `wait_for`, else the target of the last continuation.
    pub fn default_wait(&self) -> Option<String> {
        if !self.wait_for.is_empty() {
            return Some(self.wait_for.clone());
        }
        self.continuations.last().map(|c| c.target.clone())
    }

    /// The ids of its continuations as the server names them (a continuation without an id is
    /// `to:<target>`).
    pub fn continuation_ids(&self) -> Vec<String> {
        self.continuations
            .iter()
            .map(|c| if c.id.is_empty() { format!("to:{}", c.target) } else { c.id.clone() })
            .collect()
    }
}

pub fn status_json(s: &pb::ContinuationStatus) -> serde_json::Value {
    let c = s.continuation.clone().unwrap_or_default();
    json!({
        "id": c.id,
        "sources": c.sources,
        "target": c.target,
        "status": s.status,
        "note": s.note,
        "attempts": s.attempts,
        "last_error": s.last_error,
        "next_attempt_ms": s.next_attempt_ms,
        "registered_at_ms": s.registered_at_ms,
        "shard_id": s.shard_id,
    })
}

pub fn status_table(all: &[pb::ContinuationStatus]) -> String {
    let mut out =
        format!("{:<24} {:<8} {:>8}  {:<24} {}\n", "CONTINUATION", "STATUS", "ATTEMPTS", "TARGET", "NOTE / LAST ERROR");
    for s in all {
        let c = s.continuation.clone().unwrap_or_default();
        let note = if s.note.is_empty() { s.last_error.clone() } else { s.note.clone() };
        out.push_str(&format!("{:<24} {:<8} {:>8}  {:<24} {}\n", c.id, s.status, s.attempts, c.target, note));
    }
    out
}

/// `vow pipeline show`: the status of each continuation.
pub async fn show(client: &Client, output: Output, ids: &[String]) -> anyhow::Result<()> {
    let mut all = Vec::new();
    for id in ids {
        all.push(client.get_continuation(id).await?);
    }
    print!("{}", output.render(|| json!(all.iter().map(status_json).collect::<Vec<_>>()), || status_table(&all)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"
idempotency_key: order-42
promises:
  - id: "{o42}/small"
    deadline_in: 10m
    tags: { order: "42" }
  - id: "{o42}/done"
continuations:
  - id: resize
    sources: ["{o42}/input"]
    target: "{o42}/small"
    invoke: { url: "http://fn/resize", prewarm: true }
  - sources: ["{o42}/small", "{o42}/other"]
    combinator: race
    on: settled
    target: "{o42}/done"
    forward: { recover: true }
"#;

    #[test]
    fn yaml_and_json_pipelines_become_a_submit() {
        let file = parse(YAML).unwrap();
        let req = file.to_request(1_000).unwrap();
        assert_eq!(req.promises[0].deadline_ms, 1_000 + 600_000);
        assert_eq!(req.promises[1].deadline_ms, 0, "the cluster's default");
        assert_eq!(req.continuations[1].combinator, pb::Combinator::Race as i32);
        assert_eq!(req.continuations[1].on, pb::On::Settled as i32);
        assert!(matches!(req.continuations[0].action, Some(pb::continuation::Action::Invoke(ref i)) if i.prewarm));
        assert_eq!(file.default_wait().as_deref(), Some("{o42}/done"));
        assert_eq!(file.continuation_ids(), ["resize", "to:{o42}/done"]);
        let json =
            r#"{"promises": [{"id": "b"}], "continuations": [{"sources": ["a"], "target": "b", "forward": {}}]}"#;
        assert_eq!(parse(json).unwrap().to_request(0).unwrap().continuations.len(), 1);
    }

    #[test]
    fn mistakes_in_a_pipeline_file_are_named() {
        let unknown = parse("promises: [{id: a, deadline: 5}]").unwrap_err();
        assert!(format!("{unknown:#}").contains("deadline"), "{unknown:#}");
        let both = parse("continuations: [{sources: [a], target: b, forward: {}, invoke: {url: 'http://x'}}]").unwrap();
        assert!(both.to_request(0).unwrap_err().to_string().contains("exactly one"));
        let on = parse("continuations: [{sources: [a], target: b, on: sometimes, forward: {}}]").unwrap();
        assert!(on.to_request(0).unwrap_err().to_string().contains("sometimes"));
    }
}
