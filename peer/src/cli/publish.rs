//! `fbpkg-rs publish NAME PATH`: make a version, seed it here, register it with the tracker.

use std::fs::{self, File};
use std::io::BufReader;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use fbpkg_common::entrypoint::Entrypoint;
use fbpkg_common::metainfo::{Format, Metainfo, check_file_name};
use fbpkg_common::pkgref::{PackageName, Tag};
use serde::Serialize;

use super::HostArgs;
use crate::agent::control::{self, AgentClient, Event, Request};
use crate::cache::{Handoff, remove_tree};
use crate::error::PeerError;
use crate::launch::resolve_entrypoint;
use crate::storage::PackageData;
use crate::tracker_client::PublishOutcome;

/// `fbpkg-rs publish` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = "\
A file is published as it is (its execute bit is kept). A directory is published as a tree
(--format tree, the default): a torrent of its files, so every host keeps one copy, the
tree itself, and seeds from it. Its hash covers every file's bytes and name, the permission
bits of files and directories (not setuid, setgid or sticky), links and empty directories
(not owners or times), so the same tree gives the same hash on any host. Names must be UTF-8.
--format tar.zst makes a deterministic tar.zst instead (entries sorted, owners and times
zeroed, modes kept): fewer bytes on the network when the files compress well, but hosts keep
archive and tree. The package is put in this host's cache and seeded by the local agent
before the tracker lists it, so a version is never listed with nobody to serve it.

A directory package that `fbpkg-rs run` should start names its program with --entrypoint:
a path inside the directory (`bin/tool`, no `..`) to an executable regular file, or to a
symlink that stays inside the directory and leads to one. It is recorded in the version's
metainfo (and so in its hash): every host runs the same program, with no network. A file
package needs none: `run` runs the file itself, if it has its execute bit.")]
pub(crate) struct PublishArgs {
    /// Package name: lowercase letters, digits, '.', '_' and '-'.
    name: String,

    /// The file or directory to publish.
    path: PathBuf,

    /// Also point this tag at the new version (e.g. prod, canary).
    #[arg(long)]
    tag: Option<String>,

    /// The program `fbpkg-rs run` starts, for a directory package: a path inside the
    /// directory, e.g. bin/tool.
    #[arg(long, env = "FBPKG_ENTRYPOINT", value_name = "PATH")]
    entrypoint: Option<String>,

    /// Bearer token for the tracker's catalog.
    #[arg(long, env = "FBPKG_PUBLISH_TOKEN", hide_env_values = true)]
    publish_token: Option<String>,

    /// How a directory is published: `tree` (its files; one copy on every host) or `tar.zst`
    /// (one compressed archive; hosts keep archive and extracted tree).
    #[arg(long, env = "FBPKG_PUBLISH_FORMAT", default_value = "tree", value_parser = ["tree", "tar.zst"])]
    format: String,

    /// Publish a tree without a compression dictionary. By default one is trained on
    /// samples of the tree (up to 32 MiB, a few seconds) and sent with the metainfo when it
    /// saves at least twice its size: agents then compress the blocks they send each other
    /// with it (small files compress about as well as in a tar.zst). It is not part of the
    /// package's hash.
    #[arg(long, env = "FBPKG_NO_DICTIONARY")]
    no_dictionary: bool,

    /// Print one JSON object instead of name:sha256.
    #[arg(long)]
    json: bool,

    /// Keep retrying an unreachable tracker (refused connections, timeouts, 5xx) this long.
    #[arg(long, env = "FBPKG_RETRY_FOR", default_value = "60s", value_parser = humantime::parse_duration)]
    retry_for: std::time::Duration,

    #[command(flatten)]
    host: HostArgs,
}

#[derive(Debug, Serialize)]
struct Output {
    name: String,
    sha256: String,
    info_hash: String,
    size: u64,
    path: PathBuf,
    seeded_by_agent: bool,
    already_published: bool,
    tag: Option<String>,
}

/// The archive to publish and whether it is a temporary file of ours.
struct Prepared {
    file: PathBuf,
    file_name: String,
    format: Format,
    temporary: bool,
}

