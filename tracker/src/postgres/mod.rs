//! PostgreSQL, where tracker replicas share the catalog, tags and rollouts
//! (`--catalog postgres://...`).
//!
//! One [`Pg`] per tracker owns a small runtime of its own (one worker thread): the connection
//! pool, the listener and the controller lease live there. The catalog and the rollout store
//! are synchronous (their callers are already on the blocking pool, as they were for fsync),
//! so they call [`Pg::run`], which blocks the calling thread on the database's runtime with a
//! deadline. Nothing on a serving thread ever waits for the database: reads are answered from
//! each replica's memory, which the listener keeps current.
//!
//! **Between replicas.** A write commits its rows and a `pg_notify` in one transaction; every
//! replica `LISTEN`s and reloads what a notification names ([`Notice`]), so a publish or a tag
//! move on one replica is seen by the others as soon as the commit is. After the listener
//! (re)connects it asks for a full reload, since notifications sent while it was away are
//! lost.
//!
//! **Faults.** A call that cannot get a connection or an answer within `--catalog-timeout`
//! fails with [`TrackerError::Unavailable`] (503); reads go on from memory; `/readyz` names the
//! database. Connections come back by themselves (the pool makes new ones, the listener
//! retries every second).
//!
//! **Schema.** The migrations in `migrations/` are embedded and applied at start, in one
//! transaction under an advisory lock, so replicas starting together apply them once. A
//! database already at a newer schema than this build knows is refused.

mod lease;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::mpsc;
use tokio_postgres::config::SslMode;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{AsyncMessage, NoTls, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

pub use self::lease::Lease;
use crate::error::TrackerError;

/// The channel catalog changes are announced on; the payload is the package name.
pub const CATALOG_CHANNEL: &str = "fbpkg_catalog";
/// The channel rollout changes are announced on; the payload is `name:tag`.
pub const ROLLOUT_CHANNEL: &str = "fbpkg_rollouts";

/// Embedded migrations, applied in order; the number is the schema version each leaves.
const MIGRATIONS: &[(i32, &str)] = &[
    (1, include_str!("migrations/001_catalog.sql")),
    (2, include_str!("migrations/002_rollout_hosts.sql")),
];

/// Any constant: the advisory lock key under which replicas migrate one at a time.
const MIGRATION_LOCK: i64 = 0x6662_706b_6d69_6772; // "fbpkmigr"

/// How long the listener waits before reconnecting.
const LISTEN_RETRY: Duration = Duration::from_secs(1);

/// Connections in the pool: writes are serialised per replica, so a few suffice.
const POOL_SIZE: usize = 4;

/// What the listener tells the tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    /// Something named `payload` changed on `channel` (committed by some replica).
    Changed {
        /// [`CATALOG_CHANNEL`] or [`ROLLOUT_CHANNEL`].
        channel: String,
        /// What changed.
        payload: String,
    },
    /// The listener (re)connected: notifications may have been missed, reload everything.
    Resync,
}

/// A tracker's handle on PostgreSQL.
#[derive(Debug)]
pub struct Pg {
    /// Always `Some` until drop, which shuts it down without waiting: the last handle may be
    /// dropped on an async task, where a blocking shutdown would panic.
    rt: Option<tokio::runtime::Runtime>,
    pool: Pool,
    config: tokio_postgres::Config,
    /// The pool's TLS, for the sessions made outside it (the controller's lease).
    tls: Tls,
    timeout: Duration,
    shown: String,
}

/// An advisory lock held by a session of its own ([`Pg::hold`]); dropping it ends the
/// session, which releases the lock.
pub struct Hold {
    _session: deadpool_postgres::ClientWrapper,
}

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hold")
    }
}

/// The connector the pool's sessions use, when the URL asks for TLS.
struct Tls(Option<MakeRustlsConnect>);

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "tls" } else { "plain" })
    }
}

