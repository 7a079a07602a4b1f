#![allow(clippy::unwrap_used)]
//! Directory packages as trees (`publish`'s default format), across real agents.
//!
//! - A tree with nested directories, a file of several pieces, many small files, an
//!   executable, an empty file, an empty directory and links (to a file, to a directory, from
//!   a subdirectory, through another link) reaches a second host through the swarm identical:
//!   bytes, execute bits, link targets, the empty directory, and nothing else (padding is not
//!   on disk).
//! - Agents send each other its blocks compressed: well under half the bytes on the wire.
//! - Its entry holds the tree, the metainfo and the seal, no archive: at most 1.1x the tree's
//!   blocks on disk.
//! - The second host seeds it from its tree: a third host fetches it with the publisher gone.
//! - `run` starts its entrypoint there; `verify` finds it intact, then finds an edit in the
//!   tree (exit 4) and quarantines the entry.
//! - The same tree publishes to the same hash again; `--format tar.zst` still makes an archive
//!   package (another hash), which keeps archive and tree.
//! - The compression dictionary `publish` trains travels in the metainfo, and agents use it:
//!   a tree of small sources takes clearly fewer bytes on the wire than the same tree
//!   published with `--no-dictionary`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::Duration;

use fbpkg_tests::{AgentProcess, CliOutput, TrackerProcess, fbpkg_rs, fbpkg_rs_then, log_field};

/// Longest one client command may take (a few MiB through a loopback swarm).
const CLI_TIMEOUT: Duration = Duration::from_secs(90);

async fn cli(args: &[&str], host: &[OsString]) -> CliOutput {
    fbpkg_rs_then(args, host, CLI_TIMEOUT).await
}

fn write(path: &Path, bytes: &[u8], mode: u32) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A release-like tree: 3 MiB `lib/big.so` (several 32 KiB pieces; as compressible as text),
/// 300 small configs, a script as the entrypoint, an empty file, an empty directory, and
/// links.
fn make_tree(root: &Path) {
    let big: Vec<u8> = (0..(3u32 << 20) / 16)
        .flat_map(|i| {
            format!(
                "{:015x}\n",
                u64::from(i).wrapping_mul(2_654_435_761) % 100_000
            )
            .into_bytes()
        })
        .collect();
    write(&root.join("lib/big.so"), &big, 0o644);
    for i in 0..300 {
        let body = format!("key{i} = {}\n", "v".repeat(i % 97));
        write(
            &root.join(format!("etc/conf.d/{i:03}.conf")),
            body.as_bytes(),
            0o644,
        );
    }
    write(
        &root.join("bin/real-tool"),
        b"#!/bin/sh\necho \"tool ran in $FBPKG_PACKAGE_DIR with $*\"\n",
        0o755,
    );
    write(&root.join("var/empty-file"), b"", 0o644);
    std::fs::create_dir_all(root.join("var/spool")).unwrap();
    symlink("real-tool", root.join("bin/tool")).unwrap();
    symlink("lib", root.join("current-lib")).unwrap();
    symlink("../current-lib/big.so", root.join("bin/big-link")).unwrap();
    symlink("etc/conf.d", root.join("conf")).unwrap();
}

#[derive(Debug, PartialEq, Eq)]
enum Node {
    File { bytes: Vec<u8>, exec: bool },
    Link(PathBuf),
    Dir,
}

/// Everything under `root` that a package carries: contents, execute bits, link targets.
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let e = e.unwrap();
            let path = e.path();
            let rel = path.strip_prefix(root).unwrap().to_path_buf();
            let md = std::fs::symlink_metadata(&path).unwrap();
            let node = if md.file_type().is_symlink() {
                Node::Link(std::fs::read_link(&path).unwrap())
            } else if md.is_dir() {
                stack.push(path.clone());
                Node::Dir
            } else {
                Node::File {
                    bytes: std::fs::read(&path).unwrap(),
                    exec: md.mode() & 0o111 != 0,
                }
            };
            out.insert(rel, node);
        }
    }
    out
}

/// Blocks on disk under `path`, as `du` counts them.
fn disk_bytes(path: &Path) -> u64 {
    let md = std::fs::symlink_metadata(path).unwrap();
    let mut total = md.blocks() * 512;
    if md.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            total += disk_bytes(&e.unwrap().path());
        }
    }
    total
}

/// The same entries with the same contents; on failure, the first difference only (a tree's
/// bytes are too many to print).
fn assert_same_tree(got: &Path, want: &Path) {
    let (got, want) = (snapshot(got), snapshot(want));
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "the trees hold different paths"
    );
    for (path, node) in &want {
        if got[path] != *node {
            let short = |n: &Node| match n {
                Node::File { bytes, exec } => format!("file of {} bytes, exec {exec}", bytes.len()),
                other => format!("{other:?}"),
            };
            panic!(
                "{}: got {}, want {}",
                path.display(),
                short(&got[path]),
                short(node)
            );
        }
    }
}

