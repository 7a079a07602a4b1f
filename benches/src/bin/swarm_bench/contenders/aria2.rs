//! aria2 (Debian's `aria2c`, 1.36): one `aria2c` per host, the same metainfo as fbpkg-rs,
//! the fbpkg-rs tracker (with `--allow-unregistered`) as the tracker. The strongest stock
//! client measured here (BENCHMARKS.md).
//!
//! Run as a fleet would run it: DHT, LPD and PEX off (aria2 has no UPnP), every socket on the
//! host's address, seeding forever once complete (`--seed-ratio=0.0` with no `--seed-time`),
//! no disk cache (everything is on tmpfs, and a piece aria2 calls complete is then in the
//! file), no preallocation, logs at `warn`. The seed hashes its copy first
//! (`--check-integrity`) and counts as ready once the tracker lists it as a seeder.
//!
//! A leecher is an `exec-on-go` node (`nodes/exec_on_go.rs`) that becomes `aria2c` at the
//! start instant. Its time is when aria2 runs its `--on-bt-download-complete` hook, which it
//! does once every piece has passed its SHA-1 check and before it goes on seeding; the hook
//! prints a `complete` line on aria2's stdout, which is the bench's pipe. Its file is hashed
//! afterwards like every contender's.
//!
//! Many packages (B5): each origin seeds its own package, and every leecher's one `aria2c`
//! is given all the torrents (`--force-sequential` makes each its own download; they run at
//! once, up to `--max-concurrent-downloads`), so aria2 shares its upload slots and
//! bandwidth across them as it would in a fleet. The hook's path says which one finished.
//!
//! Churn (B4): a leecher picked to die is killed once its file holds half the package (bytes
//! written, which aria2 may not all have checked yet) and started again, a plain `aria2c` now,
//! with `--check-integrity=true`: it hashes what is on disk, keeps every piece that passes and
//! fetches the rest, as a fleet's restarted host would. aria2 keeps no count of what it
//! downloads; what it fetched after the restart is the pieces its log (at level info) says it
//! completed.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde_json::json;

use super::churn;
use super::{ARIA2_PORT, Ctx, Package, event, scaled};
use crate::measure::{Accounting, ContenderRun, Done, PackageTimes, Window, outcomes};
use crate::procs::{self, Proc, Spec, Stdout};
use crate::topology::Endpoint;
use fbpkg_common::metainfo::{FileKind, Metainfo};

/// The binary (Debian package `aria2`).
pub const BINARY: &str = "aria2c";

/// The hook aria2 runs when a torrent's download is complete (`$1` gid, `$3` first file):
/// one JSON line on aria2's stdout.
const HOOK: &str = "#!/bin/sh\n\
    printf '{\"event\":\"complete\",\"gid\":\"%s\",\"path\":\"%s\"}\\n' \"$1\" \"$3\"\n";

/// `aria2c --version`'s first line, or why there is none.
fn version() -> anyhow::Result<String> {
    let out = std::process::Command::new(BINARY)
        .arg("--version")
        .output()
        .with_context(|| {
            format!("running {BINARY}: install Debian's aria2 (scripts/interop-deps.sh does)")
        })?;
    if !out.status.success() {
        bail!("{BINARY} --version exited {}", out.status);
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned())
}

fn torrent_path(ctx: &Ctx<'_>, pkg: &Package) -> PathBuf {
    ctx.dir.join(format!("{}.torrent", pkg.name))
}

