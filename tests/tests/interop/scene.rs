//! What every cell is built in: a temp directory, our tracker (embedded, on loopback or on the
//! root end of a test namespace), and the steps the cells share: publish a package, run our
//! agents, have a stock client seed or download, check the result's SHA-256, time the transfer.

use std::ffi::OsString;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fbpkg_common::Sha256Hash;
use fbpkg_common::metainfo::{Format, Metainfo};
use fbpkg_peer::cache::{METAINFO_FILE, sha256_file};
use fbpkg_peer::storage::TREE_DIR;
use fbpkg_tests::{AgentProcess, embedded_tracker, fbpkg_rs, http_client, publish, swarm_peers};
use fbpkg_tracker::Embedded;
use rand::RngExt;
use reqwest::StatusCode;
use tempfile::TempDir;

use super::opentracker::Opentracker;
use super::poll;
use super::stock::{Role, Stock};
use super::tree::{self, EmptyFiles};

/// Overrides every cell's package size (bytes), to time the cells on a larger package.
pub const SIZE_ENV: &str = "FBPKG_INTEROP_BYTES";
/// Set (to anything) to keep each cell's temp directory, client logs included, and print it.
pub const KEEP_ENV: &str = "FBPKG_INTEROP_KEEP";
/// Longest a seed may take to hash the file it was given, and a tracker to list it.
const SEED_READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest a tracker may take to list a seed once it is ready (stock clients announce at
/// once when a torrent starts or completes).
const LISTED_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest the file may take to read whole after the client says it is done, and a client
/// to count what it uploaded.
const VERIFY_TIMEOUT: Duration = Duration::from_secs(10);

/// `default` bytes, unless [`SIZE_ENV`] says otherwise.
pub fn package_bytes(default: usize) -> usize {
    std::env::var(SIZE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// How long a transfer of `bytes` may take: generous for a loaded 2-core machine, still
/// bounded (a healthy one takes well under a second per MiB).
pub fn transfer_timeout(bytes: usize) -> Duration {
    Duration::from_secs(30) + Duration::from_secs(3) * u32::try_from(bytes >> 20).unwrap_or(1000)
}

/// One package: its content and metainfo.
#[derive(Debug)]
pub struct Package {
    /// The name it is published under.
    pub name: String,
    /// Its content.
    pub content: Content,
    /// Its metainfo, as published.
    pub metainfo: Metainfo,
}

/// What a package holds.
#[derive(Debug)]
pub enum Content {
    /// A file package's bytes (the torrent's one file).
    File(Vec<u8>),
    /// A tree package: the directory it was published from (the torrent's files).
    Tree(PathBuf),
}

impl Package {
    /// `size` random bytes as package `name`, its metainfo announcing to `announce`.
    pub fn random(name: &str, size: usize, announce: &str) -> Self {
        let mut bytes = vec![0u8; size];
        rand::rng().fill(&mut bytes[..]);
        Self::new(name, bytes, announce)
    }

    fn new(name: &str, bytes: Vec<u8>, announce: &str) -> Self {
        let metainfo = Metainfo::build(
            &bytes[..],
            bytes.len() as u64,
            &format!("{name}.bin"),
            announce,
            Format::File,
        )
        .expect("building metainfo");
        Self {
            name: name.to_owned(),
            content: Content::File(bytes),
            metainfo,
        }
    }

    /// The same file package announcing elsewhere (the info-hash does not change: `announce`
    /// is outside the info dictionary).
    pub fn announcing_to(self, announce: &str) -> Self {
        let Content::File(bytes) = self.content else {
            panic!("announcing_to is for file packages");
        };
        Self::new(&self.name, bytes, announce)
    }

    /// Bytes a client must fetch: the file's, or the tree's regular files' (padding aside).
    pub fn size(&self) -> usize {
        match &self.content {
            Content::File(bytes) => bytes.len(),
            Content::Tree(_) => usize::try_from(tree::content_bytes(&self.metainfo))
                .expect("a test package fits in memory"),
        }
    }

    /// Info-hash in hex.
    pub fn info_hash(&self) -> String {
        self.metainfo.info_hash.to_hex()
    }

    /// SHA-256 of the content.
    pub fn sha256(&self) -> Sha256Hash {
        self.metainfo.sha256
    }

    /// The metainfo file's bytes.
    pub fn torrent(&self) -> &[u8] {
        self.metainfo.as_bytes()
    }
}

/// A cell's world: temp directory and our tracker.
#[derive(Debug)]
pub struct Scene {
    cell: &'static str,
    dir: TempDir,
    tracker: Option<Embedded>,
    url: String,
    ip: Ipv4Addr,
    http: reqwest::Client,
}

impl Scene {
    /// A scene for `cell` with our tracker listening on `ip` (127.0.0.1, or the root end of a
    /// test namespace). `min interval` 1 s and `interval` 2 s, so stock clients that learn of
    /// a peer only by re-announcing do so quickly.
    pub async fn new(cell: &'static str, ip: Ipv4Addr) -> Self {
        let mut dir = tempfile::tempdir().expect("temp dir");
        if std::env::var_os(KEEP_ENV).is_some() {
            dir.disable_cleanup(true);
            eprintln!("{cell}: keeping {}", dir.path().display());
        }
        let tracker = embedded_tracker(&dir.path().join("tracker"), |c| {
            c.listen = SocketAddr::from((ip, 0));
            c.announce_interval = Duration::from_secs(2);
            c.min_announce_interval = Duration::from_secs(1);
        })
        .await;
        let url = format!("http://{}", tracker.addr);
        Self {
            cell,
            dir,
            tracker: Some(tracker),
            url,
            ip,
            http: http_client(),
        }
    }

    /// `<temp>/<sub>`, created.
    pub fn path(&self, sub: &str) -> PathBuf {
        let p = self.dir.path().join(sub);
        std::fs::create_dir_all(&p).unwrap_or_else(|e| panic!("mkdir {}: {e}", p.display()));
        p
    }

    /// Our tracker's announce URL.
    pub fn announce_url(&self) -> String {
        format!("{}/announce", self.url)
    }

    /// `size` random bytes as package `name` announcing to our tracker, published to its
    /// catalog.
    pub async fn publish_random(&self, name: &str, size: usize) -> Package {
        let package = Package::random(name, size, &self.announce_url());
        self.publish(&package).await;
        package
    }

    /// The directory `dir` as tree package `name` announcing to our tracker (the metainfo
    /// `fbpkg-rs publish NAME DIR` would make), published to its catalog.
    pub async fn publish_tree(&self, name: &str, dir: &Path) -> Package {
        let items = fbpkg_peer::archive::tree_items(dir).expect("walking the tree");
        let metainfo = Metainfo::build_tree(
            items,
            |p| std::fs::File::open(p.iter().fold(dir.to_owned(), |at, c| at.join(c))),
            name,
            &self.announce_url(),
        )
        .expect("building the tree's metainfo");
        let package = Package {
            name: name.to_owned(),
            content: Content::Tree(dir.to_owned()),
            metainfo,
        };
        self.publish(&package).await;
        package
    }

    /// Publish `package`'s metainfo to our tracker's catalog (what `get name:sha256` asks).
    pub async fn publish(&self, package: &Package) {
        let status = publish(&self.http, &self.url, &package.name, &package.metainfo)
            .await
            .unwrap_or_else(|e| panic!("publishing {}: {e}", package.name));
        assert_eq!(status, StatusCode::CREATED, "publishing {}", package.name);
    }

    /// Our agent `label`, listening on the scene's address, announcing to our tracker.
    pub async fn agent(&self, label: &str) -> AgentProcess {
        self.agent_with(label, &[]).await
    }

    /// [`Scene::agent`] with `extra` flags.
    pub async fn agent_with(&self, label: &str, extra: &[&str]) -> AgentProcess {
        let base = self.path(label);
        AgentProcess::start_at(
            self.ip,
            &base.join("state"),
            &base.join("cache"),
            &self.url,
            extra,
        )
        .await
        .unwrap_or_else(|e| panic!("starting agent {label}: {e}"))
    }

    /// `fbpkg-rs publish NAME FILE` through `agent`: `size` random bytes, which the agent then
    /// seeds from its cache. Returns once our tracker lists the agent as a seeder.
    pub async fn agent_publishes(&self, agent: &AgentProcess, name: &str, size: usize) -> Package {
        let mut bytes = vec![0u8; size];
        rand::rng().fill(&mut bytes[..]);
        let file = self.path("published").join(format!("{name}.bin"));
        std::fs::write(&file, &bytes).expect("writing the package");
        self.agent_publishes_content(agent, name, &file, Content::File(bytes))
            .await
    }

    /// `fbpkg-rs publish NAME DIR` through `agent`: the directory `dir` as a tree package,
    /// which the agent seeds from its cached tree. Returns once our tracker lists the agent.
    pub async fn agent_publishes_tree(
        &self,
        agent: &AgentProcess,
        name: &str,
        dir: &Path,
    ) -> Package {
        let package = self
            .agent_publishes_content(agent, name, dir, Content::Tree(dir.to_owned()))
            .await;
        assert_eq!(package.metainfo.format, Format::Tree, "publish {name} DIR");
        package
    }

    async fn agent_publishes_content(
        &self,
        agent: &AgentProcess,
        name: &str,
        path: &Path,
        content: Content,
    ) -> Package {
        let mut args: Vec<OsString> = vec!["publish".into(), name.into(), path.into()];
        args.extend(agent.host_args());
        let out = fbpkg_rs(args, Duration::from_secs(60)).await;
        assert!(out.success(), "publish: {out}");
        let sha = out
            .line()
            .strip_prefix(&format!("{name}:"))
            .unwrap_or_else(|| panic!("publish printed {:?}", out.line()))
            .to_owned();
        let torrent = agent.cache_dir().join(name).join(&sha).join(METAINFO_FILE);
        let metainfo = Metainfo::parse(&std::fs::read(&torrent).expect("the cached metainfo"))
            .expect("parsing the cached metainfo");
        let package = Package {
            name: name.to_owned(),
            content,
            metainfo,
        };
        if let Err(e) = self
            .wait_listed_seeder(&package, agent.listen(), None)
            .await
        {
            panic!("{e}\nthe agent:\n{}", agent.log_tail());
        }
        package
    }

    /// `fbpkg-rs get NAME:SHA256` through `agent`; checks the path it prints holds the
    /// package's bytes and returns how long the `get` took. `Err` says why it failed, with
    /// the agent's log.
    pub async fn agent_gets(
        &self,
        agent: &AgentProcess,
        package: &Package,
    ) -> Result<Duration, String> {
        let size = package.size();
        let reference = format!("{}:{}", package.name, package.sha256());
        let mut args: Vec<OsString> = vec![
            "get".into(),
            reference.into(),
            "--stall-timeout".into(),
            "20s".into(),
        ];
        args.extend(agent.host_args());
        let started = Instant::now();
        let out = fbpkg_rs(args, transfer_timeout(size)).await;
        let took = started.elapsed();
        if !out.success() {
            return Err(format!("fbpkg-rs get: {out}\nagent:\n{}", agent.log_tail()));
        }
        let expected = agent
            .cache_dir()
            .join(&package.name)
            .join(package.sha256().to_hex())
            .join(match package.content {
                Content::File(_) => package.metainfo.name.as_str(),
                Content::Tree(_) => TREE_DIR,
            });
        if Path::new(out.line()) != expected {
            return Err(format!(
                "get printed {}, not {}",
                out.line(),
                expected.display()
            ));
        }
        self.verify(&expected, package, EmptyFiles::Required)
            .await?;
        Ok(took)
    }

    /// Have `stock` seed `package`: its file (or tree) written to `<label>/`, the torrent added, and
    /// wait until the client has hashed it and calls itself complete. Then wait until our
    /// tracker lists it as a seeder, or `opentracker` counts a seeder when given.
    pub async fn stock_seeds(
        &self,
        stock: &Stock,
        package: &Package,
        label: &str,
        opentracker: Option<&Opentracker>,
    ) -> String {
        let dir = self.path(label);
        let copy = dir.join(&package.metainfo.name);
        match &package.content {
            Content::File(bytes) => std::fs::write(&copy, bytes).expect("writing the seed's copy"),
            Content::Tree(from) => {
                tree::copy(from, &copy, &package.metainfo).expect("copying the seed's tree")
            }
        }
        let handle = stock
            .add(package.torrent(), &package.info_hash(), &dir, Role::Seed)
            .await
            .unwrap_or_else(|e| panic!("{label}: adding the torrent: {e}"));
        let (s, h) = (stock, handle.as_str());
        let checked = poll(
            &format!("{label} to check its copy"),
            SEED_READY_TIMEOUT,
            || async move {
                s.check_alive()?;
                match s.status(h).await? {
                    st if st.complete => Ok(()),
                    st => Err(st.detail),
                }
            },
        )
        .await;
        if let Err(e) = checked {
            panic!("{e}\n{}", stock.diagnosis(&handle).await);
        }
        let listed = self
            .wait_listed_seeder(package, stock.peer_addr(), opentracker)
            .await;
        if let Err(e) = listed {
            panic!("{e}\n{}", stock.diagnosis(&handle).await);
        }
        handle
    }

    /// Have `stock` download `package` into `<label>/` from whoever the tracker names; checks
    /// the file's SHA-256 (a tree's files, file by file) and returns how long the transfer took (torrent added to complete).
    /// `Err` says why it failed, with the client's own account.
    pub async fn stock_downloads(
        &self,
        stock: &Stock,
        package: &Package,
        label: &str,
    ) -> Result<Duration, String> {
        let dir = self.path(label);
        let size = package.size();
        let started = Instant::now();
        let handle = stock
            .add(
                package.torrent(),
                &package.info_hash(),
                &dir,
                Role::Download,
            )
            .await
            .unwrap_or_else(|e| panic!("{label}: adding the torrent: {e}"));
        let (s, h) = (stock, handle.as_str());
        let done = poll(
            &format!("{label} to download {size} bytes"),
            transfer_timeout(size),
            || async move {
                s.check_alive()?;
                match s.status(h).await? {
                    st if st.complete => Ok(()),
                    st => Err(st.detail),
                }
            },
        )
        .await;
        let took = started.elapsed();
        if let Err(e) = done {
            return Err(format!("{e}\n{}", stock.diagnosis(&handle).await));
        }
        self.verify(
            &dir.join(&package.metainfo.name),
            package,
            stock.kind().empty_files(),
        )
        .await?;
        Ok(took)
    }

    /// Wait until the file at `path` has the package's SHA-256, or the directory at `path`
    /// holds the tree's files ([`tree::compare`]): a client may say "done" a moment before
    /// its last write reaches the file; a wrong file never passes.
    /// `empty` says whether a tree's empty files must be there.
    pub async fn verify(
        &self,
        path: &Path,
        package: &Package,
        empty: EmptyFiles,
    ) -> Result<(), String> {
        if let Content::Tree(published) = &package.content {
            let meta = &package.metainfo;
            return poll(
                &format!("{} to hold the published tree", path.display()),
                VERIFY_TIMEOUT,
                || async move {
                    let (got, want, meta) = (path.to_owned(), published.clone(), meta.clone());
                    tokio::task::spawn_blocking(move || tree::compare(&got, &want, &meta, empty))
                        .await
                        .map_err(|e| e.to_string())?
                },
            )
            .await;
        }
        let want = package.sha256();
        poll(
            &format!("{} to have the published SHA-256", path.display()),
            VERIFY_TIMEOUT,
            || async move {
                let path = path.to_owned();
                let got = tokio::task::spawn_blocking(move || sha256_file(&path))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                if got == want {
                    Ok(())
                } else {
                    Err(format!("SHA-256 {got}, published {want}"))
                }
            },
        )
        .await
    }

    /// Wait until `addr` is a seeder of `package`: in our tracker's listing, or by
    /// `opentracker`'s count when given.
    pub async fn wait_listed_seeder(
        &self,
        package: &Package,
        addr: SocketAddr,
        opentracker: Option<&Opentracker>,
    ) -> Result<(), String> {
        match opentracker {
            Some(ot) => {
                let hash = &package.metainfo.info_hash;
                poll(
                    "opentracker to count a seeder",
                    LISTED_TIMEOUT,
                    || async move {
                        ot.check_alive()?;
                        match ot.seeders(hash).await? {
                            n if n >= 1 => Ok(()),
                            n => Err(format!("{n} seeders")),
                        }
                    },
                )
                .await
            }
            None => {
                let (hash, addr) = (package.info_hash(), addr.to_string());
                let (c, u, h, a) = (&self.http, self.url.as_str(), &hash, &addr);
                poll(
                    &format!("our tracker to list {addr} as a seeder"),
                    LISTED_TIMEOUT,
                    || async move {
                        let peers = swarm_peers(c, u, h).await?;
                        if peers.contains(&(a.clone(), 0)) {
                            Ok(())
                        } else {
                            Err(format!("{peers:?}"))
                        }
                    },
                )
                .await
            }
        }
    }

    /// Wait until `stock` says it uploaded at least the whole package for `handle`: the
    /// download came from it (clients update their counters a moment after the bytes left).
    pub async fn wait_uploaded(&self, stock: &Stock, handle: &str, bytes: usize) {
        let uploaded = poll(
            "the seed to count what it uploaded",
            VERIFY_TIMEOUT,
            || async move {
                match stock.status(handle).await? {
                    s if s.uploaded >= bytes as u64 => Ok(()),
                    s => Err(format!("uploaded {}: {}", s.uploaded, s.detail)),
                }
            },
        )
        .await;
        if let Err(e) = uploaded {
            panic!("{e}\n{}", stock.diagnosis(handle).await);
        }
    }

    /// Wait until `agent` says it uploaded at least the whole `package`.
    pub async fn wait_agent_uploaded(&self, agent: &AgentProcess, package: &Package) {
        let (sha, bytes) = (package.sha256().to_hex(), package.size() as u64);
        let sha = &sha;
        let uploaded = poll(
            "the agent to count what it uploaded",
            VERIFY_TIMEOUT,
            || async move {
                let status = agent.status().await?;
                match status.iter().find(|t| &t.sha256 == sha) {
                    Some(t) if t.uploaded >= bytes => Ok(()),
                    _ => Err(format!("{status:?}")),
                }
            },
        )
        .await;
        if let Err(e) = uploaded {
            panic!("{e}\nthe agent:\n{}", agent.log_tail());
        }
    }

    /// Print the transfer time as one greppable line: `interop-timing cell=NAME bytes=N
    /// secs=S` (shown with `--nocapture`).
    pub fn report(&self, bytes: usize, took: Duration) {
        eprintln!(
            "interop-timing cell={} bytes={bytes} secs={:.3}",
            self.cell,
            took.as_secs_f64()
        );
    }

    /// Stop our tracker (the temp directory goes when the scene is dropped, unless
    /// [`KEEP_ENV`] is set).
    pub async fn finish(mut self) {
        if let Some(t) = self.tracker.take() {
            let _ = fbpkg_tests::stop_tracker(t).await;
        }
    }
}