/// `postgres://` URL parsing, for `--catalog`'s validation.
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config, TrackerError> {
    url.parse::<tokio_postgres::Config>()
        .map_err(|e| TrackerError::Config(format!("--catalog: not a usable PostgreSQL URL: {e}")))
}

/// `host:port/dbname` of a config, without user or password.
fn shown(config: &tokio_postgres::Config) -> String {
    let host = config
        .get_hosts()
        .first()
        .map(|h| match h {
            tokio_postgres::config::Host::Tcp(s) => s.clone(),
            tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
        })
        .unwrap_or_else(|| "localhost".into());
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "postgres://{host}:{port}/{}",
        config.get_dbname().unwrap_or("")
    )
}

impl Pg {
    /// Connect to `url`, apply the migrations, and start listening. Returns the handle and
    /// the notices (the first one is a [`Notice::Resync`] once the listener is up).
    ///
    /// Blocks (connecting, migrating); safe to call from inside an async runtime.
    ///
    /// With `sslmode=require` in the URL the connections use TLS: the server's certificate
    /// must verify against `tls.ca` (or the system's CAs), and `tls.identity` is shown to a
    /// server that asks for a client certificate.
    pub fn open(
        url: &str,
        tls: &crate::tls::TlsFiles,
        timeout: Duration,
    ) -> Result<(Arc<Self>, mpsc::UnboundedReceiver<Notice>), TrackerError> {
        let mut config = parse_url(url)?;
        config.connect_timeout(timeout);
        let tls = match config.get_ssl_mode() {
            SslMode::Require => Some(MakeRustlsConnect::new(crate::tls::client_config(tls)?)),
            _ if !tls.is_empty() => {
                return Err(TrackerError::Config(format!(
                    "{}-ca, -cert and -key are for a catalog URL with sslmode=require",
                    tls.flags
                )));
            }
            _ => None,
        };
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("postgres")
            .enable_all()
            .build()
            .map_err(|e| TrackerError::storage("starting the PostgreSQL runtime", e))?;
        // A connection that survived a database restart only in our pool is found out before
        // use, not by the write it was lent for.
        let recycling = || ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        };
        let manager = match &tls {
            Some(tls) => Manager::from_config(config.clone(), tls.clone(), recycling()),
            None => Manager::from_config(config.clone(), NoTls, recycling()),
        };
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(timeout))
            .create_timeout(Some(timeout))
            .recycle_timeout(Some(timeout))
            .build()
            .map_err(|e| TrackerError::Config(format!("--catalog: {e}")))?;
        let pg = Arc::new(Self {
            rt: Some(rt),
            pool,
            shown: shown(&config),
            config,
            tls: Tls(tls.clone()),
            timeout,
        });
        pg.run("applying the schema migrations", migrate)?;
        let (tx, rx) = mpsc::unbounded_channel();
        match tls {
            Some(tls) => pg.rt().spawn(listen(pg.config.clone(), tls, tx)),
            None => pg.rt().spawn(listen(pg.config.clone(), NoTls, tx)),
        };
        tracing::info!(database = %pg.shown, "catalog in PostgreSQL; schema up to date");
        Ok((pg, rx))
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("the runtime lives until drop")
    }

    /// `postgres://host:port/db`, without credentials.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Run `f` with a pooled connection on the database's runtime, blocking this thread until
    /// it is done or the deadline passes. Call it where blocking is allowed (the blocking pool,
    /// start-up), never on a serving task.
    pub fn run<T, F, Fut>(&self, what: &str, f: F) -> Result<T, TrackerError>
    where
        T: Send,
        F: FnOnce(deadpool_postgres::Object) -> Fut + Send,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        let timeout = self.timeout;
        // On a thread of its own: `block_on` panics on a thread that is inside a runtime (the
        // tracker's start, a test), and one thread per write costs little beside a commit.
        std::thread::scope(|s| {
            s.spawn(|| self.block_on_with_deadline(what, timeout, f))
                .join()
                .unwrap_or_else(|_| {
                    Err(TrackerError::storage(
                        what.to_owned(),
                        std::io::Error::other("the database call panicked"),
                    ))
                })
        })
    }

    fn block_on_with_deadline<T, F, Fut>(
        &self,
        what: &str,
        timeout: Duration,
        f: F,
    ) -> Result<T, TrackerError>
    where
        F: FnOnce(deadpool_postgres::Object) -> Fut,
        Fut: Future<Output = Result<T, tokio_postgres::Error>>,
    {
        self.rt().block_on(async {
            let call = async {
                let client = self
                    .pool
                    .get()
                    .await
                    .map_err(|e| unavailable(&self.shown, what, &e))?;
                f(client).await.map_err(|e| db_error(&self.shown, what, &e))
            };
            match tokio::time::timeout(timeout, call).await {
                Ok(r) => r,
                Err(_) => Err(unavailable(
                    &self.shown,
                    what,
                    &std::io::Error::other(format!("no answer within {timeout:?}")),
                )),
            }
        })
    }

    /// Hold the advisory lock `(class, key)` (hashed) on a session of its own until the
    /// returned [`Hold`] drops: every replica asking for the same pair waits meanwhile (up to
    /// its deadline). Blocks like [`Pg::run`].
    pub fn hold(&self, what: &str, class: &str, key: &str) -> Result<Hold, TrackerError> {
        let (class, key) = (class.to_owned(), key.to_owned());
        self.run(what, |db| async move {
            // Out of the pool for good: the session ends when the hold drops, and PostgreSQL
            // lets go of the lock with it, whatever happened meanwhile (a deadline passed
            // mid-wait, a query failed). A session back in the pool would keep the lock.
            let session = deadpool_postgres::Object::take(db);
            notice_a_dead_client(&session).await;
            session
                .execute(
                    "SELECT pg_advisory_lock(hashtext($1), hashtext($2))",
                    &[&class, &key],
                )
                .await?;
            Ok(Hold { _session: session })
        })
    }

    /// Does the database answer (`SELECT 1` within the deadline)? For `/readyz`, from any
    /// async task: the query runs on the database's runtime.
    pub async fn ping(self: &Arc<Self>) -> Result<(), String> {
        let pg = self.clone();
        let timeout = self.timeout;
        let ping = self.rt().spawn(async move {
            let call = async {
                let client = pg.pool.get().await.map_err(|e| e.to_string())?;
                client
                    .simple_query("SELECT 1")
                    .await
                    .map(drop)
                    .map_err(|e| e.to_string())
            };
            tokio::time::timeout(timeout, call)
                .await
                .unwrap_or_else(|_| Err(format!("no answer within {timeout:?}")))
        });
        ping.await.unwrap_or_else(|e| Err(e.to_string()))
    }

    /// Hold the advisory lock `key` whenever possible: the rollout controller runs on the one
    /// replica that holds it, and another takes it over when that one dies (its session ends,
    /// PostgreSQL releases the lock).
    pub fn lease(&self, key: i64) -> Lease {
        Lease::start(
            self.rt(),
            self.config.clone(),
            self.tls.0.clone(),
            key,
            self.timeout,
        )
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Asked of a session that holds an advisory lock: that the server notice within about 40 s
/// that its client is gone without closing the connection (its host lost power or panicked,
/// or the network was cut), where the kernel's default is over two hours, all that time the
/// lock (the rollout controller's lease, a tag's change) held by nobody.
const KEEPALIVES: &str =
    "SET tcp_keepalives_idle = 20; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 4";

/// Set [`KEEPALIVES`] on `session`. A server that refuses them (a pooler in the way) leaves
/// the lock held as the kernel's defaults have it: said, not fatal.
async fn notice_a_dead_client(session: &tokio_postgres::Client) {
    if let Err(e) = session.batch_execute(KEEPALIVES).await {
        tracing::warn!(
            error = %e,
            "cannot set TCP keepalives on a locking session: the server may hold its lock for hours after this host is gone"
        );
    }
}

fn unavailable(shown: &str, what: &str, e: &dyn std::error::Error) -> TrackerError {
    // The causes too: "error performing TLS handshake" alone does not say which certificate.
    let mut why = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        why.push_str(": ");
        why.push_str(&c.to_string());
        cause = c.source();
    }
    TrackerError::Unavailable(format!(
        "catalog database {shown} unavailable ({what}): {why}"
    ))
}

