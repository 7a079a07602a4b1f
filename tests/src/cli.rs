//! `fbpkg-rs` client commands (`get`, `publish`, `status`) run as child processes with a
//! deadline, in an environment the operator's `FBPKG_*` variables cannot reconfigure.

use std::ffi::OsStr;
use std::fmt;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::binary::fbpkg_rs_binary;

/// How a finished `fbpkg-rs` command exited and what it printed.
#[derive(Debug, Clone)]
pub struct CliOutput {
    /// The exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl CliOutput {
    /// Exited 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// stdout without surrounding whitespace: the one line `get` and `publish` print.
    pub fn line(&self) -> &str {
        self.stdout.trim()
    }
}

impl fmt::Display for CliOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit code {:?}\n--- stdout\n{}--- stderr\n{}---",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Remove every `FBPKG_*` variable and `RUST_LOG` from a child's environment, so only the
/// flags the scenario passes configure it.
pub fn clean_env(cmd: &mut Command) -> &mut Command {
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("FBPKG_") {
            cmd.env_remove(&key);
        }
    }
    cmd.env_remove("RUST_LOG").env("NO_COLOR", "1")
}

/// `fbpkg-rs` with a clean environment and stdin closed; stdout and stderr are piped.
pub fn fbpkg_rs_command() -> Command {
    let mut cmd = Command::new(fbpkg_rs_binary());
    clean_env(&mut cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// [`fbpkg_rs`] with `args` as literals followed by `tail` (paths, host flags): how the
/// scenario tests spell a command and the host it runs as.
pub async fn fbpkg_rs_then(
    args: &[&str],
    tail: &[std::ffi::OsString],
    timeout: Duration,
) -> CliOutput {
    let all = args
        .iter()
        .map(std::ffi::OsString::from)
        .chain(tail.iter().cloned());
    fbpkg_rs(all, timeout).await
}

/// Run `fbpkg-rs ARGS` to completion. Panics when it cannot be started or takes longer than
/// `timeout` (it is killed first).
pub async fn fbpkg_rs<I, S>(args: I, timeout: Duration) -> CliOutput
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut std_cmd = fbpkg_rs_command();
    std_cmd.args(args);
    let shown = format!("{std_cmd:?}");
    let mut cmd = tokio::process::Command::from(std_cmd);
    cmd.kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) => CliOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        },
        Ok(Err(e)) => panic!("waiting for {shown}: {e}"),
        // Dropping the future dropped the child, which kill_on_drop SIGKILLs.
        Err(_) => panic!("{shown} did not finish within {timeout:?}"),
    }
}

/// Publish `contents` as versions of `name` from a host (`host`: its `--state-dir`,
/// `--cache-dir` and `--tracker` flags) with `token`, each written to `dir/v<i>.bin` first;
/// the first is tagged `first_tag` if given. The versions' hashes, in order.
pub async fn publish_versions(
    dir: &std::path::Path,
    name: &str,
    contents: &[Vec<u8>],
    first_tag: Option<&str>,
    token: &str,
    host: &[std::ffi::OsString],
) -> Vec<String> {
    let mut hashes = Vec::new();
    for (i, bytes) in contents.iter().enumerate() {
        let file = dir.join(format!("v{}.bin", i + 1));
        std::fs::write(&file, bytes).expect("write a version");
        let path = file.to_str().expect("a UTF-8 temp path");
        let mut args = vec!["publish", name, path, "--publish-token", token];
        if let (0, Some(t)) = (i, first_tag) {
            args.extend(["--tag", t]);
        }
        let out = fbpkg_rs_then(&args, host, Duration::from_secs(60)).await;
        assert!(out.success(), "publish v{}: {out}", i + 1);
        let hash = out
            .line()
            .strip_prefix(&format!("{name}:"))
            .unwrap_or_else(|| panic!("publish printed no {name}:<hash>: {out}"));
        hashes.push(hash.to_owned());
    }
    hashes
}
