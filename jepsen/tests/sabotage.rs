//! Proof that the harness catches real bugs in the real server: a `vowd` built with the
//! test-only `sabotage` feature is switched into one deliberate bug at a time, and a short run
//! must come out invalid with the anomaly that bug causes; and a cluster that refuses every write
//! must come out invalid too, although it breaks no safety rule. Every run is re-checked from its
//! stored history with `vow-jepsen check`, which must agree. Needs root, and `vowd-sabotage`
//! beside the other binaries (`scripts/test.sh` builds it).

use std::path::{Path, PathBuf};
use std::process::Command;

fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(|p| p.parent()).expect("target directory").to_path_buf()
}

/// Runs the harness against the sabotaged build and returns (exit code, results.json).
fn run(bug: &str, nemesis: &str, seed: u64) -> (Option<i32>, serde_json::Value) {
    run_with(bug, &[], nemesis, seed)
}

/// [`run`] with more environment for every vowd.
fn run_with(bug: &str, env: &[&str], nemesis: &str, seed: u64) -> (Option<i32>, serde_json::Value) {
    let sabotaged = bin_dir().join("vowd-sabotage");
    assert!(sabotaged.exists(), "{} missing: build it with scripts/test.sh", sabotaged.display());
    let mut all = vec![format!("VOW_SABOTAGE={bug}")];
    all.extend(env.iter().map(|e| e.to_string()));
    run_against(bug, &sabotaged, &all, nemesis, seed)
}

/// Runs the harness against `vowd` with `env` added for every node, re-checks the stored history
/// with `vow-jepsen check` (which must agree with the run and exit the same way), and returns
/// (exit code, results.json).
fn run_against(label: &str, vowd: &Path, env: &[String], nemesis: &str, seed: u64) -> (Option<i32>, serde_json::Value) {
    let bin = bin_dir();
    let out = tempfile::Builder::new().prefix(&format!("vow-jepsen-{label}-")).tempdir().expect("tempdir");
    let status = Command::new(bin.join("vow-jepsen"))
        .args(["test", "--nodes", "3", "--time-limit", "15", "--clients", "8", "--nemesis", nemesis])
        .args(["--seed", &seed.to_string(), "--out"])
        .arg(out.path())
        .arg("--vowd")
        .arg(vowd)
        .args(env.iter().map(|e| format!("--vowd-env={e}")))
        .status()
        .expect("running vow-jepsen");
    let text = std::fs::read_to_string(out.path().join("results.json"))
        .unwrap_or_else(|e| panic!("{label}: no results.json ({e}); exit {status:?}"));
    let recheck = Command::new(bin.join("vow-jepsen")).arg("check").arg(out.path()).output().expect("vow-jepsen check");
    let said = String::from_utf8_lossy(&recheck.stdout);
    assert!(
        said.contains("agrees with"),
        "{label}: the re-check disagrees:\n{said}{}",
        String::from_utf8_lossy(&recheck.stderr)
    );
    assert_eq!(recheck.status.code(), status.code(), "{label}: the re-check exits as the run did\n{said}");
    (status.code(), serde_json::from_str(&text).expect("results.json parses"))
}

fn kinds(results: &serde_json::Value) -> std::collections::BTreeSet<String> {
    results["anomalies"]
        .as_array()
        .map(|a| a.iter().filter_map(|x| x["kind"].as_str().map(String::from)).collect())
        .unwrap_or_default()
}

