//! How the process's allocator keeps memory: one glibc malloc arena, not one per thread.
//!
//! glibc gives each thread that allocates an arena of its own (up to 8 per core), and memory a
//! thread frees goes back to the arena it came from, kept there for that arena's next
//! allocations. An agent's threads are the runtime's workers and the blocking pool's (disk
//! writes, hashing, reads that may wait, compression), which come and go; each arena holds on
//! to what its busiest moment took, so the agent's resident memory is the sum of those peaks.
//! With one arena, what any thread freed is what the next allocation anywhere takes.
//!
//! Measured in `b3` (48 agents, 48 connections each), alternating, two runs each: this call
//! against glibc's default, peak RSS per leecher median 27.1-27.6 MiB (max 30.3-30.5) against
//! 33.1-33.3 (35.7-37.1), the seed 21.5-21.9 against 27.7-28.7 MiB, T_last 39.8-40.4 s
//! against 40.4-40.9, 73.4-73.6 CPU s against 74.9. Set through `GLIBC_TUNABLES` instead (the
//! build before): one arena 25.8-26.6 MiB, two 28.3, the default 32.2; faults on fresh pages
//! over a run 362k-367k, 390k-396k and 441k-443k (every process); time and CPU within the
//! runs' spread. The workspace denies `unsafe`; this one call is allowed. The agent allocates
//! mostly whole buffers (socket reads, upload batches, 16 KiB blocks), a few hundred thousand
//! a second at most, which one arena's lock serves on any number of cores; small allocations
//! do not take it at all (glibc's per-thread cache).
//!
//! An operator who sets glibc's own knob (`MALLOC_ARENA_MAX`, or `glibc.malloc.arena_max` in
//! `GLIBC_TUNABLES`) keeps theirs.

use std::ffi::OsString;

/// glibc malloc arenas for the whole process.
const ARENAS: i32 = 1;

/// Limit glibc's malloc to [`ARENAS`] arenas, unless the environment sets the limit itself.
/// Called first thing in `main`, before any other thread starts. `true`: the limit was set.
pub(crate) fn one_arena() -> bool {
    if operator_set(|k| std::env::var_os(k)) {
        return false;
    }
    set_arena_max(ARENAS)
}

/// Whether `var` (the environment) sets glibc's arena limit itself.
fn operator_set(var: impl Fn(&str) -> Option<OsString>) -> bool {
    var("MALLOC_ARENA_MAX").is_some()
        || var("GLIBC_TUNABLES").is_some_and(|t| {
            t.to_string_lossy()
                .split(':')
                .any(|kv| kv.trim_start().starts_with("glibc.malloc.arena_max"))
        })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_arena_max(n: i32) -> bool {
    // SAFETY: `mallopt` sets a parameter of glibc's allocator; it takes glibc's own locks and
    // touches no memory of ours, so it is sound at any time, and here no other thread runs yet.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, n) == 1 }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_: i32) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<OsString> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| OsString::from(v))
        }
    }

    #[test]
    fn an_operators_own_arena_limit_stands() {
        assert!(!operator_set(env(&[])));
        assert!(operator_set(env(&[("MALLOC_ARENA_MAX", "4")])));
        assert!(operator_set(env(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.trim_threshold=1:glibc.malloc.arena_max=8"
        )])));
        assert!(!operator_set(env(&[(
            "GLIBC_TUNABLES",
            "glibc.malloc.trim_threshold=1"
        )])));
    }

    /// glibc takes the limit (elsewhere there is nothing to set).
    #[test]
    fn glibc_takes_the_limit() {
        assert_eq!(
            set_arena_max(ARENAS),
            cfg!(all(target_os = "linux", target_env = "gnu"))
        );
    }
}
