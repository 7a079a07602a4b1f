#![allow(clippy::unwrap_used)]
//! `fbpkg-rs run` as real processes: the package's program replaces `run`.
//!
//! - A file package (a `#!/bin/sh` probe) gets its arguments verbatim (spaces, an empty one,
//!   `--flag` and `--` lookalikes, UTF-8), `FBPKG_PACKAGE_DIR` and `FBPKG_PACKAGE_REF`, runs
//!   as the very process that was started (its `$$` is run's pid), with SIGPIPE at its default;
//!   its exit status (7) is run's, and when it kills itself with SIGTERM, run's status says
//!   signal 15.
//! - A directory package runs its entrypoint (a symlink inside the tree to the real script),
//!   with the tree as `FBPKG_PACKAGE_DIR`; without an entrypoint, run fails (126) saying how
//!   to publish one; `publish --entrypoint` refuses a missing, non-executable, escaping path
//!   and a file package (2).
//! - With the tracker gone: an exact hash runs with no connection to the stand-in listener
//!   (and, under strace when it is installed, not one `socket()` call before the program);
//!   a tag runs what this host last resolved it to, with a warning.
//! - exec failures: a `#!` interpreter that does not exist exits 127 naming it; a file package
//!   without its execute bit exits 126 naming its format.
//! - A Python zipapp runs (skipped with a note when python3 is missing).
//! - While a run program is running, its version is in use (`Cache::in_use`, `try_claim`
//!   refused) and counted as a launch; once it has exited, it is not.
//! - A version not in the cache is fetched first, through the host's agent, then run.

use std::ffi::OsString;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{PermissionsExt, symlink};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use fbpkg_common::Sha256Hash;
use fbpkg_common::pkgref::PackageName;
use fbpkg_peer::cache::Cache;
use fbpkg_tests::{
    AgentProcess, CliOutput, TrackerProcess, fbpkg_rs_command, fbpkg_rs_then, host_args, wait_for,
};

/// Longest one client command may take (a small package, at most through an agent).
const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// Prints what it was given, then does what its first argument says.
const PROBE: &str = r#"#!/bin/sh
printf 'argc=%s\n' "$#"
for a in "$@"; do printf '[%s]\n' "$a"; done
printf 'dir=%s\nref=%s\npid=%s\n' "$FBPKG_PACKAGE_DIR" "$FBPKG_PACKAGE_REF" "$$"
grep '^SigIgn:' /proc/self/status
case "$1" in
  exit7) exit 7 ;;
  term) kill -TERM $$; sleep 5; exit 99 ;;
esac
exit 0
"#;

async fn cli(args: &[&str], host: &[OsString]) -> CliOutput {
    fbpkg_rs_then(args, host, CLI_TIMEOUT).await
}

/// How a finished `fbpkg-rs run` (its program, really) ended.
struct Ran {
    pid: u32,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Ran {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?}\n--- stdout\n{}--- stderr\n{}---",
            self.status, self.stdout, self.stderr
        )
    }
}

