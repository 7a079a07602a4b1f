//! Memory written and freed before a run's first contender, so that it starts on memory as
//! recently used as the later contenders' (the CPU mode and every scenario; `--no-warm-memory`
//! skips it).

/// Write up to `bytes` of zeros into a file in `dir` and remove it; how many were written.
///
/// A run writes its downloads into new tmpfs pages. On a VM whose host backs guest memory
/// lazily and takes freed memory back (free page reporting), memory idle for a while costs
/// many times a copy to write into, and memory just freed does not: without this, the first
/// contender of a run takes the idle memory and every later one the memory the one before it
/// freed (`benches/fresh_pages.sh` measures both). Stops early, quietly, when the file system
/// is full: what fits is warmed.
fn warm_memory(dir: &std::path::Path, bytes: u64) -> u64 {
    use std::io::Write;
    const CHUNK: usize = 1 << 20;
    let path = dir.join("warm-memory");
    let mut written = 0u64;
    if let Ok(mut f) = std::fs::File::create(&path) {
        let zeros = vec![0u8; CHUNK];
        while written < bytes {
            let n = CHUNK.min(usize::try_from(bytes - written).unwrap_or(CHUNK));
            if f.write_all(&zeros[..n]).is_err() {
                break;
            }
            written += n as u64;
        }
    }
    let _ = std::fs::remove_file(&path);
    written
}

/// [`warm_memory`] of `bytes` in `dir`, logged with how long it took: what the CPU mode (`what`
/// = "cpu mode") and every scenario (its name) do before their first contender, unless
/// `--no-warm-memory`.
pub fn before_first(dir: &std::path::Path, bytes: u64, what: &str) {
    let started = std::time::Instant::now();
    let warmed = warm_memory(dir, bytes);
    eprintln!(
        "swarm_bench: {what}: {} of memory written and freed before the first contender \
         ({:.1} s)",
        fbpkg_benches::swarm::report::size(warmed),
        started.elapsed().as_secs_f64()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warming_writes_what_it_says_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = (3 << 20) + 5;
        assert_eq!(warm_memory(dir.path(), bytes), bytes);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let gone = dir.path().join("no-such-dir");
        assert_eq!(
            warm_memory(&gone, bytes),
            0,
            "nowhere to write: nothing warmed"
        );
    }
}