/// `get` on `host`, which fetches from `from`; on failure both agents' logs are shown.
async fn get(reference: &str, host: &AgentProcess, from: &AgentProcess) -> PathBuf {
    let out = cli(&["get", reference], &host.host_args()).await;
    assert!(
        out.success(),
        "get on {}: {out}\n{}\n--- {} (serving)\n{}",
        host.listen(),
        host.log_tail(),
        from.listen(),
        from.log_tail()
    );
    PathBuf::from(out.line())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_package_travels_as_its_files_and_costs_one_copy() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let tracker = TrackerProcess::start(&base.join("tracker")).unwrap();
    let url = tracker.base_url();
    let src = base.join("src");
    make_tree(&src);

    let mut publisher =
        AgentProcess::start(&base.join("a/state"), &base.join("a/cache"), &url, &[])
            .await
            .unwrap();
    let publish = [
        "publish",
        "app",
        src.to_str().unwrap(),
        "--entrypoint",
        "bin/tool",
    ];
    let out = cli(&publish, &publisher.host_args()).await;
    assert!(out.success(), "publish: {out}");
    let reference = out.line().to_owned();
    let sha = reference.strip_prefix("app:").unwrap().to_owned();
    // The same tree, published again, is the same version.
    let again = cli(&publish, &publisher.host_args()).await;
    assert_eq!(again.line(), reference, "{again}");

    let b = AgentProcess::start(&base.join("b/state"), &base.join("b/cache"), &url, &[])
        .await
        .unwrap();
    let tree = get(&reference, &b, &publisher).await;
    // Agents send each other blocks compressed when that is smaller.
    let status = b.status().await.unwrap();
    let t = status.iter().find(|t| t.sha256 == sha).unwrap();
    assert!(
        t.downloaded_wire > 0 && t.downloaded_wire * 2 < t.downloaded,
        "{} bytes downloaded took {} on the wire",
        t.downloaded,
        t.downloaded_wire
    );
    assert_eq!(tree, b.cache_dir().join("app").join(&sha).join("tree"));
    assert_same_tree(&tree, &src);

    // One copy: the tree, its metainfo and its seal.
    let entry = tree.parent().unwrap();
    let mut names: Vec<String> = std::fs::read_dir(entry)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, [".fbpkg.stamp", ".fbpkg.torrent", "tree"]);
    let (on_disk, source) = (disk_bytes(entry), disk_bytes(&src));
    assert!(
        on_disk * 10 <= source * 11,
        "the entry takes {on_disk} bytes on disk, the tree {source}"
    );

    // Host b seeds from its tree: c fetches with the publisher gone.
    publisher.kill().unwrap();
    let c = AgentProcess::start(&base.join("c/state"), &base.join("c/cache"), &url, &[])
        .await
        .unwrap();
    let tree_c = get(&reference, &c, &b).await;
    assert_same_tree(&tree_c, &src);

    // run starts the entrypoint (a link to the script) in the tree.
    let mut run: Vec<OsString> = vec!["run".into(), reference.clone().into()];
    run.extend(c.host_args());
    run.extend(["--", "x", "y"].map(OsString::from));
    let ran = fbpkg_rs(run, CLI_TIMEOUT).await;
    assert!(ran.success(), "{ran}");
    assert!(
        ran.stdout.contains(&format!(
            "tool ran in {} with x y",
            std::path::absolute(&tree_c).unwrap().display()
        )),
        "{ran}"
    );

    // verify: intact, then an edit inside the tree is found and quarantined.
    let ok = cli(&["verify", &reference], &c.host_args()).await;
    assert!(ok.success(), "{ok}");
    let conf = tree_c.join("etc/conf.d/042.conf");
    std::fs::set_permissions(&conf, std::fs::Permissions::from_mode(0o644)).unwrap();
    let mut bytes = std::fs::read(&conf).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&conf, &bytes).unwrap();
    let bad = cli(&["verify", &reference], &c.host_args()).await;
    assert_eq!(bad.code, Some(4), "{bad}");
    assert!(
        bad.stdout.contains("042.conf") || bad.stderr.contains("042.conf"),
        "{bad}"
    );
    assert!(!tree_c.exists(), "the corrupt entry is still in the cache");

    // The archive format is still there, and is another version of the same tree.
    let tar = cli(
        &[
            "publish",
            "app",
            src.to_str().unwrap(),
            "--format",
            "tar.zst",
        ],
        &b.host_args(),
    )
    .await;
    assert!(tar.success(), "{tar}");
    assert_ne!(tar.line(), reference);
    let tar_sha = tar.line().strip_prefix("app:").unwrap();
    let tar_entry = b.cache_dir().join("app").join(tar_sha);
    assert!(tar_entry.join("app.tar.zst").is_file());
    assert_same_tree(&tar_entry.join("tree"), &src);
}