/// A connection that broke is the database being unavailable; an error the server returned
/// (a constraint, a failed migration) is a storage error.
fn db_error(shown: &str, what: &str, e: &tokio_postgres::Error) -> TrackerError {
    match e.as_db_error() {
        Some(db) if !e.is_closed() => TrackerError::storage(
            format!("{what} in {shown}"),
            std::io::Error::other(format!("{} ({})", db.message(), db.code().code())),
        ),
        _ => unavailable(shown, what, e),
    }
}

async fn migrate(mut client: deadpool_postgres::Object) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS fbpkg_schema (
             version integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let row = tx
        .query_one("SELECT coalesce(max(version), 0) FROM fbpkg_schema", &[])
        .await?;
    let at: i32 = row.get(0);
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if at > known {
        // Refusing beats writing rows an older schema does not describe.
        tx.batch_execute(&format!(
            "DO $$ BEGIN RAISE EXCEPTION 'the database schema is at version {at}; this tracker \
             knows versions up to {known}: upgrade the tracker'; END $$"
        ))
        .await?;
    }
    for (version, sql) in MIGRATIONS.iter().filter(|m| m.0 > at) {
        tx.batch_execute(sql).await?;
        tx.execute("INSERT INTO fbpkg_schema (version) VALUES ($1)", &[version])
            .await?;
        tracing::info!(version, "applied a catalog schema migration");
    }
    tx.commit().await
}

