//! `run_bench`: the launch cost of `fbpkg-rs run` on a cached package (issue 10's bench).
//!
//! ```text
//! cargo run --release -p fbpkg-benches --bin run_bench -- --runs 300
//! ```
//!
//! Two packages are published into a fresh cache through a throwaway tracker on loopback: a
//! file package (a copy of `/bin/true`) and a directory package whose entrypoint `bin/tool` is
//! the same copy. The tracker is then stopped, and each case is timed `--runs` times, spawn to
//! exit, against exec of the very same cached file directly; the two alternate run by run, so
//! a neighbour's burst of load hits both alike. Reported: median and p90 of each, and the
//! overhead of `run` (its p50 and p90 minus direct exec's), against the target of 3 ms.
//!
//! No socket: when strace is installed, one `run` per case is traced with
//! `strace -f -e trace=socket,connect` and the calls counted (the target is zero; the
//! tracker URL points at a stopped tracker anyway, so any attempt would also fail loudly).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use clap::Parser;
use fbpkg_benches::fbpkg_binary;
use fbpkg_benches::latency::LatencySummary;
use serde::Serialize;

/// Launch cost of `fbpkg-rs run` (exact hash, cached) against exec of the same file.
#[derive(Debug, Parser)]
#[command(max_term_width = 100)]
struct Args {
    /// Timed runs per contender and case (10 to 5000).
    #[arg(long, env = "FBPKG_BENCH_RUNS", default_value_t = 300)]
    runs: usize,

    /// Untimed runs before each case.
    #[arg(long, env = "FBPKG_BENCH_WARMUP_RUNS", default_value_t = 20)]
    warmup: usize,

    /// A release build of fbpkg-rs [default: build one with cargo].
    #[arg(long, env = "FBPKG_BENCH_BIN")]
    fbpkg_bin: Option<PathBuf>,

    /// Also write the results as JSON here.
    #[arg(long, env = "FBPKG_BENCH_JSON")]
    json: Option<PathBuf>,
}

/// Target overhead of `run` over direct exec (issue 10).
const TARGET: Duration = Duration::from_millis(3);