/// `fbpkg-rs run REFERENCE HOST -- ARGS`, to completion.
async fn run(reference: &str, host: &[OsString], args: &[&str]) -> Ran {
    let mut cmd = fbpkg_rs_command();
    cmd.arg("run")
        .arg(reference)
        .args(host)
        .arg("--")
        .args(args);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    let pid = child.id().unwrap();
    let out = tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output())
        .await
        .expect("run finishes")
        .unwrap();
    Ran {
        pid,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `fbpkg-rs publish NAME PATH EXTRA HOST`, returning `name:<sha256>`.
async fn publish(name: &str, path: &Path, extra: &[&str], host: &[OsString]) -> String {
    let mut args = vec!["publish", name, path.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = cli(&args, host).await;
    assert!(out.success(), "publish {name}: {out}");
    let line = out.line().to_owned();
    assert!(line.starts_with(&format!("{name}:")), "{out}");
    line
}

fn split(reference: &str) -> (PackageName, Sha256Hash) {
    let (n, h) = reference.split_once(':').unwrap();
    (
        PackageName::new(n).unwrap(),
        Sha256Hash::from_hex(h).unwrap(),
    )
}

fn write_exe(path: &Path, body: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, body).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

fn field<'a>(stdout: &'a str, key: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_else(|| panic!("no {key} in {stdout}"))
}

/// The program ran as the process `run` was started as, with SIGPIPE not ignored (Rust
/// ignores it; exec must give the program the default back).
fn assert_ran_in_place(ran: &Ran) {
    assert_eq!(field(&ran.stdout, "pid="), ran.pid.to_string(), "{ran}");
    let ignored = u64::from_str_radix(field(&ran.stdout, "SigIgn:").trim(), 16).unwrap();
    // Bit n-1 of the mask is signal n; SIGPIPE is 13 on Linux.
    assert_eq!(ignored & (1 << (13 - 1)), 0, "SIGPIPE ignored: {ran}");
}

/// A listener standing in for the tracker: any connection to it is a failure of the test.
fn silent_listener() -> (TcpListener, String) {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    l.set_nonblocking(true).unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

fn assert_untouched(l: &TcpListener) {
    match l.accept() {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        Ok((_, peer)) => panic!("run connected to the tracker from {peer}"),
        Err(e) => panic!("accept: {e}"),
    }
}

fn on_path(program: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_is_the_program_arguments_status_signals_environment() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let tracker = TrackerProcess::start(&base.join("tracker")).unwrap();
    let host = host_args(
        &base.join("state"),
        &base.join("cache"),
        &tracker.base_url(),
    );
    let probe = base.join("probe.sh");
    write_exe(&probe, PROBE);
    let reference = publish("probe", &probe, &[], &host).await;
    let (name, sha) = split(&reference);
    let entry_dir = base.join("cache/probe").join(sha.to_hex());

    let args = [
        "plain",
        "with space",
        "",
        "--flag",
        "-x",
        "--",
        "ünï code",
        "a\"b'c",
    ];
    let ran = run(&reference, &host, &args).await;
    assert_eq!(ran.status.code(), Some(0), "{ran}");
    let mut expected = format!("argc={}\n", args.len());
    for a in args {
        expected.push_str(&format!("[{a}]\n"));
    }
    assert!(ran.stdout.starts_with(&expected), "{ran}");
    assert_eq!(
        Path::new(field(&ran.stdout, "dir=")),
        std::path::absolute(&entry_dir).unwrap(),
        "{ran}"
    );
    assert_eq!(field(&ran.stdout, "ref="), reference, "{ran}");
    assert_ran_in_place(&ran);
    assert!(ran.stderr.is_empty(), "run said something: {ran}");

    let ran = run(&reference, &host, &["exit7"]).await;
    assert_eq!(ran.status.code(), Some(7), "{ran}");
    let ran = run(&reference, &host, &["term"]).await;
    assert_eq!(ran.status.signal(), Some(15), "{ran}");
    assert_eq!(ran.status.code(), None, "{ran}");

    let cache = Cache::new(base.join("cache"));
    assert_eq!(cache.launches(&name, &sha), 3);
    assert!(!cache.in_use(&name, &sha));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_entrypoints_offline_runs_and_exec_failures() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let mut tracker = TrackerProcess::start(&base.join("tracker")).unwrap();
    let url = tracker.base_url();
    let state = base.join("state");
    let host = host_args(&state, &base.join("cache"), &url);

    // A tree whose entrypoint is a link to the real script, which reads a file beside it.
    let tree = base.join("app");
    write_exe(
        &tree.join("libexec/app-1.0"),
        "#!/bin/sh\nprintf 'conf=%s\\n' \"$(cat \"$FBPKG_PACKAGE_DIR/etc/app.conf\")\"\n\
         printf 'arg0=%s\\nargs=%s\\n' \"$0\" \"$*\"\nexit 3\n",
    );
    std::fs::create_dir_all(tree.join("bin")).unwrap();
    symlink("../libexec/app-1.0", tree.join("bin/app")).unwrap();
    std::fs::create_dir_all(tree.join("etc")).unwrap();
    std::fs::write(tree.join("etc/app.conf"), "threads=4").unwrap();
    std::fs::write(tree.join("etc/readme"), "not a program").unwrap();
    symlink("../../outside", tree.join("etc/escape")).unwrap();

    // publish --entrypoint refuses what could never run (exit 2), before making anything.
    for (ep, needle) in [
        ("bin/nope", "does not exist"),
        ("etc/readme", "not executable"),
        ("etc", "not a regular file"),
        ("../app/bin/app", "'..'"),
        ("/bin/sh", "absolute"),
    ] {
        let out = cli(
            &["publish", "app", tree.to_str().unwrap(), "--entrypoint", ep],
            &host,
        )
        .await;
        assert_eq!(out.code, Some(2), "--entrypoint {ep}: {out}");
        assert!(out.stderr.contains(needle), "--entrypoint {ep}: {out}");
    }
    std::fs::remove_file(tree.join("etc/escape")).unwrap();
    let probe = base.join("probe.sh");
    write_exe(&probe, PROBE);
    let out = cli(
        &[
            "publish",
            "probe",
            probe.to_str().unwrap(),
            "--entrypoint",
            "probe.sh",
        ],
        &host,
    )
    .await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("directory package"), "{out}");

    let app = publish(
        "app",
        &tree,
        &["--entrypoint", "bin/app", "--tag", "prod"],
        &host,
    )
    .await;
    let (_, app_sha) = split(&app);
    let app_tree =
        std::path::absolute(base.join("cache/app").join(app_sha.to_hex()).join("tree")).unwrap();
    let check_app = |ran: &Ran| {
        assert_eq!(ran.status.code(), Some(3), "{ran}");
        assert_eq!(field(&ran.stdout, "conf="), "threads=4", "{ran}");
        assert_eq!(field(&ran.stdout, "args="), "one two", "{ran}");
        // What the kernel ran is the resolved script inside the tree.
        assert_eq!(
            Path::new(field(&ran.stdout, "arg0=")),
            std::fs::canonicalize(app_tree.join("libexec/app-1.0")).unwrap(),
            "{ran}"
        );
    };
    check_app(&run(&app, &host, &["one", "two"]).await);
    // By tag, resolved by the tracker for this host (and remembered for when it is gone).
    check_app(&run("app:prod", &host, &["one", "two"]).await);

    let bare = base.join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    write_exe(&bare.join("tool"), "#!/bin/sh\nexit 0\n");
    let bare_ref = publish("bare", &bare, &[], &host).await;
    let ran = run(&bare_ref, &host, &[]).await;
    assert_eq!(ran.status.code(), Some(126), "{ran}");
    assert!(
        ran.stderr.contains("without an entrypoint") && ran.stderr.contains("--entrypoint"),
        "{ran}"
    );

    // exec failures, with their own exit codes.
    let plain = base.join("notes.txt");
    std::fs::write(&plain, "#!/bin/sh\nexit 0\n").unwrap();
    let plain_ref = publish("notes", &plain, &[], &host).await;
    let ran = run(&plain_ref, &host, &[]).await;
    assert_eq!(ran.status.code(), Some(126), "{ran}");
    assert!(ran.stderr.contains("format: file"), "{ran}");
    let lost = base.join("lost.sh");
    write_exe(&lost, "#!/no/such/interpreter\n");
    let lost_ref = publish("lost", &lost, &[], &host).await;
    let ran = run(&lost_ref, &host, &[]).await;
    assert_eq!(ran.status.code(), Some(127), "{ran}");
    assert!(ran.stderr.contains("/no/such/interpreter"), "{ran}");

    let probe_ref = publish("probe", &probe, &[], &host).await;

    // A Python zipapp is a file package like any other.
    match on_path("python3") {
        None => eprintln!("note: python3 is not installed; the zipapp check is skipped"),
        Some(python) => {
            let src = base.join("pysrc");
            std::fs::create_dir_all(&src).unwrap();
            std::fs::write(
                src.join("__main__.py"),
                "import os, sys\nprint('zipapp', sys.argv[1:], os.environ['FBPKG_PACKAGE_REF'])\nsys.exit(5)\n",
            )
            .unwrap();
            let pyz = base.join("hello.pyz");
            let made = std::process::Command::new(python)
                .args(["-m", "zipapp"])
                .arg(&src)
                .arg("-o")
                .arg(&pyz)
                .args(["-p", "/usr/bin/env python3"])
                .status()
                .unwrap();
            assert!(made.success(), "python3 -m zipapp: {made}");
            let pyz_ref = publish("hello", &pyz, &[], &host).await;
            let ran = run(&pyz_ref, &host, &["a b", "--c"]).await;
            assert_eq!(ran.status.code(), Some(5), "{ran}");
            assert_eq!(
                ran.stdout.trim(),
                format!("zipapp ['a b', '--c'] {pyz_ref}"),
                "{ran}"
            );
        }
    }

    // The tracker is gone. An exact hash needs no network at all.
    tracker.kill().unwrap();
    let (listener, silent_url) = silent_listener();
    let offline = host_args(&state, &base.join("cache"), &silent_url);
    check_app(&run(&app, &offline, &["one", "two"]).await);
    let ran = run(&probe_ref, &offline, &["exit7"]).await;
    assert_eq!(ran.status.code(), Some(7), "{ran}");
    assert_untouched(&listener);

    // A tag runs what this host last resolved it to, with a warning.
    let dead = host_args(&state, &base.join("cache"), &url);
    let ran = run("app:prod", &dead, &["one", "two"]).await;
    check_app(&ran);
    assert!(
        ran.stderr.contains("warning") && ran.stderr.contains("tracker unreachable"),
        "{ran}"
    );

    // Not one socket on the launch path, seen by the kernel's side of it.
    match on_path("strace") {
        None => {
            eprintln!("note: strace is not installed; the no-socket check under strace is skipped")
        }
        Some(strace) => {
            let trace = base.join("strace.out");
            let mut cmd = std::process::Command::new(strace);
            cmd.args(["-f", "-qq", "-e", "trace=socket,connect,execve", "-o"])
                .arg(&trace)
                .arg(fbpkg_tests::fbpkg_rs_binary())
                .args(["run", &probe_ref])
                .args(&offline)
                .args(["--", "exit7"])
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            fbpkg_tests::clean_env(&mut cmd);
            let out = tokio::task::spawn_blocking(move || cmd.output())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(out.status.code(), Some(7), "{out:?}");
            let text = std::fs::read_to_string(&trace).unwrap();
            let (_, probe_sha) = split(&probe_ref);
            assert!(
                text.lines()
                    .any(|l| l.contains("execve(") && l.contains(&probe_sha.to_hex())),
                "strace did not see the program's exec:\n{text}"
            );
            let sockets: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("socket(") || l.contains("connect("))
                .collect();
            assert!(
                sockets.is_empty(),
                "run opened sockets:\n{}",
                sockets.join("\n")
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_program_holds_its_version_in_use() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let tracker = TrackerProcess::start(&base.join("tracker")).unwrap();
    let host = host_args(
        &base.join("state"),
        &base.join("cache"),
        &tracker.base_url(),
    );
    // Says it started, then waits for the file the test creates to let it go. Its own
    // polling: the test waits for conditions only.
    let waiter = base.join("waiter.sh");
    write_exe(
        &waiter,
        "#!/bin/sh\ntouch \"$1.started\"\nwhile [ ! -e \"$1.release\" ]; do sleep 0.05; done\nexit 0\n",
    );
    let reference = publish("waiter", &waiter, &[], &host).await;
    let (name, sha) = split(&reference);
    let cache = Cache::new(base.join("cache"));
    assert!(!cache.in_use(&name, &sha));

    let flag = base.join("flag");
    let mut cmd = fbpkg_rs_command();
    cmd.arg("run")
        .arg(&reference)
        .args(&host)
        .arg("--")
        .arg(&flag);
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let child = cmd.spawn().unwrap();
    let started = flag.with_extension("started");
    wait_for("the program to start", CLI_TIMEOUT, || {
        let started = started.clone();
        async move {
            if started.exists() {
                Ok(())
            } else {
                Err("not started".into())
            }
        }
    })
    .await;
    assert!(
        cache.in_use(&name, &sha),
        "the running program does not hold its version"
    );
    assert!(
        cache.try_claim(&name, &sha).unwrap().is_none(),
        "an eviction could claim a version in use"
    );
    assert_eq!(cache.launches(&name, &sha), 1);

    std::fs::write(flag.with_extension("release"), "").unwrap();
    let out = tokio::time::timeout(CLI_TIMEOUT, child.wait_with_output())
        .await
        .expect("the program ends once released")
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        !cache.in_use(&name, &sha),
        "the version stays in use after exit"
    );
    assert!(cache.try_claim(&name, &sha).unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_not_in_the_cache_is_fetched_through_the_agent_then_run() {
    let dirs = tempfile::tempdir().unwrap();
    let base = dirs.path();
    let tracker = TrackerProcess::start(&base.join("tracker")).unwrap();
    let url = tracker.base_url();
    let seeder = AgentProcess::start(&base.join("a/state"), &base.join("a/cache"), &url, &[])
        .await
        .unwrap();
    let probe = base.join("probe.sh");
    write_exe(&probe, PROBE);
    let reference = publish("probe", &probe, &["--tag", "prod"], &seeder.host_args()).await;

    let runner = AgentProcess::start(&base.join("b/state"), &base.join("b/cache"), &url, &[])
        .await
        .unwrap();
    let ran = run("probe:prod", &runner.host_args(), &["exit7", "x y"]).await;
    assert_eq!(ran.status.code(), Some(7), "{ran}\n{}", runner.log_tail());
    assert!(ran.stdout.contains("[x y]\n"), "{ran}");
    assert_eq!(field(&ran.stdout, "ref="), reference, "{ran}");
    assert_ran_in_place(&ran);
    let (name, sha) = split(&reference);
    assert!(
        runner.cache().lookup(&name, &sha).is_some(),
        "the agent did not cache it"
    );
}
