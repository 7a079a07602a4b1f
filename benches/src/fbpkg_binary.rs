//! The `fbpkg-rs` binary a benchmark runs: the one given with `--fbpkg-bin`, or a release build
//! of this workspace's sources made with cargo (a debug build would not be worth measuring).

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// `given` when set (it must be a file), otherwise [`build_release`]'s binary.
pub fn release_binary(given: Option<PathBuf>) -> io::Result<PathBuf> {
    match given {
        Some(path) if path.is_file() => Ok(path),
        Some(path) => Err(io::Error::other(format!(
            "no fbpkg-rs at {}",
            path.display()
        ))),
        None => build_release(),
    }
}

/// Run `cargo build --release -p fbpkg-peer --bin fbpkg-rs` in this workspace (cargo's own
/// output goes to stderr) and return the path of the binary cargo reports having built.
pub fn build_release() -> io::Result<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| io::Error::other("the benches crate has no parent directory"))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building fbpkg-rs: cargo build --release -p fbpkg-peer --bin fbpkg-rs");
    let out = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "-p",
            "fbpkg-peer",
            "--bin",
            "fbpkg-rs",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| {
            io::Error::other(format!(
                "running cargo (or pass --fbpkg-bin PATH to a release build of fbpkg-rs): {e}"
            ))
        })?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "cargo build --release -p fbpkg-peer failed ({}); fix the build or pass \
             --fbpkg-bin PATH",
            out.status
        )));
    }
    built_executable(&out.stdout).ok_or_else(|| {
        io::Error::other("cargo built fbpkg-rs but did not say where; pass --fbpkg-bin PATH")
    })
}

/// A child process killed (and reaped) when dropped.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free at the time of asking (the OS picks it).
pub fn free_loopback_port() -> io::Result<SocketAddr> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?.local_addr()
}

/// `bin tracker` on a free loopback port with its data in `data_dir`, quiet; returns the child
/// and the tracker's URL. Clients retry until it listens (`publish --retry-for`).
pub fn start_tracker(bin: &Path, data_dir: &Path) -> io::Result<(KillOnDrop, String)> {
    let port = free_loopback_port()?.port();
    let child = Command::new(bin)
        .args(["tracker", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--data-dir")
        .arg(data_dir)
        .env("FBPKG_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| io::Error::other(format!("starting the tracker: {e}")))?;
    Ok((KillOnDrop(child), format!("http://127.0.0.1:{port}")))
}

/// The `fbpkg-rs` executable named in cargo's `--message-format=json` output.
fn built_executable(cargo_stdout: &[u8]) -> Option<PathBuf> {
    cargo_stdout.split(|&b| b == b'\n').find_map(|line| {
        let msg = serde_json::from_slice::<serde_json::Value>(line).ok()?;
        let is_ours = msg["reason"] == "compiler-artifact" && msg["target"]["name"] == "fbpkg-rs";
        is_ours.then(|| msg["executable"].as_str().map(PathBuf::from))?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_binary_among_cargo_messages() {
        let stdout =
            br#"{"reason":"compiler-artifact","target":{"name":"fbpkg_common"},"executable":null}
not json
{"reason":"compiler-artifact","target":{"name":"fbpkg-rs"},"executable":"/t/release/fbpkg-rs"}
{"reason":"build-finished","success":true}"#;
        assert_eq!(
            built_executable(stdout),
            Some(PathBuf::from("/t/release/fbpkg-rs"))
        );
        assert_eq!(built_executable(b"{\"reason\":\"build-finished\"}"), None);
    }

    #[test]
    fn a_given_binary_must_exist() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let missing = dir.path().join("fbpkg-rs");
        assert!(release_binary(Some(missing.clone())).is_err());
        std::fs::write(&missing, b"").expect("writing a file");
        assert_eq!(release_binary(Some(missing.clone())).ok(), Some(missing));
    }
}
