#![allow(clippy::unwrap_used)]
//! An agent answers its control socket before it has re-hashed the partial downloads a
//! previous run left behind: a `get` that arrives meanwhile reaches the agent and joins the
//! one download of that package, instead of starting a second, standalone one beside it.

use std::ffi::OsString;
use std::io::Read;
use std::time::Duration;

use fbpkg_common::metainfo::{Format, Metainfo};
use fbpkg_tests::{AgentProcess, fbpkg_rs, wait_for};

/// 1 GiB: re-hashing it takes the agent a noticeable moment after it starts.
const PARTIAL_BYTES: u64 = 1 << 30;

/// Cheap bytes that are not zeros, so a sparse (all-zero) partial file verifies nothing.
struct Pattern(u64);

impl Read for Pattern {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        for chunk in buf.chunks_mut(8) {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1);
            let bytes = self.0.to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
        Ok(buf.len())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_socket_answers_while_partial_downloads_are_rehashed() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    // Nothing listens there: the download stays partial, which is all this test needs.
    let tracker = "http://127.0.0.1:9";
    let meta = Metainfo::build(
        Pattern(7).take(PARTIAL_BYTES),
        PARTIAL_BYTES,
        "big.bin",
        &format!("{tracker}/announce"),
        Format::File,
    )
    .unwrap();
    let state = base.join("state");
    let work = state.join("downloads").join(meta.info_hash.to_hex());
    std::fs::create_dir_all(&work).unwrap();
    std::fs::write(work.join("metainfo.torrent"), meta.as_bytes()).unwrap();
    std::fs::write(work.join("package"), "big").unwrap();
    std::fs::File::create(work.join("data.part"))
        .unwrap()
        .set_len(PARTIAL_BYTES)
        .unwrap();

    let agent = AgentProcess::start(&state, &base.join("cache"), tracker, &[])
        .await
        .unwrap();
    // `get` of the package being resumed: it must go to the agent and wait for the one owner.
    let mut args: Vec<OsString> = vec![
        "get".into(),
        format!("big:{}", meta.sha256).into(),
        "--stall-timeout".into(),
        "1s".into(),
    ];
    args.extend(agent.host_args());
    let out = fbpkg_rs(args, Duration::from_secs(120)).await;
    assert_eq!(out.code, Some(5), "{out}");
    assert!(
        out.stderr.contains("the agent keeps trying"),
        "the get did not go through the agent: {out}"
    );
    assert_eq!(
        out.stderr.matches("no peers").count(),
        1,
        "the reason is said once: {out}"
    );
    let lines = wait_for(
        "the agent to finish resuming",
        Duration::from_secs(60),
        || async {
            let lines = agent.log_lines();
            if lines
                .iter()
                .any(|l| l.contains("partial downloads resumed"))
            {
                Ok(lines)
            } else {
                Err(agent.log_tail())
            }
        },
    )
    .await;
    let ready = lines.iter().position(|l| l.contains("agent ready"));
    let resumed = lines
        .iter()
        .position(|l| l.contains("partial downloads resumed"));
    assert!(
        ready < resumed,
        "the control socket was bound only after resuming: {lines:#?}"
    );
    let status = agent.status().await.unwrap();
    assert_eq!(status.len(), 1, "one download of the package: {status:#?}");
    let strays: Vec<_> = std::fs::read_dir(&state)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("get-"))
        .collect();
    assert!(strays.is_empty(), "a standalone download ran: {strays:?}");
}