/// Keep a connection that `LISTEN`s on both channels, and forward what arrives; reconnect
/// after a second when it breaks. Ends when the tracker drops the receiver.
async fn listen<T>(config: tokio_postgres::Config, tls: T, tx: mpsc::UnboundedSender<Notice>)
where
    T: MakeTlsConnect<Socket> + Clone,
    T::Stream: Send + 'static,
{
    let mut warned = false;
    while !tx.is_closed() {
        match config.connect(tls.clone()).await {
            Ok((client, mut connection)) => {
                let (msg_tx, mut msg_rx) = mpsc::unbounded_channel();
                // The connection is driven here, forwarding notifications, until it closes.
                let driver = tokio::spawn(async move {
                    loop {
                        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                            Some(Ok(AsyncMessage::Notification(n))) => {
                                let _ = msg_tx.send(Notice::Changed {
                                    channel: n.channel().to_owned(),
                                    payload: n.payload().to_owned(),
                                });
                            }
                            Some(Ok(_)) => {}
                            Some(Err(_)) | None => return,
                        }
                    }
                });
                let listening = client
                    .batch_execute(&format!(
                        "LISTEN {CATALOG_CHANNEL}; LISTEN {ROLLOUT_CHANNEL}"
                    ))
                    .await;
                if listening.is_ok() {
                    if warned {
                        tracing::info!("catalog database back: listening for changes again");
                        warned = false;
                    }
                    if tx.send(Notice::Resync).is_err() {
                        return;
                    }
                    while let Some(n) = msg_rx.recv().await {
                        if tx.send(n).is_err() {
                            return;
                        }
                    }
                }
                driver.abort();
            }
            Err(e) => {
                if !warned {
                    tracing::warn!(error = %e, "catalog database unreachable: changes made on other replicas are not seen until it is back");
                    warned = true;
                }
            }
        }
        tokio::time::sleep(LISTEN_RETRY).await;
    }
}