/// `bytes` of text-like content seeded by `seed` (compressible, different per seed).
fn text(bytes: usize, seed: u64) -> Vec<u8> {
    (0..bytes as u64 / 16)
        .flat_map(|i| format!("{:015x}\n", (i ^ seed).wrapping_mul(2_654_435_761)).into_bytes())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_version_fetches_only_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let tracker = TrackerProcess::start(&base.join("tracker")).unwrap();
    let url = tracker.base_url();
    let src = base.join("src");
    make_tree(&src);
    write(&src.join("lib/other.so"), &text(2 << 20, 1), 0o755);
    let a = AgentProcess::start(&base.join("a/state"), &base.join("a/cache"), &url, &[])
        .await
        .unwrap();
    let publish = |path: PathBuf| {
        let host = a.host_args();
        async move {
            let out = cli(&["publish", "app", path.to_str().unwrap()], &host).await;
            assert!(out.success(), "publish: {out}");
            out.line().to_owned()
        }
    };
    let v1 = publish(src.clone()).await;
    let b = AgentProcess::start(&base.join("b/state"), &base.join("b/cache"), &url, &[])
        .await
        .unwrap();
    let tree1 = get(&v1, &b, &a).await;
    let v1_copy = base.join("v1");
    std::fs::create_dir(&v1_copy).unwrap();
    assert!(
        std::process::Command::new("cp")
            .args([
                "-a",
                &format!("{}/.", src.display()),
                v1_copy.to_str().unwrap()
            ])
            .status()
            .unwrap()
            .success()
    );

    // Version 2: one config edited, one library replaced; lib/big.so (3 MiB) unchanged.
    let other = text(2 << 20, 2);
    write(&src.join("lib/other.so"), &other, 0o755);
    write(
        &src.join("etc/conf.d/042.conf"),
        b"key42 = changed\n",
        0o644,
    );
    let v2 = publish(src.clone()).await;
    assert_ne!(v1, v2);
    let tree2 = get(&v2, &b, &a).await;
    assert_same_tree(&tree2, &src);
    assert_same_tree(&tree1, &v1_copy);

    let sha2 = v2.strip_prefix("app:").unwrap();
    let status = b.status().await.unwrap();
    let t = status.iter().find(|t| t.sha256 == sha2).unwrap();
    // What changed: the library, and the piece of packed configs holding 042.conf (pieces
    // are 32 KiB here). Everything else came from version 1 on this host.
    let changed = other.len() as u64 + 2 * (32 << 10);
    assert!(
        t.downloaded <= changed,
        "fetched {} bytes of a {} byte package; {changed} changed",
        t.downloaded,
        t.size
    );
    // Unchanged files are one file on disk, shared by both versions: the large one, and the
    // configs packed in the piece that was fetched again for 042.conf (its blocks for them
    // held their bytes, so they were not written).
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    for f in ["lib/big.so", "etc/conf.d/041.conf", "etc/conf.d/043.conf"] {
        assert_eq!(ino(&tree1.join(f)), ino(&tree2.join(f)), "{f}");
    }
    for v in [&v1, &v2] {
        let ok = cli(&["verify", v], &b.host_args()).await;
        assert!(ok.success(), "verify {v}: {ok}");
    }
    // Files reused whole (every piece verified at the start) are not read again at install:
    // none for version 1; for version 2 big.so (the configs share the piece of 042.conf,
    // which was fetched again).
    let reused_whole = |sha: &str| {
        b.log_lines()
            .iter()
            .filter(|l| l.contains("verified and in the cache") && l.contains(sha))
            .find_map(|l| log_field(l, "reused_whole")?.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no install line for {sha}:\n{}", b.log_tail()))
    };
    assert_eq!(reused_whole(v1.strip_prefix("app:").unwrap()), 0);
    let whole = reused_whole(sha2);
    assert!(whole >= 1, "{whole} files reused whole");
    // big.so is as version 1's install left it, and owns its pieces: they were trusted
    // without being read (3 MiB in 32 KiB pieces).
    let trusted = b
        .log_lines()
        .iter()
        .find_map(|l| {
            l.contains("starting from files of cached versions")
                .then(|| log_field(l, "trusted_pieces")?.parse::<usize>().ok())?
        })
        .unwrap_or_else(|| panic!("no reuse line:\n{}", b.log_tail()));
    assert_eq!(trusted, 96, "pieces of big.so trusted");
}

/// A tree of thousands of files has a metainfo of MiBs (the agent's control line once held
/// 1 MiB, and publish failed with a broken pipe); it publishes through the agent and travels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tree_of_thousands_of_files_publishes_through_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let tracker = TrackerProcess::start(&base.join("tracker")).unwrap();
    let url = tracker.base_url();
    let src = base.join("src");
    for d in 0..30 {
        let sub = src.join(format!("share/dir{d:02}"));
        std::fs::create_dir_all(&sub).unwrap();
        for f in 0..200 {
            let body = format!("file {d}/{f}\n");
            std::fs::write(
                sub.join(format!(
                    "a-configuration-file-with-a-rather-long-name-as-packages-have-{f:04}.conf"
                )),
                body,
            )
            .unwrap();
        }
    }
    let a = AgentProcess::start(&base.join("a/state"), &base.join("a/cache"), &url, &[])
        .await
        .unwrap();
    let out = cli(&["publish", "many", src.to_str().unwrap()], &a.host_args()).await;
    assert!(out.success(), "publish: {out}\n{}", a.log_tail());
    let reference = out.line().to_owned();
    let sha = reference.strip_prefix("many:").unwrap();
    let metainfo = a.cache_dir().join("many").join(sha).join(".fbpkg.torrent");
    let len = std::fs::metadata(&metainfo).unwrap().len();
    assert!(
        len > 512 << 10,
        "the metainfo is {len} bytes: over 1 MiB in hex is the point"
    );
    let b = AgentProcess::start(&base.join("b/state"), &base.join("b/cache"), &url, &[])
        .await
        .unwrap();
    let tree = get(&reference, &b, &a).await;
    assert_same_tree(&tree, &src);
}

