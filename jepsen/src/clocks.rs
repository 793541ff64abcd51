//! Clock faults: every host's `vowd` runs under libfaketime, reading its wall-clock offset from a
//! file of its own that the nemesis rewrites while the node runs (offsets, jumps, strobes).
//!
//! Only the wall clock (`CLOCK_REALTIME`, what vow stamps on proposals and compares deadlines
//! with) is shifted; the monotonic clocks that drive Raft's timers and tokio stay true, as they do
//! when an NTP step or a bad RTC moves a real server's wall clock. libfaketime re-reads the file
//! on every call (`FAKETIME_NO_CACHE`), ~2 µs each, so a strobe takes effect at once.
//!
//! What vow promises under skew (ARCHITECTURE.md, "bounded cluster time"): if at most `f` of a
//! shard's `2f + 1` voters run fast, no promise times out before a correct clock says it is due;
//! slow clocks only delay timeouts. The nemesis therefore moves at most a minority of clocks
//! ahead (any number back), and the checker holds every observed timeout to
//! [`EARLY_TIMEOUT_BOUND`].

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where Debian's `libfaketime` package puts the multi-threaded preload library.
pub const LIBFAKETIME: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1";

/// How much earlier than its deadline (by the harness's true clock) a promise may be seen timed
/// out: the delay between a clock reading and its use (a stamp taken, replicated and applied;
/// a peer's reading carried on a reply) on a loaded machine. Any more is the anomaly
/// `early-timeout`.
pub const EARLY_TIMEOUT_BOUND: Duration = Duration::from_millis(500);

/// Whether clock faults can be injected on this machine.
pub fn available() -> bool {
    Path::new(LIBFAKETIME).exists()
}

/// One host's shifted wall clock: the offset file libfaketime reads.
#[derive(Debug, Clone)]
pub struct FakeClock {
    file: PathBuf,
}

impl FakeClock {
    /// A clock at offset zero, kept in `dir/clock-offset`.
    pub fn create(dir: &Path) -> io::Result<Self> {
        let clock = FakeClock { file: dir.join("clock-offset") };
        clock.set_offset_ms(0)?;
        Ok(clock)
    }

    /// The environment that puts a process on this clock.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("LD_PRELOAD".into(), LIBFAKETIME.into()),
            ("FAKETIME_TIMESTAMP_FILE".into(), self.file.display().to_string()),
            ("FAKETIME_NO_CACHE".into(), "1".into()),
            ("FAKETIME_DONT_FAKE_MONOTONIC".into(), "1".into()),
        ]
    }

    /// Moves the clock to `offset_ms` from true time (negative: behind). Written to a temporary
    /// file and renamed, so a reader sees the old offset or the new one, never half a line.
    pub fn set_offset_ms(&self, offset_ms: i64) -> io::Result<()> {
        let tmp = self.file.with_extension("tmp");
        std::fs::write(&tmp, format!("{}\n", render_offset(offset_ms)))?;
        std::fs::rename(&tmp, &self.file)
    }

    /// The offset now in force, in milliseconds.
    pub fn offset_ms(&self) -> io::Result<i64> {
        let text = std::fs::read_to_string(&self.file)?;
        parse_offset(text.trim()).ok_or_else(|| io::Error::other(format!("bad clock offset {text:?}")))
    }
}

/// libfaketime's relative format: a signed number of seconds, fractions allowed ("+1.250").
fn render_offset(ms: i64) -> String {
    let sign = if ms < 0 { '-' } else { '+' };
    let abs = ms.unsigned_abs();
    format!("{sign}{}.{:03}", abs / 1000, abs % 1000)
}

/// An offset for people: `"+12.500 s"`, `"-0.250 s"`.
pub fn describe_offset(ms: i64) -> String {
    format!("{} s", render_offset(ms))
}

fn parse_offset(text: &str) -> Option<i64> {
    let secs: f64 = text.parse().ok()?;
    Some((secs * 1000.0).round() as i64)
}

/// The largest number of clocks that may run fast at once with timeouts still never early: a
/// minority of the voters (`f` of `2f + 1`).
pub fn max_fast_clocks(nodes: usize) -> usize {
    nodes.saturating_sub(1) / 2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_render_in_libfaketimes_format_and_read_back() {
        assert_eq!(render_offset(0), "+0.000");
        assert_eq!(render_offset(1250), "+1.250");
        assert_eq!(render_offset(-30_005), "-30.005");
        for ms in [0, 1, -1, 999, -1000, 3_600_000, -86_400_123] {
            assert_eq!(parse_offset(&render_offset(ms)), Some(ms));
        }
        assert_eq!(parse_offset("soon"), None);
    }

    #[test]
    fn only_a_minority_of_clocks_may_run_fast() {
        assert_eq!(max_fast_clocks(1), 0);
        assert_eq!(max_fast_clocks(3), 1);
        assert_eq!(max_fast_clocks(5), 2);
    }

    #[test]
    fn a_rewritten_offset_is_what_the_next_reader_sees() {
        let dir = tempfile::tempdir().unwrap();
        let clock = FakeClock::create(dir.path()).unwrap();
        assert_eq!(clock.offset_ms().unwrap(), 0);
        clock.set_offset_ms(-4_500).unwrap();
        assert_eq!(clock.offset_ms().unwrap(), -4_500);
        assert!(clock.env().iter().any(|(k, v)| k == "FAKETIME_TIMESTAMP_FILE" && v.ends_with("clock-offset")));
    }

    /// The mechanism itself: a process started with the clock's environment reads the shifted
    /// wall clock, and a rewrite moves it while it runs.
    #[test]
    fn a_process_on_the_fake_clock_sees_the_offset_and_its_changes() {
        if !available() {
            eprintln!("skipped: {LIBFAKETIME} missing (scripts/setup.sh installs libfaketime)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let clock = FakeClock::create(dir.path()).unwrap();
        clock.set_offset_ms(3_600_000).unwrap();
        let read = |clock: &FakeClock| -> i64 {
            let out = std::process::Command::new("date").arg("+%s").envs(clock.env()).output().unwrap();
            String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
        };
        let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
        let ahead = read(&clock) - now();
        assert!((3590..=3610).contains(&ahead), "an hour ahead, read {ahead} s");
        clock.set_offset_ms(-120_000).unwrap();
        let behind = read(&clock) - now();
        assert!((-130..=-110).contains(&behind), "two minutes behind, read {behind} s");
    }
}
