//! A throwaway certificate authority, a server certificate for 127.0.0.1 and a client
//! certificate, made with the `openssl` tool, for the tests of TLS to Redis and PostgreSQL.

use std::io;
use std::path::Path;
use std::process::Command;

/// Whether the `openssl` tool runs (the TLS tests skip, saying so, without it).
pub fn openssl_available() -> bool {
    let ok = Command::new("openssl").arg("version").output().is_ok();
    if !ok {
        eprintln!("SKIPPED: openssl is not installed (apt-get install openssl)");
    }
    ok
}

/// Write `ca.pem` (the CA), `server.pem` and `server.key` (for IP 127.0.0.1), and
/// `client.pem` and `client.key` (CN `fbpkg`, for servers that ask clients for a
/// certificate), both signed by the CA and valid two days, into `dir`.
pub fn make(dir: &Path) -> io::Result<()> {
    std::fs::write(dir.join("san.ext"), "subjectAltName=IP:127.0.0.1\n")?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let subject = ["-days", "2", "-subj", "/CN=fbpkg-test"];
    run(
        Command::new("openssl")
            .args(["req", "-x509"])
            .args(ec)
            .args(["-keyout", "ca.key", "-out", "ca.pem"])
            .args(subject),
        dir,
    )?;
    run(
        Command::new("openssl")
            .arg("req")
            .args(ec)
            .args(["-keyout", "server.key", "-out", "server.csr"])
            .args(subject),
        dir,
    )?;
    run(
        Command::new("openssl").args([
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ]),
        dir,
    )?;
    run(
        Command::new("openssl")
            .arg("req")
            .args(ec)
            .args(["-keyout", "client.key", "-out", "client.csr"])
            .args(["-days", "2", "-subj", "/CN=fbpkg"]),
        dir,
    )?;
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
    run(
        Command::new("openssl").args([
            "x509",
            "-req",
            "-in",
            "client.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "client.pem",
            "-days",
            "2",
            "-extfile",
            "client.ext",
        ]),
        dir,
    )
}

/// Run one `openssl` command in `dir`; its stderr in the error when it fails.
fn run(cmd: &mut Command, dir: &Path) -> io::Result<()> {
    let out = cmd.current_dir(dir).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}