fn prepare(
    name: &PackageName,
    path: &Path,
    entrypoint: Option<&Entrypoint>,
    tree: bool,
    tmp_dir: &Path,
) -> anyhow::Result<Prepared> {
    let meta = fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if let Some(e) = entrypoint {
        if !meta.is_dir() {
            return Err(PeerError::BadInput(format!(
                "--entrypoint {e} is for a directory package; {} is a file, and `fbpkg-rs run` \
                 runs a file package itself (publish it with its execute bit set)",
                path.display()
            ))
            .into());
        }
        // Before the archive is made: a version that cannot run is never made.
        resolve_entrypoint(path, e).map_err(|why| {
            PeerError::BadInput(format!(
                "--entrypoint {e}: {why} (looked in {})",
                path.display()
            ))
        })?;
    }
    if meta.is_dir() && tree {
        return Ok(Prepared {
            file: path.to_owned(),
            file_name: name.to_string(),
            format: Format::Tree,
            temporary: false,
        });
    }
    if meta.is_dir() {
        super::super::agent::private_dir(tmp_dir)?;
        let file = tmp_dir.join(format!(
            "publish-{}-{}.tar.zst",
            std::process::id(),
            rand::random::<u32>()
        ));
        let out =
            File::create(&file).with_context(|| format!("cannot create {}", file.display()))?;
        let made = crate::archive::create(path, std::io::BufWriter::new(out));
        if let Err(e) = made {
            let _ = fs::remove_file(&file);
            return Err(e.into());
        }
        return Ok(Prepared {
            file,
            file_name: format!("{name}.tar.zst"),
            format: Format::TarZst,
            temporary: true,
        });
    }
    if !meta.is_file() {
        anyhow::bail!("{} is neither a file nor a directory", path.display());
    }
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| anyhow::anyhow!("{} has no usable file name", path.display()))?
        .to_owned();
    check_file_name(file_name.as_bytes())?;
    let format = if meta.permissions().mode() & 0o111 != 0 {
        Format::Executable
    } else {
        Format::File
    };
    Ok(Prepared {
        file: path.to_owned(),
        file_name,
        format,
        temporary: false,
    })
}

/// `meta` with a compression dictionary trained on the tree at `root`, when one pays. The
/// dictionary is optional: when it cannot be made (a file changed under us, a metainfo that
/// would grow too large), the package is published without it, with a warning.
fn with_dictionary(meta: Metainfo, root: &Path) -> Metainfo {
    let trained = PackageData::open_tree_at(root, &meta)
        .and_then(|data| crate::engine::zstream::train(&meta, |at, buf| data.read_at(at, buf)));
    let t = match trained {
        Ok(Some(t)) => t,
        Ok(None) => {
            tracing::debug!("no compression dictionary: it would not pay for itself");
            return meta;
        }
        Err(e) => {
            eprintln!(
                "fbpkg-rs: warning: publishing without a compression dictionary: reading {}: {e}",
                root.display()
            );
            return meta;
        }
    };
    let [raw, plain, with] = t.probe;
    tracing::info!(
        dictionary_bytes = t.zdict.len(),
        saves_per_copy = t.saves,
        "compression dictionary: samples compress to {:.3} of their size with it, {:.3} without",
        with as f64 / raw as f64,
        plain as f64 / raw as f64,
    );
    match meta.clone().with_zdict(t.zdict) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("fbpkg-rs: warning: publishing without a compression dictionary: {e}");
            meta
        }
    }
}

/// Read what `prepared` names once, into its metainfo.
fn build_metainfo(prepared: &Prepared, announce: &str) -> anyhow::Result<Metainfo> {
    if prepared.format == Format::Tree {
        let root = &prepared.file;
        let items = crate::archive::tree_items(root)?;
        let open = |path: &[String]| {
            let mut p = root.clone();
            p.extend(path);
            // Not through a link swapped in since the walk.
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&p)
                .map(|f| BufReader::with_capacity(1 << 20, f))
                .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))
        };
        return Ok(Metainfo::build_tree(
            items,
            open,
            &prepared.file_name,
            announce,
        )?);
    }
    let size = fs::metadata(&prepared.file)?.len();
    let reader = BufReader::with_capacity(1 << 20, File::open(&prepared.file)?);
    Ok(Metainfo::build(
        reader,
        size,
        &prepared.file_name,
        announce,
        prepared.format,
    )?)
}

