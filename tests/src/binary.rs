//! The `fbpkg-rs` binary the scenarios run, built from the sources under test.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Longest the `cargo build` of the binary may take (a cold build of the agent included).
const BUILD_TIMEOUT: Duration = Duration::from_secs(900);

/// The `fbpkg-rs` binary of the profile these tests were built with, up to date.
///
/// `$FBPKG_RS_BIN` wins when set. Otherwise this runs `cargo build -p fbpkg-peer --bin fbpkg-rs`
/// for the test's own profile and target directory, once per test process, and returns
/// `target/<profile>/fbpkg-rs`. Neither `cargo test -p fbpkg-tests` nor `cargo test
/// --workspace` (when `fbpkg-peer` has no integration tests) rebuilds that binary, and a stale
/// one would test yesterday's tracker; when it is fresh the build is a no-op taking well under
/// a second.
///
/// Panics with the reason when it can be neither found nor built.
pub fn fbpkg_rs_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| locate().unwrap_or_else(|e| panic!("fbpkg-rs binary: {e}")))
        .clone()
}

fn locate() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("FBPKG_RS_BIN") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("$FBPKG_RS_BIN={} is not a file", path.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("{} is not under target/<profile>/deps", exe.display()))?;
    build(profile_dir)?;
    let binary = profile_dir.join(format!("fbpkg-rs{}", std::env::consts::EXE_SUFFIX));
    if binary.is_file() {
        Ok(binary)
    } else {
        Err(format!("{} is missing after cargo build", binary.display()))
    }
}

fn build(profile_dir: &Path) -> Result<(), String> {
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| format!("{} has no parent", profile_dir.display()))?;
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") => "dev",
        Some(other) => other,
        None => return Err(format!("no profile name in {}", profile_dir.display())),
    };
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut child = Command::new(&cargo)
        .args(["build", "--quiet", "-p", "fbpkg-peer", "--bin", "fbpkg-rs"])
        .args(["--profile", profile])
        .arg("--manifest-path")
        .arg(&manifest)
        .arg("--target-dir")
        .arg(target_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|e| format!("running {}: {e}", Path::new(&cargo).display()))?;
    let deadline = Instant::now() + BUILD_TIMEOUT;
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(format!(
                    "`cargo build -p fbpkg-peer --bin fbpkg-rs` failed ({status}); its errors are \
                     above. Set FBPKG_RS_BIN to run these tests against a prebuilt binary"
                ));
            }
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "cargo build of fbpkg-rs took over {BUILD_TIMEOUT:?}"
                ));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => return Err(format!("waiting for cargo: {e}")),
        }
    }
}
