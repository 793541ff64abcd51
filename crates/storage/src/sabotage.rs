//! The deliberate bugs that live in the storage engine, for proving that the consistency
//! checker catches real ones (issues #3 and #14); `vow-server`'s `sabotage` module has the
//! others and the whole list.
//!
//! Compiled only with the `sabotage` cargo feature, which `vow-server`'s feature of the same
//! name turns on and no default build enables; without it [`enabled`] is a constant `false` and
//! the sabotage branches are compiled out. With it, the comma-separated `VOW_SABOTAGE`
//! environment variable switches on `skip-settled-check` (a settle overwrites an already settled
//! promise), `ack-before-fsync` (log appends are acknowledged once the OS has them, unsynced)
//! and `drop-snapshot-announcements` (waiters are not told that a snapshot replaced the state).

#[cfg(feature = "sabotage")]
pub fn enabled(bug: &str) -> bool {
    static BUGS: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BUGS.get_or_init(|| std::env::var("VOW_SABOTAGE").unwrap_or_default()).split(',').any(|b| b.trim() == bug)
}

#[cfg(not(feature = "sabotage"))]
#[inline(always)]
pub const fn enabled(_bug: &str) -> bool {
    false
}