pub(super) fn run(args: PublishArgs) -> anyhow::Result<ExitCode> {
    let name = PackageName::new(&args.name).map_err(|e| PeerError::BadInput(e.to_string()))?;
    let tag = args
        .tag
        .as_deref()
        .map(Tag::new)
        .transpose()
        .map_err(|e| PeerError::BadInput(e.to_string()))?;
    let tracker = args
        .host
        .tracker_client(args.publish_token.clone(), args.retry_for)?;
    let entrypoint = args
        .entrypoint
        .as_deref()
        .map(Entrypoint::new)
        .transpose()
        .map_err(|e| PeerError::BadInput(e.to_string()))?;
    let state_dir = args.host.state_dir();
    let cache = args.host.cache();
    let prepared = prepare(
        &name,
        &args.path,
        entrypoint.as_ref(),
        args.format == "tree",
        &state_dir.join("tmp"),
    )?;
    let result = (|| -> anyhow::Result<ExitCode> {
        let announce = format!("{}/announce", tracker.base());
        let abs = fs::canonicalize(&prepared.file)?;
        super::runtime()?.block_on(async {
            // 1. Into this host's cache, seeded by the agent when there is one.
            let Placed {
                meta,
                seeded_by_agent,
                was_cached,
            } = match one_pass(&prepared, &abs, &name, &announce, &state_dir, &cache).await? {
                Some(placed) => placed,
                None => {
                    let build = (entrypoint.clone(), !args.no_dictionary);
                    two_reads(&prepared, &abs, &name, &announce, build, &state_dir, &cache).await?
                }
            };
            // 2. Listed by the tracker; the agent announces right away instead of waiting
            // for its retry after the "unregistered" refusal.
            let (outcome, info) = match tracker.publish(&name, &meta).await {
                Ok(listed) => listed,
                Err(e) => {
                    // Never listed: what step 1 added must not stay behind, seeded by nobody's
                    // request and taking disk.
                    if !was_cached {
                        forget(&state_dir, &cache, &name, &meta.sha256, seeded_by_agent).await;
                    }
                    return Err(e.into());
                }
            };
            if seeded_by_agent && let Some(agent) = AgentClient::connect(&state_dir).await? {
                let poke = Request::Announce {
                    info_hash: meta.info_hash.to_hex(),
                };
                if let Err(e) = agent.call(&poke).await {
                    tracing::debug!(error = %e, "could not ask the agent to announce now");
                }
            }
            // 3. Tagged.
            if let Some(tag) = &tag {
                tracker.move_tag(&name, tag, &meta.sha256).await?;
            }
            let entry = cache.lookup(&name, &meta.sha256);
            if args.json {
                let out = Output {
                    name: name.to_string(),
                    sha256: info.sha256.to_hex(),
                    info_hash: info.info_hash.to_hex(),
                    size: info.size,
                    path: entry.map(|e| e.launch_path).unwrap_or_default(),
                    seeded_by_agent,
                    already_published: outcome == PublishOutcome::AlreadyPublished,
                    tag: tag.as_ref().map(|t| t.to_string()),
                };
                println!("{}", serde_json::to_string(&out)?);
            } else {
                println!("{name}:{}", meta.sha256);
            }
            Ok(ExitCode::SUCCESS)
        })
    })();
    if prepared.temporary && prepared.file.exists() {
        let _ = remove_tree(&prepared.file);
    }
    result
}

/// A version put in this host's cache by step 1 of a publish.
struct Placed {
    meta: Metainfo,
    seeded_by_agent: bool,
    /// It was there before this publish (a failed listing must not remove it).
    was_cached: bool,
}

fn warn_no_agent(name: &PackageName, state_dir: &Path) {
    eprintln!(
        "fbpkg-rs: warning: no agent is running here ({}): {name} is in this host's cache \
         but nobody seeds it until `fbpkg-rs agent` starts",
        control::socket_path(state_dir).display()
    );
}