#[test]
fn every_sabotaged_build_is_caught() {
    // One test, run in sequence: the runs share the namespace names and must not overlap.
    for (bug, nemesis, expected) in [
        ("skip-settled-check", "none", &["double-settle", "nonlinearizable"][..]),
        ("stale-reads", "partition,pause", &["nonlinearizable"][..]),
        (
            "ack-before-commit",
            "kill,partition",
            &["lost-settle", "nonlinearizable", "phantom-value", "double-settle"][..],
        ),
        // Bugs only a fault reveals (each passes without it: see the test below).
        ("read-index-without-heartbeat", "partition", &["nonlinearizable", "divergence"][..]),
        // A power loss takes acknowledged but unsynced writes with it: a settlement (lost, or
        // replaced by another), a replica that cannot start again, or a pipeline's Submit or
        // input, whose acknowledged chain then never completes (a correct build completes every
        // chain under the same faults).
        (
            "ack-before-fsync",
            "power",
            &[
                "lost-settle",
                "nonlinearizable",
                "phantom-value",
                "double-settle",
                "divergence",
                "no-recovery",
                "pipeline-stuck",
            ][..],
        ),
    ] {
        // Whether a fault lands where the bug shows is a matter of timing within a short run:
        // a bug must be caught within five seeded runs (all of them reported), not in one. The
        // partition-revealed bug is caught in about 3 runs of 5 (README), so three tries missed
        // it about one CI run in 16; five miss it about one in 100.
        let mut tries = Vec::new();
        let (code, results) = loop {
            let seed = 7 + tries.len() as u64;
            let (code, results) = run(bug, nemesis, seed);
            tries.push(seed);
            if results["valid"] == false || tries.len() == 5 {
                break (code, results);
            }
            println!("{bug}: seed {seed} did not catch it; next seed");
        };
        let found = kinds(&results);
        println!(
            "{bug}: exit {code:?}, anomalies {found:?}, summary ok={} info={}, caught on try {} of seeds {tries:?}",
            results["ok"],
            results["info"],
            tries.len()
        );
        assert_eq!(results["valid"], false, "{bug} went unnoticed with seeds {tries:?}");
        assert_eq!(code, Some(1), "{bug}: an invalid run exits 1");
        assert!(
            found.iter().any(|k| expected.contains(&k.as_str())),
            "{bug}: expected one of {expected:?}, got {found:?}"
        );
    }
}

/// The bugs that only a fault reveals pass when that fault is missing: an acknowledgement before
/// the fsync survives `kill -9` (the OS has the data), and a leader that skips the heartbeat
/// round before a read is right as long as it is still the leader (a kill leaves no stale leader
/// behind; a pause would). So what catches them above is
/// the power loss and the partition, not something else in the run.
///
/// Leader balancing stays off for the second: a balancing transfer hands a shard to another node
/// while the old leader still serves reads until it hears of the new term — a stale leader
/// without any fault, which this bug turns into a stale read (seen in one CI run in several).
#[test]
fn the_bugs_only_faults_reveal_pass_without_them() {
    for (bug, env, nemesis) in [
        ("ack-before-fsync", &[][..], "kill,pause"),
        ("read-index-without-heartbeat", &["VOW_NO_LEADER_BALANCE=true"][..], "kill"),
    ] {
        let (code, results) = run_with(bug, env, nemesis, 7);
        println!("{bug} under {nemesis}: exit {code:?}, anomalies {:?}", kinds(&results));
        assert_eq!(results["valid"], true, "{bug} under {nemesis} was reported invalid: {:?}", kinds(&results));
        assert_eq!(code, Some(0));
    }
}

#[test]
fn a_cluster_that_refuses_every_write_is_invalid() {
    // Every write the workload sends carries an idempotency key of several bytes; with a limit of
    // one byte the real vowd answers every create and settle INVALID_ARGUMENT, a definite refusal,
    // and every read NOT_FOUND. Nothing in that history is unsafe: only liveness can fail it.
    let config = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(config.path(), "[limits]\nmax_idempotency_key_bytes = 1\n").expect("writing the config");
    let vowd = bin_dir().join("vowd");
    let env = format!("VOW_CONFIG={}", config.path().display());
    // And the sabotaged build whose every write path refuses (UNAVAILABLE, a definite refusal).
    let configured = run_against("refuse-writes-config", &vowd, &[env], "none", 7);
    let sabotaged = run("refuse-writes", "none", 7);
    for (label, (code, results)) in [("config", configured), ("sabotage", sabotaged)] {
        let found = kinds(&results);
        println!("refuse-writes ({label}): exit {code:?}, anomalies {found:?}, writes {}", results["writes"]);
        assert_eq!(results["writes"]["ok"], 0, "{label}: the cluster was meant to refuse every write");
        // The configured refusal is definite (INVALID_ARGUMENT, `fail`); the sabotage answers
        // UNAVAILABLE, which the SDK retries until the call's deadline and the workload records
        // as `info`: fewer, slower attempts, but attempts all the same.
        let attempted =
            results["writes"]["fail"].as_u64().unwrap_or(0) + results["writes"]["info"].as_u64().unwrap_or(0);
        assert!(attempted > 20, "{label}: the clients kept writing: {}", results["writes"]);
        assert_eq!(results["valid"], false, "{label}: a cluster that takes no write passed");
        assert_eq!(code, Some(1), "{label}: an invalid run exits 1");
        assert_eq!(found, std::collections::BTreeSet::from(["no-progress".to_owned()]), "{label}");
    }
}
