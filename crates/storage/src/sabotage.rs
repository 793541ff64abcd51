//! The one deliberate bug that lives in the storage engine, for proving that the consistency
//! checker catches real ones (issue #3); `vow-server`'s `sabotage` module has the others and the
//! whole list.
//!
//! Compiled only with the `sabotage` cargo feature, which `vow-server`'s feature of the same
//! name turns on and no default build enables; without it [`enabled`] is a constant `false` and
//! the sabotage branch is compiled out. With it, `skip-settled-check` in the comma-separated
//! `VOW_SABOTAGE` environment variable lets a settle overwrite an already settled promise.

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