#[derive(Debug, Serialize)]
struct Case {
    case: &'static str,
    direct: LatencySummary,
    run: LatencySummary,
    overhead_p50_us: f64,
    overhead_p90_us: f64,
    /// socket() and connect() calls strace saw during one `run`; None without strace.
    socket_calls: Option<usize>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(
        (10..=5000).contains(&args.runs),
        "--runs must be between 10 and 5000"
    );
    let bin = fbpkg_binary::release_binary(args.fbpkg_bin.clone())?;
    let work = tempfile::tempdir()?;
    let base = work.path();
    let true_bin = ["/bin/true", "/usr/bin/true"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .context("no /bin/true to package")?;

    // A throwaway tracker, only for publishing.
    let (tracker, url) = fbpkg_binary::start_tracker(&bin, &base.join("tracker"))?;
    let host = |cmd: &mut Command| {
        cmd.arg("--state-dir")
            .arg(base.join("state"))
            .arg("--cache-dir")
            .arg(base.join("cache"))
            .args(["--tracker", &url]);
    };
    let publish = |name: &str, path: &Path, extra: &[&str]| -> anyhow::Result<String> {
        let mut cmd = Command::new(&bin);
        cmd.args(["publish", name]).arg(path).args(extra);
        host(&mut cmd);
        // publish retries a tracker that is not listening yet.
        let out = cmd.args(["--retry-for", "30s"]).output()?;
        ensure!(
            out.status.success(),
            "publish {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    };
    let file = base.join("tool");
    std::fs::copy(true_bin, &file)?;
    let tree = base.join("tree");
    std::fs::create_dir_all(tree.join("bin"))?;
    std::fs::copy(true_bin, tree.join("bin/tool"))?;
    let file_ref = publish("bench-file", &file, &[])?;
    let dir_ref = publish("bench-dir", &tree, &["--entrypoint", "bin/tool"])?;
    drop(tracker);

    let cached = |reference: &str| -> anyhow::Result<PathBuf> {
        let mut cmd = Command::new(&bin);
        cmd.args(["get", reference]);
        host(&mut cmd);
        let out = cmd.output()?;
        ensure!(out.status.success(), "get {reference} (offline)");
        Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
    };
    let file_path = cached(&file_ref)?;
    let dir_path = cached(&dir_ref)?.join("bin/tool");

    let mut cases = Vec::new();
    for (case, reference, direct_path) in [
        ("file package", &file_ref, file_path),
        ("directory entrypoint", &dir_ref, dir_path),
    ] {
        let run_cmd = || {
            let mut cmd = Command::new(&bin);
            cmd.args(["run", reference]);
            host(&mut cmd);
            cmd
        };
        let direct_cmd = || Command::new(&direct_path);
        for _ in 0..args.warmup {
            time(direct_cmd())?;
            time(run_cmd())?;
        }
        let (mut direct, mut run) = (Vec::new(), Vec::new());
        for _ in 0..args.runs {
            direct.push(time(direct_cmd())?);
            run.push(time(run_cmd())?);
        }
        let direct = LatencySummary::of(&mut direct).context("no samples")?;
        let run = LatencySummary::of(&mut run).context("no samples")?;
        cases.push(Case {
            case,
            overhead_p50_us: run.p50_us - direct.p50_us,
            overhead_p90_us: run.p90_us - direct.p90_us,
            direct,
            run,
            socket_calls: socket_calls(run_cmd(), base)?,
        });
    }

    println!(
        "{:<22} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10}  sockets",
        "case", "direct p50", "direct p90", "run p50", "run p90", "+p50", "+p90"
    );
    let ms = |us: f64| format!("{:.3} ms", us / 1e3);
    for c in &cases {
        println!(
            "{:<22} {:>11} {:>11} {:>11} {:>11} {:>10} {:>10}  {}",
            c.case,
            ms(c.direct.p50_us),
            ms(c.direct.p90_us),
            ms(c.run.p50_us),
            ms(c.run.p90_us),
            ms(c.overhead_p50_us),
            ms(c.overhead_p90_us),
            c.socket_calls
                .map_or_else(|| "strace not installed".to_owned(), |n| n.to_string()),
        );
    }
    let target_us = TARGET.as_secs_f64() * 1e6;
    let met = cases.iter().all(|c| {
        c.overhead_p50_us <= target_us
            && c.overhead_p90_us <= target_us
            && c.socket_calls.unwrap_or(0) == 0
    });
    println!(
        "target: run at most {} ms over direct exec (p50 and p90), no socket: {}",
        TARGET.as_millis(),
        if met { "met" } else { "MISSED" }
    );
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&cases)?)?;
    }
    Ok(())
}

/// Spawn to exit of one command, which must succeed.
fn time(mut cmd: Command) -> anyhow::Result<Duration> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let start = Instant::now();
    let status = cmd.status()?;
    let took = start.elapsed();
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(took)
}

/// socket() and connect() calls in one run of `cmd` under strace; None without strace.
fn socket_calls(cmd: Command, dir: &Path) -> anyhow::Result<Option<usize>> {
    let Some(strace) = ["/usr/bin/strace", "/bin/strace"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
    else {
        return Ok(None);
    };
    let trace = dir.join("strace.out");
    let status = Command::new(strace)
        .args(["-f", "-qq", "-e", "trace=socket,connect,execve", "-o"])
        .arg(&trace)
        .arg(cmd.get_program())
        .args(cmd.get_args())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    ensure!(status.success(), "run under strace failed: {status}");
    let text = std::fs::read_to_string(&trace)?;
    // The trace must have seen the program's exec, or it proves nothing.
    ensure!(
        text.lines().filter(|l| l.contains("execve(")).count() >= 2,
        "strace did not follow run into its program:\n{text}"
    );
    Ok(Some(
        text.lines()
            .filter(|l| l.contains("socket(") || l.contains("connect("))
            .count(),
    ))
}