/// Small text files whose lines come from a vocabulary larger than one batch: what a tree of
/// sources or configs looks like to an agent sending it piece by piece in the swarm's order.
fn make_sources(root: &Path) {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let vocab: Vec<String> = (0..4000)
        .map(|_| {
            let n = 20 + next() % 60;
            (0..n)
                .map(|_| char::from(b"abcdefghijklmnop_(). ="[(next() % 22) as usize]))
                .collect()
        })
        .collect();
    for f in 0..700 {
        let mut body = String::new();
        while body.len() < 2048 + (f % 7) * 512 {
            body.push_str(&vocab[(next() % 4000) as usize]);
            body.push('\n');
        }
        write(
            &root.join(format!("src/m{}/f{f:04}.py", f % 13)),
            body.as_bytes(),
            0o644,
        );
    }
}

/// The dictionary `publish` trains: in the metainfo every host gets (not in the package's
/// hash), and used by agents between them: the same tree published with `--no-dictionary`
/// takes clearly more bytes on the wire to a second host.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dictionary_from_publish_shrinks_what_agents_send() {
    use fbpkg_common::metainfo::Metainfo;

    let dir = tempfile::tempdir().unwrap();
    let base = dir.path();
    let tracker = TrackerProcess::start(&base.join("tracker")).unwrap();
    let url = tracker.base_url();
    let src = base.join("src");
    make_sources(&src);
    let a = AgentProcess::start(&base.join("a/state"), &base.join("a/cache"), &url, &[])
        .await
        .unwrap();
    let b = AgentProcess::start(&base.join("b/state"), &base.join("b/cache"), &url, &[])
        .await
        .unwrap();
    let mut wire = Vec::new();
    for (name, flags) in [("plain", &["--no-dictionary"][..]), ("dict", &[][..])] {
        let mut publish = vec!["publish", name, src.to_str().unwrap()];
        publish.extend(flags);
        let out = cli(&publish, &a.host_args()).await;
        assert!(out.success(), "publish: {out}\n{}", a.log_tail());
        let reference = out.line().to_owned();
        let sha = reference.split_once(':').unwrap().1.to_owned();
        let tree = get(&reference, &b, &a).await;
        assert_same_tree(&tree, &src);
        let meta = std::fs::read(tree.parent().unwrap().join(".fbpkg.torrent")).unwrap();
        let meta = Metainfo::parse(&meta).unwrap();
        assert_eq!(meta.zdict.is_some(), name == "dict", "{name}");
        let status = b.status().await.unwrap();
        let t = status.iter().find(|t| t.name == name).unwrap();
        assert_eq!(t.sha256, sha);
        wire.push(t.downloaded_wire);
    }
    // Same tree, same hash; the dictionary is what differs.
    assert!(
        wire[1] * 10 < wire[0] * 8,
        "{} bytes on the wire with the dictionary, {} without",
        wire[1],
        wire[0]
    );
}