/// The flags of every `aria2c` here, seed and leechers alike, and the torrents it is given.
fn flags(
    ctx: &Ctx<'_>,
    host: &Endpoint,
    pkgs: &[&Package],
    dir: &Path,
    hook: &Path,
    log: &Path,
) -> Vec<OsString> {
    let port = host.addr(ARIA2_PORT);
    let port = port.rsplit(':').next().unwrap_or_default();
    let mut f: Vec<OsString> = [
        "--no-conf",
        "--enable-dht=false",
        "--enable-dht6=false",
        "--bt-enable-lpd=false",
        "--enable-peer-exchange=false",
        "--disable-ipv6=true",
        "--seed-ratio=0.0",
        "--disk-cache=0",
        "--file-allocation=none",
        "--allow-overwrite=true",
        "--auto-file-renaming=false",
        "--auto-save-interval=0",
        "--log-level=warn",
        "--console-log-level=error",
        "--summary-interval=0",
        "--show-console-readout=false",
        "--download-result=hide",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    f.extend([
        format!("--interface={}", host.ip).into(),
        format!("--listen-port={port}").into(),
        // A bench killed with SIGKILL leaves no aria2 behind.
        format!("--stop-with-process={}", std::process::id()).into(),
        format!("--dir={}", dir.display()).into(),
        format!("--log={}", log.display()).into(),
        format!("--on-bt-download-complete={}", hook.display()).into(),
    ]);
    match pkgs {
        [one] => f.push(format!("--torrent-file={}", torrent_path(ctx, one).display()).into()),
        many => {
            f.push("--force-sequential=true".into());
            f.push(format!("--max-concurrent-downloads={}", many.len()).into());
            f.extend(many.iter().map(|p| torrent_path(ctx, p).into()));
        }
    }
    f
}

/// An origin: `host` seeding `pkg`.
fn start_seed(ctx: &Ctx<'_>, host: &Endpoint, pkg: &Package, hook: &Path) -> anyhow::Result<Proc> {
    let dir = ctx.host_dir(host, "aria2")?;
    if pkg.tree.is_some() {
        seed_tree(pkg, &dir.join(&pkg.file_name))?;
    } else {
        std::fs::copy(&pkg.path, dir.join(&pkg.file_name))
            .context("copying the package into the seed's folder")?;
    }
    let label = format!("{}-aria2", host.label);
    let mut argv: Vec<OsString> = vec![BINARY.into()];
    argv.extend(flags(
        ctx,
        host,
        &[pkg],
        &dir,
        hook,
        &ctx.log(&format!("{label}c")),
    ));
    argv.push("--check-integrity=true".into());
    let mut spec = Spec::new(&label, Some(&host.ns), argv);
    spec.stdin = true;
    spec.stdout = Stdout::Lines;
    spec.stderr = Some(ctx.log(&label));
    Proc::spawn(spec)
}

/// The bytes of the pieces an aria2 log at level info says were completed ("we got new
/// piece. index=N"; each counted once) of the torrent `meta` describes.
fn completed_bytes(log: &str, meta: &Metainfo) -> u64 {
    const GOT: &str = "we got new piece. index=";
    let pieces: std::collections::BTreeSet<u32> = log
        .lines()
        .filter_map(|l| l.split(GOT).nth(1)?.trim().parse().ok())
        .collect();
    pieces.iter().map(|&i| u64::from(meta.piece_size(i))).sum()
}

/// A seed's copy of a directory package at `to`: its files, and its BEP 47 padding as files
/// of zeros where the metainfo names them (`.pad/N`). aria2 does not know padding: it reads
/// it from files like any other, and would find the pieces that hold some missing.
fn seed_tree(pkg: &Package, to: &Path) -> anyhow::Result<()> {
    let meta = Metainfo::parse(&pkg.metainfo).context("the package's metainfo")?;
    let files = pkg.tree.as_ref().context("not a directory package")?;
    for rel in files.keys() {
        let (from, dest) = (pkg.path.join(rel), to.join(rel));
        if let Some(parent) = dest.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::copy(&from, &dest).with_context(|| format!("copying {}", from.display()))?;
    }
    for pad in meta.files.iter().filter(|f| f.kind == FileKind::Pad) {
        let path = to.join(pad.path.iter().collect::<PathBuf>());
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let zeros =
            std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        zeros.set_len(pad.length)?;
    }
    Ok(())
}

/// Whether aria2's hook path (a torrent's first file) belongs to `pkg`: its file, or a file
/// in its directory.
fn hook_names(path: &str, pkg: &Package) -> bool {
    if pkg.tree.is_some() {
        path.contains(&format!("/{}/", pkg.file_name))
    } else {
        path.ends_with(&pkg.file_name)
    }
}

fn start_leecher(
    ctx: &Ctx<'_>,
    host: &Endpoint,
    pkgs: &[&Package],
    hook: &Path,
) -> anyhow::Result<Proc> {
    let dir = ctx.host_dir(host, "aria2")?;
    let label = format!("{}-aria2", host.label);
    let aria = flags(ctx, host, pkgs, &dir, hook, &ctx.log(&format!("{label}c")));
    let aria: Vec<String> = aria
        .into_iter()
        .map(|a| {
            a.into_string()
                .map_err(|_| anyhow::anyhow!("non-UTF-8 path"))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut args = vec!["exec-on-go", "--", BINARY];
    args.extend(aria.iter().map(String::as_str));
    Proc::spawn(ctx.node(&label, host, &args))
}

/// The log of the aria2 started again on `host` (the churn scenario).
fn restarted_log(ctx: &Ctx<'_>, host: &str) -> PathBuf {
    ctx.log(&format!("{host}-aria2c-restarted"))
}

/// A killed leecher's new `aria2c`: a plain one (it starts at once) that checks what is on
/// disk before it fetches the rest. Same label, so the wait loop knows it; its own logs.
fn restart_leecher(ctx: &Ctx<'_>, host: &Endpoint, hook: &Path) -> anyhow::Result<Proc> {
    let dir = ctx.host_dir(host, "aria2")?;
    let label = format!("{}-aria2", host.label);
    let log = restarted_log(ctx, &host.label);
    let mut argv: Vec<OsString> = vec![BINARY.into()];
    argv.extend(flags(ctx, host, &[ctx.pkg], &dir, hook, &log));
    argv.push("--check-integrity=true".into());
    // Its log then names each piece it completes (the last `--log-level` stands), which is
    // how the bench learns what it fetched once restarted: aria2 reports no count of its own.
    argv.push("--log-level=info".into());
    let mut spec = Spec::new(&label, Some(&host.ns), argv);
    spec.stdout = Stdout::Lines;
    spec.stderr = Some(ctx.log(&format!("{label}-restarted")));
    Proc::spawn(spec)
}

/// Run aria2.
pub fn run(ctx: &Ctx<'_>) -> anyhow::Result<ContenderRun> {
    let version = version()?;
    let mut acct = Accounting::default();
    let mut setup_notes = BTreeMap::new();
    let mut notes = Vec::new();
    let pkgs = ctx.packages()?;
    let per_host = pkgs.len();
    for p in &pkgs {
        std::fs::write(torrent_path(ctx, p), &p.metainfo)?;
    }
    let hook = ctx.dir.join("on-complete.sh");
    std::fs::write(&hook, HOOK)?;
    std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755))?;

    let mut tracker = ctx.start_tracker(true, &[])?;
    let t = Instant::now();
    let mut seed = start_seed(ctx, &ctx.hosts.seed, ctx.pkg, &hook)?;
    let mut origins = Vec::new();
    for (h, p) in ctx.hosts.origins.iter().zip(ctx.more) {
        origins.push(start_seed(ctx, h, p, &hook)?);
    }
    let mut leechers = Vec::new();
    for h in &ctx.hosts.leechers {
        leechers.push(start_leecher(ctx, h, &pkgs, &hook)?);
    }
    for p in &mut leechers {
        p.wait_for_line("ready", Instant::now() + Duration::from_secs(30), |l| {
            event(l, "ready").is_some()
        })?;
    }
    let listed = ctx.wait_seed_listed(
        &ctx.hosts.seed.addr(ARIA2_PORT),
        scaled(Duration::from_secs(60), ctx.pkg.size),
    );
    if let Err(e) = listed {
        if let Some(s) = seed.poll() {
            bail!(
                "the aria2 seed exited ({s}); see {}",
                ctx.log(&format!("{}-aria2c", ctx.hosts.seed.label))
                    .display()
            );
        }
        return Err(e);
    }
    for ((h, p), o) in ctx.hosts.origins.iter().zip(ctx.more).zip(&mut origins) {
        let c = ctx.with_pkg(p);
        if let Err(e) =
            c.wait_seed_listed(&h.addr(ARIA2_PORT), scaled(Duration::from_secs(60), p.size))
        {
            if let Some(s) = o.poll() {
                bail!("the aria2 origin {} exited ({s})", h.label);
            }
            return Err(e);
        }
    }
    setup_notes.insert(
        "seed_check_and_listed_secs".into(),
        t.elapsed().as_secs_f64(),
    );

    let restart = |h: &Endpoint| restart_leecher(ctx, h, &hook);
    // Started again, aria2c runs at once (not through the launcher that waits for `go`).
    let victims = churn::Clients::new(ctx, "aria2", &restart, |_| Ok(true))?;
    let mut win = Window::open(ctx.topo, &ctx.hosts.seed.ns, ctx.sample_every)?;
    let deadline = win.t0 + ctx.deadline;
    let mut churn = churn::start(ctx, &mut leechers, win.t0)?;
    // Each leecher's finish of each package (by pid): it is done when it has them all.
    let t0 = win.t0;
    let mut finished = PackageTimes::new();
    let ended = win.wait_all(&mut leechers, deadline, |p| {
        if !victims.step(churn.as_mut(), p, &mut acct, &mut notes) {
            return None;
        }
        let times = finished
            .entry(p.pid)
            .or_insert_with(|| vec![None; per_host]);
        while let Some(line) = p.try_line() {
            let Some(v) = event(&line, "complete") else {
                continue;
            };
            let path = v["path"].as_str().unwrap_or_default();
            if let Some(k) = pkgs.iter().position(|pk| hook_names(path, pk)) {
                times[k].get_or_insert(t0.elapsed().as_secs_f64());
            }
            if times.iter().all(Option::is_some) {
                return Some(Done::Line(line));
            }
        }
        p.poll().map(Done::Exited)
    })?;
    let closed = win.close()?;

    // VmHWM is a high-water mark and every aria2c is still running (seeding): one reading
    // now is each one's peak.
    seed.sample_memory();
    for p in leechers.iter_mut().chain(origins.iter_mut()) {
        p.sample_memory();
    }
    {
        let mut all: Vec<&mut Proc> = std::iter::once(&mut seed)
            .chain(origins.iter_mut())
            .chain(leechers.iter_mut())
            .collect();
        // aria2 leaves gracefully (a `stopped` announce).
        procs::terminate_all(&mut all, Duration::from_secs(10));
    }
    acct.record("seed", &ctx.hosts.seed.label, &mut seed);
    for (p, h) in origins.iter_mut().zip(&ctx.hosts.origins) {
        acct.record("origin", &h.label, p);
    }
    for (p, h) in leechers.iter_mut().zip(&ctx.hosts.leechers) {
        acct.record("leecher", &h.label, p);
    }
    tracker.terminate(Duration::from_secs(10));
    acct.record("tracker", &ctx.hosts.tracker.label, &mut tracker);
    if ended.iter().any(Option::is_none) {
        notes.push("some leechers never ran their completion hook".into());
    }
    // What each restarted aria2 fetched: the pieces its log says it completed, whole.
    let meta = Metainfo::parse(&ctx.pkg.metainfo).context("the package's metainfo")?;
    let restarted = churn.map(|c| {
        c.into_restarted(|_, host| {
            let text = std::fs::read_to_string(restarted_log(ctx, host)).ok()?;
            Some(completed_bytes(&text, &meta))
        })
    });

    let pids: Vec<u32> = leechers.iter().map(|p| p.pid).collect();
    let (labels, packages, verified) = ctx.verify_leechers("aria2", &pkgs, &pids, &finished);
    let outcomes = outcomes(&labels, &ended, &verified, |d| match d {
        Done::Line(_) => Ok(()),
        Done::Exited(s) => Err(format!("aria2c exited {s} without completing")),
    });
    Ok(ContenderRun {
        setup: json!({
            "version": version,
            "flags": "--no-conf --enable-dht=false --enable-dht6=false --bt-enable-lpd=false \
                      --enable-peer-exchange=false --disable-ipv6=true --seed-ratio=0.0 \
                      --disk-cache=0 --file-allocation=none --allow-overwrite=true \
                      --interface=<host> --listen-port=8881 --torrent-file=<same metainfo> \
                      --on-bt-download-complete=<hook>; the seed adds --check-integrity=true",
            "leechers_seed_after_completion": true,
        }),
        setup_notes,
        notes,
        packages,
        restarted,
        ..ctx.report("aria2", closed, acct, outcomes, None)
    })
}

#[cfg(test)]
mod tests {
    use fbpkg_common::metainfo::{Format, Metainfo, piece_length_for};

    use super::completed_bytes;

    #[test]
    fn a_restarted_aria2s_log_gives_the_bytes_of_the_pieces_it_completed() {
        // Ten pieces, the last 100 bytes long.
        let size = 9 * piece_length_for(1 << 20) + 100;
        let data = vec![0u8; usize::try_from(size).unwrap()];
        let meta = Metainfo::build(&data[..], size, "p", "http://t/a", Format::File).unwrap();
        assert_eq!(meta.num_pieces(), 10);
        let log = "\
            2026-12-07 12:00:00.1 [INFO] [PieceMessage.cc:300] CUID#7 - we got new piece. index=3\n\
            2026-12-07 12:00:00.2 [INFO] [BtPieceMessage.cc:280] CUID#9 - we got new piece. index=9\n\
            2026-12-07 12:00:00.3 [INFO] [PieceMessage.cc:300] CUID#7 - we got new piece. index=3\n\
            2026-12-07 12:00:00.4 [INFO] [PieceMessage.cc:310] CUID#7 - we got wrong piece. index=4\n";
        // Pieces 3 (once) and 9, the last, which is 100 bytes long.
        assert_eq!(completed_bytes(log, &meta), meta.piece_length + 100);
        assert_eq!(completed_bytes("nothing completed\n", &meta), 0);
    }
}