/// Step 1 for the user's single file, in one read: the metainfo is built from the bytes as
/// they are copied into the cache (by the agent, which then seeds it, or here when no agent
/// runs), instead of reading the file once for the metainfo and again for the checked copy.
/// `None` for what goes the two-read way: a tree (its files are read for the metainfo and,
/// by default, again for a compression dictionary), an archive made here (moved, not
/// copied), or an agent too old to know `publish`. A user's single file has no entry point
/// (`prepare` refuses one), so none is sent.
async fn one_pass(
    prepared: &Prepared,
    abs: &Path,
    name: &PackageName,
    announce: &str,
    state_dir: &Path,
    cache: &crate::cache::Cache,
) -> anyhow::Result<Option<Placed>> {
    if prepared.format == Format::Tree || prepared.temporary {
        return Ok(None);
    }
    let Some(agent) = AgentClient::connect(state_dir).await? else {
        let (c, n, p) = (cache.clone(), name.clone(), abs.to_owned());
        let (file_name, announce, format) = (
            prepared.file_name.clone(),
            announce.to_owned(),
            prepared.format,
        );
        let (_, meta, fresh) = tokio::task::spawn_blocking(move || {
            c.install_file(&n, &p, (&file_name, &announce, format))
        })
        .await??;
        warn_no_agent(name, state_dir);
        return Ok(Some(Placed {
            meta,
            seeded_by_agent: false,
            was_cached: !fresh,
        }));
    };
    let req = Request::Publish {
        name: name.to_string(),
        path: abs.to_owned(),
        file_name: prepared.file_name.clone(),
        announce: announce.to_owned(),
        format: control::format_name(prepared.format).to_owned(),
    };
    match agent.call(&req).await {
        Ok(Event::Published {
            metainfo_hex,
            fresh,
            ..
        }) => {
            let bytes = hex::decode(&metainfo_hex).context("the agent's metainfo")?;
            let meta = Metainfo::parse(&bytes).context("the agent's metainfo")?;
            Ok(Some(Placed {
                meta,
                seeded_by_agent: true,
                was_cached: !fresh,
            }))
        }
        Ok(other) => anyhow::bail!("unexpected agent answer {other:?}"),
        Err(PeerError::Remote { message, .. }) if message.contains("unknown variant `publish`") => {
            tracing::debug!(%message, "the agent predates `publish`; building the metainfo here");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Step 1 the two-read way (see [`one_pass`]): the metainfo built here (with `entrypoint`,
/// and for a tree a compression dictionary when `dictionary`), then the file put in the cache
/// by the agent's checked copy or move, or here when no agent runs.
async fn two_reads(
    prepared: &Prepared,
    abs: &Path,
    name: &PackageName,
    announce: &str,
    (entrypoint, dictionary): (Option<Entrypoint>, bool),
    state_dir: &Path,
    cache: &crate::cache::Cache,
) -> anyhow::Result<Placed> {
    let meta = build_metainfo(prepared, announce)
        .with_context(|| format!("cannot read {}", prepared.file.display()))?;
    let meta = match entrypoint {
        Some(e) => meta.with_entrypoint(e)?,
        None => meta,
    };
    let meta = if meta.format == Format::Tree && dictionary {
        with_dictionary(meta, &prepared.file)
    } else {
        meta
    };
    let was_cached = cache.lookup(name, &meta.sha256).is_some();
    let seeded_by_agent = match AgentClient::connect(state_dir).await? {
        Some(agent) => {
            let req = Request::Add {
                name: name.to_string(),
                metainfo_hex: hex::encode(meta.as_bytes()),
                path: abs.to_owned(),
                take: prepared.temporary,
            };
            match agent.call(&req).await? {
                Event::Done { .. } => true,
                other => anyhow::bail!("unexpected agent answer {other:?}"),
            }
        }
        None => {
            let handoff = if prepared.temporary {
                Handoff::Move
            } else {
                Handoff::Copy
            };
            let (c, n, m, p) = (cache.clone(), name.clone(), meta.clone(), abs.to_owned());
            tokio::task::spawn_blocking(move || {
                c.install(&n, &m, &p, handoff, &Default::default())
            })
            .await??;
            warn_no_agent(name, state_dir);
            false
        }
    };
    Ok(Placed {
        meta,
        seeded_by_agent,
        was_cached,
    })
}

/// Undo step 1 of a publish: through the agent (it stops seeding first), or in the cache.
async fn forget(
    state_dir: &Path,
    cache: &crate::cache::Cache,
    name: &PackageName,
    sha256: &fbpkg_common::Sha256Hash,
    via_agent: bool,
) {
    let removed = if via_agent {
        match AgentClient::connect(state_dir).await {
            Ok(Some(agent)) => agent
                .call(&Request::Forget {
                    name: name.to_string(),
                    sha256: sha256.to_hex(),
                })
                .await
                .map(|_| ()),
            Ok(None) => crate::agent::forget_cached(cache, name, sha256),
            Err(e) => Err(e),
        }
    } else {
        crate::agent::forget_cached(cache, name, sha256)
    };
    if let Err(e) = removed {
        eprintln!(
            "fbpkg-rs: warning: could not remove {name}:{sha256} from this host's cache: {e}"
        );
    }
}
