//! How the CLI prints records: aligned tables for a person at a terminal (the default), or with
//! `-o json` the JSON documents that scripts and tests parse (the etcdctl habit). The JSON shapes
//! live in `main.rs` and are a contract; the tables here are for reading and may change.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use vow_client::pb;

/// `-o, --output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Aligned columns, for a person.
    Table,
    /// The documented JSON, for scripts (pretty-printed, stable keys).
    Json,
}

impl Output {
    /// The text to print for a record: its pretty JSON or its table, ending in a newline.
    pub fn render(self, json: impl FnOnce() -> serde_json::Value, table: impl FnOnce() -> String) -> String {
        match self {
            Output::Json => {
                let v = json();
                format!("{}\n", serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string()))
            }
            Output::Table => table(),
        }
    }
}

/// How much of a param or value a table shows; the rest is cut and the full size given.
const DATA_SHOWN_CHARS: usize = 60;

/// Lays `rows` out in columns two spaces apart, each as wide as its widest cell. Trailing
/// spaces are dropped, and control characters in cells are escaped, so every row is one line
/// however odd an id or a tag is. Widths count chars: a wide (CJK, emoji) character in a cell
/// shifts the columns after it on its row (unicode-width would fix that; not worth a dependency).
pub fn columns(rows: &[Vec<String>]) -> String {
    let rows: Vec<Vec<String>> = rows.iter().map(|row| row.iter().map(|c| escape_controls(c)).collect()).collect();
    let mut widths: Vec<usize> = Vec::new();
    for row in &rows {
        for (i, cell) in row.iter().enumerate() {
            let w = cell.chars().count();
            match widths.get_mut(i) {
                Some(max) => *max = (*max).max(w),
                None => widths.push(w),
            }
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

fn escape_controls(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_owned();
    }
    s.chars().map(|c| if c.is_control() { c.escape_default().to_string() } else { c.to_string() }).collect()
}

/// Milliseconds since the epoch as UTC, e.g. `2025-11-29T21:40:12.345Z`.
pub fn utc(ms: i64) -> String {
    let (secs, milli) = (ms.div_euclid(1000), ms.rem_euclid(1000));
    let (days, day_secs) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{milli:03}Z", day_secs / 3600, day_secs % 3600 / 60, day_secs % 60)
}

/// Days since 1970-01-01 to a proleptic Gregorian (year, month, day): Howard Hinnant's
/// `civil_from_days` (http://howardhinnant.github.io/date_algorithms.html), exact for any i64
/// of days this is called with (at most ~1e11, from i64 milliseconds).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468; // days from 0000-03-01, the start of a 400-year era
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153; // month from March = 0
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A time cell: `-` for 0 (not set), else UTC with the milliseconds the JSON carries.
fn time_cell(ms: i64) -> String {
    if ms == 0 { "-".to_owned() } else { format!("{} ({ms})", utc(ms)) }
}

/// `k=v, k=v` in key order, `-` when empty.
fn pairs_cell(map: &std::collections::HashMap<String, String>) -> String {
    if map.is_empty() {
        return "-".to_owned();
    }
    let sorted: BTreeMap<_, _> = map.iter().collect();
    sorted.into_iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(", ")
}

/// Data as text when it is UTF-8 without control characters other than whitespace, else as
/// `hex ...`; cut at [`DATA_SHOWN_CHARS`] with an ellipsis and the full size; `-` when empty.
pub fn data_cell(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "-".to_owned();
    }
    let text = std::str::from_utf8(bytes)
        .ok()
        .filter(|s| !s.chars().any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t')));
    let (shown, cut) = match text {
        Some(s) => {
            let shown: String = s.chars().take(DATA_SHOWN_CHARS).collect();
            let cut = shown.len() < s.len();
            (shown, cut)
        }
        None => {
            let n = bytes.len().min(DATA_SHOWN_CHARS / 2);
            (format!("hex {}", hex(&bytes[..n])), n < bytes.len())
        }
    };
    if cut { format!("{shown}… ({} bytes)", bytes.len()) } else { shown }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The state's name as the JSON spells it.
pub fn state_name(s: i32) -> &'static str {
    match pb::State::try_from(s) {
        Ok(pb::State::Pending) => "PENDING",
        Ok(pb::State::Resolved) => "RESOLVED",
        Ok(pb::State::Rejected) => "REJECTED",
        Ok(pb::State::RejectedCanceled) => "REJECTED_CANCELED",
        Ok(pb::State::RejectedTimedout) => "REJECTED_TIMEDOUT",
        _ => "UNSPECIFIED",
    }
}

/// One promise as a two-column key/value table.
pub fn promise_table(p: &pb::Promise, deduplicated: bool) -> String {
    let row = |k: &str, v: String| vec![k.to_owned(), v];
    let mut rows = vec![
        row("ID", p.id.clone()),
        row("STATE", state_name(p.state).to_owned()),
        row("DEADLINE", time_cell(p.deadline_ms)),
        row("CREATED", time_cell(p.created_at_ms)),
        row("SETTLED", time_cell(p.settled_at_ms)),
        row("REVISION", p.revision.to_string()),
        row("TAGS", pairs_cell(&p.tags)),
    ];
    for (name, value) in [("PARAM", &p.param), ("VALUE", &p.value)] {
        let value = value.clone().unwrap_or_default();
        rows.push(row(name, data_cell(&value.data)));
        if !value.headers.is_empty() {
            rows.push(row(&format!("{name} HEADERS"), pairs_cell(&value.headers)));
        }
    }
    if deduplicated {
        rows.push(row("DEDUPLICATED", "yes".to_owned()));
    }
    columns(&rows)
}

/// A reply to create, resolve, reject or cancel.
pub fn response_table(r: &pb::PromiseResponse) -> String {
    match &r.promise {
        Some(p) if r.completion_token.is_empty() => promise_table(p, r.deduplicated),
        Some(p) => format!("{}completion token: {}\n", promise_table(p, r.deduplicated), r.completion_token),
        None => "no record in the reply\n".to_owned(),
    }
}

/// A search page: one row per promise, then how to ask for the next page, if there is one.
pub fn search_table(r: &pb::SearchResponse) -> String {
    let mut rows = vec![["ID", "STATE", "DEADLINE", "TAGS"].map(str::to_owned).to_vec()];
    for p in &r.promises {
        let deadline = if p.deadline_ms == 0 { "-".to_owned() } else { utc(p.deadline_ms) };
        rows.push(vec![p.id.clone(), state_name(p.state).to_owned(), deadline, pairs_cell(&p.tags)]);
    }
    let mut out = columns(&rows);
    if !r.next_page_token.is_empty() {
        let _ = writeln!(out, "next page: --page-token {}", r.next_page_token);
    }
    out
}

/// How many shards `node_id` leads according to the status's shard rows.
pub fn leads(s: &pb::StatusResponse, node_id: u64) -> usize {
    s.shards.iter().filter(|sh| sh.leader_id != 0 && sh.leader_id == node_id).count()
}

fn ids_cell(ids: &[u64]) -> String {
    if ids.is_empty() { "-".to_owned() } else { ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",") }
}

/// Cluster status: the shards, a blank line, then the nodes; `*` marks the node that answered.
pub fn status_table(s: &pb::StatusResponse) -> String {
    let mut shards =
        vec![["SHARD", "LEADER", "TERM", "COMMIT", "APPLIED", "VOTERS", "LEARNERS"].map(str::to_owned).to_vec()];
    for sh in &s.shards {
        shards.push(vec![
            sh.shard_id.to_string(),
            if sh.leader_id == 0 { "-".to_owned() } else { sh.leader_id.to_string() },
            sh.term.to_string(),
            sh.commit_index.to_string(),
            sh.applied_index.to_string(),
            ids_cell(&sh.voters),
            ids_cell(&sh.learners),
        ]);
    }
    let mut nodes = vec![["NODE", "ADDRESS", "PEER", "REACHABLE", "LEADS"].map(str::to_owned).to_vec()];
    for n in &s.nodes {
        let mark = if n.node_id == s.node_id { "*" } else { "" };
        nodes.push(vec![
            format!("{}{mark}", n.node_id),
            n.grpc_addr.clone(),
            n.peer_addr.clone(),
            if n.reachable { "yes" } else { "no" }.to_owned(),
            leads(s, n.node_id).to_string(),
        ]);
    }
    format!("{}\n{}", columns(&shards), columns(&nodes))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn strings(rows: &[&[&str]]) -> Vec<Vec<String>> {
        rows.iter().map(|r| r.iter().map(|c| c.to_string()).collect()).collect()
    }

    #[test]
    fn columns_are_as_wide_as_their_widest_cell_with_no_trailing_spaces() {
        let out = columns(&strings(&[&["ID", "STATE", ""], &["order-42", "PENDING", "x"], &["é", "", ""]]));
        assert_eq!(out, "ID        STATE\norder-42  PENDING  x\né\n");
        // A newline in a cell is escaped, so a row stays one line.
        assert_eq!(columns(&strings(&[&["a\nb", "c"]])), "a\\nb  c\n");
        assert_eq!(columns(&[]), "");
    }

    #[test]
    fn times_are_utc_with_milliseconds() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z"); // a leap day of a century
        // 2100 is no leap year: the day after February 28 is March 1.
        assert_eq!(utc(4_107_456_000_000), "2100-02-28T00:00:00.000Z");
        assert_eq!(utc(4_107_456_000_000 + 86_400_000), "2100-03-01T00:00:00.000Z");
        assert_eq!(utc(-1), "1969-12-31T23:59:59.999Z");
        assert!(utc(i64::MAX).ends_with(".807Z"));
        assert_eq!(time_cell(0), "-");
        assert_eq!(time_cell(1_700_000_000_123), "2023-11-14T22:13:20.123Z (1700000000123)");
    }

    #[test]
    fn data_is_text_or_hex_and_long_data_is_cut_with_its_size() {
        assert_eq!(data_cell(b""), "-");
        assert_eq!(data_cell(b"{\"sku\":\"A1\"}"), "{\"sku\":\"A1\"}");
        assert_eq!(data_cell(&[0xff, 0x00, 0x10]), "hex ff0010");
        // Valid UTF-8 but not text: hex too.
        assert_eq!(data_cell(&[0x00, 0x01]), "hex 0001");
        let long = "é".repeat(100);
        assert_eq!(data_cell(long.as_bytes()), format!("{}… (200 bytes)", "é".repeat(60)));
        assert_eq!(data_cell(&[0xfe; 31]), format!("hex {}… (31 bytes)", "fe".repeat(30)));
        assert_eq!(data_cell(&[0xfe; 30]), format!("hex {}", "fe".repeat(30)));
        assert_eq!(data_cell("x".repeat(60).as_bytes()), "x".repeat(60));
    }

    fn promise() -> pb::Promise {
        pb::Promise {
            id: "order-42".into(),
            state: pb::State::Resolved as i32,
            param: Some(pb::Value { headers: HashMap::new(), data: b"{\"sku\":\"A1\"}".to_vec() }),
            value: Some(pb::Value {
                headers: HashMap::from([("content-type".to_owned(), "text/plain".to_owned())]),
                data: vec![0xff, 0x00],
            }),
            deadline_ms: 1_700_000_600_000,
            tags: HashMap::from([("team".to_owned(), "checkout".to_owned()), ("env".to_owned(), "prod".to_owned())]),
            created_at_ms: 1_700_000_000_000,
            settled_at_ms: 0,
            revision: 7,
            ..Default::default()
        }
    }

    #[test]
    fn a_promise_is_a_key_value_table() {
        assert_eq!(
            promise_table(&promise(), true),
            "\
ID             order-42
STATE          RESOLVED
DEADLINE       2023-11-14T22:23:20.000Z (1700000600000)
CREATED        2023-11-14T22:13:20.000Z (1700000000000)
SETTLED        -
REVISION       7
TAGS           env=prod, team=checkout
PARAM          {\"sku\":\"A1\"}
VALUE          hex ff00
VALUE HEADERS  content-type=text/plain
DEDUPLICATED   yes
"
        );
        let plain = promise_table(&pb::Promise { id: "p".into(), ..Default::default() }, false);
        assert!(!plain.contains("DEDUPLICATED") && !plain.contains("HEADERS"), "{plain}");
    }

    #[test]
    fn a_search_page_is_one_row_per_promise_then_the_next_page() {
        let r = pb::SearchResponse {
            promises: vec![promise(), pb::Promise { id: "o-1".into(), state: 1, ..Default::default() }],
            next_page_token: "6f2d31".into(),
        };
        assert_eq!(
            search_table(&r),
            "\
ID        STATE     DEADLINE                  TAGS
order-42  RESOLVED  2023-11-14T22:23:20.000Z  env=prod, team=checkout
o-1       PENDING   -                         -
next page: --page-token 6f2d31
"
        );
        let last = search_table(&pb::SearchResponse { promises: vec![], next_page_token: String::new() });
        assert_eq!(last, "ID  STATE  DEADLINE  TAGS\n");
    }

    fn status() -> pb::StatusResponse {
        let shard = |shard_id, leader_id| pb::ShardStatus {
            shard_id,
            leader_id,
            term: 3,
            commit_index: 120,
            applied_index: 118,
            voters: vec![1, 2, 3],
            learners: vec![],
        };
        let node = |node_id, reachable| pb::NodeStatus {
            node_id,
            grpc_addr: format!("127.0.0.1:700{node_id}"),
            reachable,
            peer_addr: format!("127.0.0.1:710{node_id}"),
        };
        pb::StatusResponse {
            nodes: vec![node(1, true), node(2, true), node(3, false)],
            shards: vec![shard(0, 2), shard(1, 2), shard(2, 1), shard(3, 0)],
            node_id: 1,
        }
    }

    #[test]
    fn leads_counts_the_shards_a_node_leads() {
        let s = status();
        assert_eq!([leads(&s, 1), leads(&s, 2), leads(&s, 3)], [1, 2, 0]);
        // Shard 3 has no leader (0); no node leads it, not even a node numbered 0.
        assert_eq!(leads(&s, 0), 0);
    }

    #[test]
    fn status_is_a_shard_table_then_a_node_table_marking_who_answered() {
        assert_eq!(
            status_table(&status()),
            "\
SHARD  LEADER  TERM  COMMIT  APPLIED  VOTERS  LEARNERS
0      2       3     120     118      1,2,3   -
1      2       3     120     118      1,2,3   -
2      1       3     120     118      1,2,3   -
3      -       3     120     118      1,2,3   -

NODE  ADDRESS         PEER            REACHABLE  LEADS
1*    127.0.0.1:7001  127.0.0.1:7101  yes        1
2     127.0.0.1:7002  127.0.0.1:7102  yes        2
3     127.0.0.1:7003  127.0.0.1:7103  no         0
"
        );
    }

    #[test]
    fn json_output_is_the_pretty_document() {
        let out = Output::Json.render(|| serde_json::json!({"a": 1}), || unreachable!());
        assert_eq!(out, "{\n  \"a\": 1\n}\n");
        assert_eq!(Output::Table.render(|| unreachable!(), || "t\n".to_owned()), "t\n");
    }
}
