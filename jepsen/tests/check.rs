//! `vow-jepsen check DIR` re-checks the history a run stored: it reaches the verdict the run
//! reached, notices when it does not, and checks the history of an aborted run as far as it goes.
//! (The sabotage runs re-check real runs the same way.)

use std::path::Path;
use std::process::Command;

use vow_jepsen::checker;
use vow_jepsen::history::{self, Entry, NemesisEvent, Op, OpKind, Outcome, Register};
use vow_jepsen::report::{self, Results, Setup};

fn setup() -> Setup {
    Setup { seed: 3, nodes: 3, shards: 1, time_limit_secs: 1, nemeses: vec!["kill".into()], clients: 2 }
}

/// An op as a client or the final reads record it.
fn op(id: u64, kind: OpKind, key: &str, span: (u64, u64), outcome: Outcome, observed: Option<Register>) -> Op {
    let value = matches!(kind, OpKind::Resolve | OpKind::Reject).then(|| format!("v{id}"));
    let node = matches!(kind, OpKind::FinalRead).then_some(1);
    Op {
        id,
        process: id % 2,
        kind,
        key: key.into(),
        value,
        invoke_ns: span.0,
        complete_ns: span.1,
        outcome,
        observed,
        deduplicated: false,
        node,
        detail: String::new(),
        deadline: None,
        tags: Default::default(),
        search: None,
    }
}

/// A run's history: key "a" is fine; key "b" was created, acknowledged, and is gone at the end.
fn entries() -> Vec<Entry> {
    let v1 = Register::Resolved { value: "v1".into() };
    vec![
        Entry::Setup(setup()),
        Entry::Op(op(0, OpKind::Create, "a", (0, 10), Outcome::Ok, Some(Register::Pending))),
        Entry::Nemesis(NemesisEvent { at_ns: 12, action: "kill".into(), detail: "node 2".into(), nodes: vec![2] }),
        Entry::Op(op(1, OpKind::Resolve, "a", (20, 30), Outcome::Ok, Some(v1.clone()))),
        Entry::Nemesis(NemesisEvent {
            at_ns: 35,
            action: "heal".into(),
            detail: "restarted [2]".into(),
            nodes: Vec::new(),
        }),
        Entry::Op(op(2, OpKind::Create, "b", (40, 50), Outcome::Ok, Some(Register::Pending))),
        Entry::Op(op(3, OpKind::FinalRead, "a", (60, 61), Outcome::Ok, Some(v1))),
        Entry::Op(op(4, OpKind::FinalRead, "b", (62, 63), Outcome::Ok, Some(Register::Absent))),
    ]
}

fn store(dir: &Path, entries: &[Entry]) {
    let mut file = history::Writer::create(dir).expect("creating the history");
    for entry in entries {
        file.append(entry).expect("appending to the history");
    }
}

/// Runs `vow-jepsen check DIR`: (exit code, stdout, stderr).
fn check(dir: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vow-jepsen"))
        .arg("check")
        .arg(dir)
        .output()
        .expect("running vow-jepsen check");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[test]
fn a_stored_run_is_rechecked_to_the_verdict_the_run_reached() {
    let dir = tempfile::tempdir().unwrap();
    let entries = entries();
    store(dir.path(), &entries);
    // A node that panicked once, as its log shows.
    std::fs::create_dir(dir.path().join("n2")).unwrap();
    std::fs::write(dir.path().join("n2/vowd.log"), "INFO vowd started\nthread 'main' panicked at src/x.rs:1:1:\n")
        .unwrap();
    // What the run found, judged from the ops it collected in memory.
    let ops: Vec<Op> =
        entries.iter().filter_map(|e| if let Entry::Op(op) = e { Some(op.clone()) } else { None }).collect();
    let events: Vec<NemesisEvent> =
        entries.iter().filter_map(|e| if let Entry::Nemesis(ev) = e { Some(ev.clone()) } else { None }).collect();
    let mut anomalies = checker::check_run(&ops, &events);
    anomalies.extend(vow_jepsen::run::log_anomalies(dir.path()));
    let kinds: Vec<&str> = anomalies.iter().map(|a| a.kind.as_str()).collect();
    assert_eq!(kinds, ["nonlinearizable", "node-panic"], "{anomalies:#?}");
    let results = Results::new(&ops, anomalies, events, setup());
    assert_eq!((results.ops, results.final_reads, results.writes.ok, results.ok_writes_after_heal), (3, 2, 3, 1));
    report::write_all(dir.path(), &results, &ops).unwrap();

    let (code, stdout, stderr) = check(dir.path());
    assert_eq!(code, Some(1), "an invalid run re-checks invalid\n{stdout}{stderr}");
    assert!(stdout.contains("valid=false ops=3"), "{stdout}");
    assert!(stdout.contains("agrees with"), "{stdout}");
    assert!(stdout.contains("nonlinearizable b:"), "{stdout}");

    // A results.json the history does not bear out is called out.
    let mut tampered: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(report::RESULTS)).unwrap()).unwrap();
    tampered["valid"] = true.into();
    tampered["anomalies"] = serde_json::json!([]);
    std::fs::write(dir.path().join(report::RESULTS), tampered.to_string()).unwrap();
    let (code, _, stderr) = check(dir.path());
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("DISAGREES"), "{stderr}");
}

#[test]
fn the_history_of_an_aborted_run_is_checked_as_far_as_it_goes() {
    let dir = tempfile::tempdir().unwrap();
    // The run died after three entries, in the middle of writing the fourth; no results.json.
    let entries = entries();
    store(dir.path(), &entries[..4]);
    let torn = serde_json::to_string(&entries[4]).unwrap();
    let mut text = std::fs::read_to_string(dir.path().join(history::FILE)).unwrap();
    text.push_str(&torn[..torn.len() / 2]);
    std::fs::write(dir.path().join(history::FILE), text).unwrap();

    let stored = history::read(dir.path()).unwrap();
    assert!(stored.torn_tail);
    assert_eq!((stored.ops.len(), stored.events.len()), (2, 1));
    let (code, stdout, stderr) = check(dir.path());
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("last line was cut short"), "{stdout}");
    assert!(stdout.contains("valid=true ops=2"), "{stdout}");
    assert!(stdout.contains("nothing to compare with"), "{stdout}");

    // A bad line in the middle is not a torn tail: the file is not a history.
    std::fs::write(dir.path().join(history::FILE), "{\"type\":\"op\"}\n{}\n").unwrap();
    assert!(history::read(dir.path()).is_err());
    assert_eq!(check(dir.path()).0, Some(2));
}
