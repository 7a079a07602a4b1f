//! The load generator: a closed loop (as many announces as the tracker answers, for
//! throughput) on per-thread tokio runtimes, and an open loop (a fixed request rate, for
//! latency) on blocking threads that sleep to a precise schedule.
//!
//! Every loop is bounded in time: no request starts after the window's end, and each one is
//! bounded by the per-request timeout. A shared stop flag (Ctrl-C) ends them early.
//!
//! A load may be spread over several trackers (replicas): the closed loop's connections go to
//! them round-robin and are counted per tracker; the open loop's sender threads likewise.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use fbpkg_benches::http1;
use fbpkg_benches::workload::{Outcome, Workload, classify, write_announce};
use rand::rngs::SmallRng;
use rand::{RngExt as _, SeedableRng as _};
use serde::Serialize;

use crate::conn::{self, ExchangeError};

/// Most distinct error messages kept per measurement; the rest are counted as "other".
const MAX_ERROR_KINDS: usize = 8;

/// How requests use connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `Connection: close`: a new TCP connection for every announce.
    ConnPerRequest,
    /// HTTP/1.1 persistent connections.
    KeepAlive,
}

impl Mode {
    /// As printed in the table.
    pub fn label(self) -> &'static str {
        match self {
            Mode::ConnPerRequest => "conn-per-request",
            Mode::KeepAlive => "keep-alive",
        }
    }
}

/// A tracker to load.
#[derive(Debug)]
pub struct Target {
    /// Where it listens.
    pub addr: SocketAddr,
    /// `Host` header value.
    pub host: String,
    /// Set when a reused keep-alive connection turned out closed by the server: from then on
    /// the generator closes after each response instead of losing a request to it.
    pub server_closes: AtomicBool,
}

impl Target {
    /// A tracker listening on `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            host: addr.to_string(),
            server_closes: AtomicBool::new(false),
        }
    }
}

/// What happened to the requests of one measurement.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Counts {
    /// 200 with a bencoded announce response and no `failure reason`: the only ones counted.
    pub ok: u64,
    /// 200 with a `failure reason`.
    pub failures: u64,
    /// Any status but 200.
    pub bad_status: u64,
    /// 200 whose body is not an announce response.
    pub bad_body: u64,
    /// Connect, read or write errors, and malformed or truncated responses.
    pub io_errors: u64,
    /// Requests that took longer than the per-request timeout.
    pub timeouts: u64,
    /// TCP connections opened.
    pub connects: u64,
    /// Keep-alive requests resent because the server had closed the connection.
    pub resent: u64,
    /// Responses after which the server did not close although it should have.
    pub not_closed: u64,
    /// Peers in the counted responses.
    pub peers: u64,
    /// Error messages by kind, with counts.
    pub errors: BTreeMap<String, u64>,
}

impl Counts {
    /// Requests that were not counted as served.
    pub fn not_ok(&self) -> u64 {
        self.failures + self.bad_status + self.bad_body + self.io_errors + self.timeouts
    }

    /// Mean peers per counted response.
    pub fn mean_peers(&self) -> f64 {
        if self.ok == 0 {
            0.0
        } else {
            self.peers as f64 / self.ok as f64
        }
    }

    fn note(&mut self, message: String) {
        self.note_n(message, 1);
    }

    fn note_n(&mut self, message: String, n: u64) {
        let kinds = self.errors.len();
        match self.errors.get_mut(&message) {
            Some(count) => *count += n,
            None if kinds < MAX_ERROR_KINDS => {
                self.errors.insert(message, n);
            }
            None => *self.errors.entry("other".into()).or_default() += n,
        }
    }

    fn outcome(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Ok { peers } => {
                self.ok += 1;
                self.peers += peers as u64;
            }
            Outcome::Failure(reason) => {
                self.failures += 1;
                self.note(format!("failure reason: {reason}"));
            }
            Outcome::Status(s) => {
                self.bad_status += 1;
                self.note(format!("HTTP status {s}"));
            }
            Outcome::BadBody(e) => {
                self.bad_body += 1;
                self.note(format!("body is not an announce response: {e}"));
            }
        }
    }

    fn error(&mut self, e: &Failure) {
        match e {
            Failure::Timeout => self.timeouts += 1,
            _ => self.io_errors += 1,
        }
        self.note(e.label());
    }

    fn events(&mut self, ev: Events) {
        self.connects += ev.connects;
        self.resent += ev.resent;
        self.not_closed += ev.not_closed;
    }

    /// Add `other` into `self`.
    pub fn merge(&mut self, other: Counts) {
        self.ok += other.ok;
        self.failures += other.failures;
        self.bad_status += other.bad_status;
        self.bad_body += other.bad_body;
        self.io_errors += other.io_errors;
        self.timeouts += other.timeouts;
        self.connects += other.connects;
        self.resent += other.resent;
        self.not_closed += other.not_closed;
        self.peers += other.peers;
        for (message, n) in other.errors {
            self.note_n(message, n);
        }
    }
}

/// Why a request was not answered.
#[derive(Debug)]
enum Failure {
    Connect(std::io::Error),
    Exchange(ExchangeError),
    Timeout,
}

impl Failure {
    fn label(&self) -> String {
        match self {
            Failure::Connect(e) => format!("connect: {e}"),
            Failure::Exchange(e) => e.label(),
            Failure::Timeout => "request timed out".into(),
        }
    }
}

/// Connection events of one request.
#[derive(Debug, Default, Clone, Copy)]
struct Events {
    connects: u64,
    resent: u64,
    not_closed: u64,
}

/// Where requests come from.
#[derive(Debug)]
pub enum Source {
    /// Steady state: random swarm, peer and port.
    Random,
    /// Fill every swarm evenly: announces `0..total` of [`Workload::prefill`].
    Prefill {
        /// Announces to send.
        total: u64,
    },
    /// Not announces: `GET` of a random one of these catalog paths (a resolve of
    /// `name:<sha256>`), counted when answered 200 with a JSON object.
    Resolve {
        /// Paths and queries to draw from.
        paths: Arc<Vec<String>>,
    },
}

/// A resolve answer is served when it is a 200 with a JSON object (the version's description).
fn classify_resolve(status: u16, body: &[u8]) -> Outcome {
    if status != 200 {
        Outcome::Status(status)
    } else if body.first() == Some(&b'{') && body.last() == Some(&b'}') {
        Outcome::Ok { peers: 0 }
    } else {
        Outcome::BadBody("not a JSON object".into())
    }
}

/// A closed-loop run: `connections` request loops, each sending its next announce as soon as
/// the previous one is answered.
#[derive(Debug, Clone)]
pub struct ClosedLoop {
    /// Connection use.
    pub mode: Mode,
    /// Concurrent request loops (connections).
    pub connections: usize,
    /// Generator threads, each with its own single-threaded runtime.
    pub threads: usize,
    /// Before the counted window.
    pub warmup: Duration,
    /// The counted window.
    pub duration: Duration,
    /// Longest one request may take.
    pub op_timeout: Duration,
}

struct ClosedCtx {
    targets: Vec<Arc<Target>>,
    workload: Arc<Workload>,
    mode: Mode,
    source: Source,
    next: AtomicU64,
    start: Instant,
    end: Instant,
    op_timeout: Duration,
    stop: Arc<AtomicBool>,
}

/// A load running on its own threads.
#[derive(Debug)]
pub struct Running<T> {
    /// Start of the counted window.
    pub start: Instant,
    /// End of the counted window.
    pub end: Instant,
    handles: Vec<JoinHandle<anyhow::Result<T>>>,
}

impl<T: Send + 'static> Running<T> {
    /// Wait for every thread (they stop by themselves after `end` plus one request timeout).
    pub async fn join(self) -> anyhow::Result<Vec<T>> {
        tokio::task::spawn_blocking(move || {
            self.handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .map_err(|_| anyhow::anyhow!("a load thread panicked"))?
                })
                .collect()
        })
        .await
        .context("joining the load threads")?
    }
}

/// Add each tracker's counts of every thread: one [`Counts`] per target.
pub fn per_target(parts: Vec<Vec<Counts>>, targets: usize) -> Vec<Counts> {
    let mut out = vec![Counts::default(); targets];
    for part in parts {
        for (slot, counts) in out.iter_mut().zip(part) {
            slot.merge(counts);
        }
    }
    out
}

/// Start a closed-loop run against `targets` (connection `i` goes to target `i % len`);
/// counting starts after the warm-up. Each thread returns one [`Counts`] per target.
pub fn start_closed(
    targets: &[Arc<Target>],
    workload: &Arc<Workload>,
    cfg: &ClosedLoop,
    source: Source,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Running<Vec<Counts>>> {
    anyhow::ensure!(!targets.is_empty(), "a load needs a tracker to send to");
    let threads = cfg.threads.clamp(1, cfg.connections.max(1));
    let start = Instant::now() + cfg.warmup;
    let ctx = Arc::new(ClosedCtx {
        targets: targets.to_vec(),
        workload: workload.clone(),
        mode: cfg.mode,
        source,
        next: AtomicU64::new(0),
        start,
        end: start + cfg.duration,
        op_timeout: cfg.op_timeout,
        stop: stop.clone(),
    });
    let mut handles = Vec::with_capacity(threads);
    let mut first = 0;
    for t in 0..threads {
        let conns = cfg.connections / threads + usize::from(t < cfg.connections % threads);
        let ctx = ctx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("load-{t}"))
            .spawn(move || -> anyhow::Result<Vec<Counts>> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("building a load runtime")?;
                rt.block_on(async move {
                    let n = ctx.targets.len();
                    let mut tasks = tokio::task::JoinSet::new();
                    for i in first..first + conns {
                        tasks.spawn(closed_worker(ctx.clone(), i % n));
                    }
                    let mut total = vec![Counts::default(); n];
                    while let Some(done) = tasks.join_next().await {
                        let (target, counts) = done.context("a load task failed")?;
                        total[target].merge(counts);
                    }
                    Ok(total)
                })
            })
            .context("spawning a load thread")?;
        handles.push(handle);
        first += conns;
    }
    Ok(Running {
        start: ctx.start,
        end: ctx.end,
        handles,
    })
}

async fn closed_worker(ctx: Arc<ClosedCtx>, target: usize) -> (usize, Counts) {
    let tracker = &ctx.targets[target];
    let mut counts = Counts::default();
    let mut uncounted = Counts::default();
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let mut conn = None;
    let mut used = false;
    let mut request = Vec::with_capacity(512);
    let mut buf = Vec::with_capacity(4096);
    let close = ctx.mode == Mode::ConnPerRequest;
    loop {
        if ctx.stop.load(Ordering::Relaxed) || Instant::now() >= ctx.end {
            break;
        }
        request.clear();
        let announce = match &ctx.source {
            Source::Random => Some(ctx.workload.random(&mut rng)),
            Source::Prefill { total } => {
                let n = ctx.next.fetch_add(1, Ordering::Relaxed);
                if n >= *total {
                    break;
                }
                Some(ctx.workload.prefill(n, &mut rng))
            }
            Source::Resolve { paths } => {
                let Some(path) = paths.get(rng.random_range(0..paths.len().max(1))) else {
                    break;
                };
                http1::write_get(&mut request, &tracker.host, path, close);
                None
            }
        };
        if let Some(announce) = announce {
            write_announce(&mut request, &tracker.host, &announce, close);
        }
        let mut ev = Events::default();
        let result = tokio::time::timeout(
            ctx.op_timeout,
            request_async(
                &ctx, tracker, &mut conn, &mut used, &mut buf, &request, &mut ev,
            ),
        )
        .await
        .unwrap_or(Err(Failure::Timeout));
        let done = Instant::now();
        let tally = if done >= ctx.start && done < ctx.end {
            &mut counts
        } else {
            &mut uncounted
        };
        tally.events(ev);
        match result {
            Ok(outcome) => tally.outcome(outcome),
            Err(e) => {
                conn = None;
                tally.error(&e);
            }
        }
    }
    if matches!(ctx.source, Source::Prefill { .. }) {
        counts.merge(uncounted);
    }
    (target, counts)
}

/// Whether to keep a connection after a response.
fn keep(target: &Target, mode: Mode, reply: &conn::Reply, buffered: usize) -> bool {
    mode == Mode::KeepAlive
        && !reply.close
        && !target.server_closes.load(Ordering::Relaxed)
        && reply.total == buffered
}

async fn request_async(
    ctx: &ClosedCtx,
    target: &Target,
    conn: &mut Option<tokio::net::TcpStream>,
    used: &mut bool,
    buf: &mut Vec<u8>,
    request: &[u8],
    ev: &mut Events,
) -> Result<Outcome, Failure> {
    loop {
        let stream = match conn {
            Some(s) => s,
            None => {
                let s = conn::connect(target.addr).await.map_err(Failure::Connect)?;
                ev.connects += 1;
                *used = false;
                conn.insert(s)
            }
        };
        match conn::exchange(stream, buf, request).await {
            Ok(reply) => {
                let body = &buf[reply.body.clone()];
                let outcome = match ctx.source {
                    Source::Resolve { .. } => classify_resolve(reply.status, body),
                    _ => classify(reply.status, body),
                };
                if keep(target, ctx.mode, &reply, buf.len()) {
                    *used = true;
                } else {
                    if !conn::await_close(stream).await {
                        ev.not_closed += 1;
                    }
                    *conn = None;
                }
                return Ok(outcome);
            }
            Err(e) if *used && e.retryable() && ev.resent == 0 => {
                target.server_closes.store(true, Ordering::Relaxed);
                ev.resent += 1;
                *conn = None;
            }
            Err(e) => return Err(Failure::Exchange(e)),
        }
    }
}

/// An open-loop run: requests sent at a fixed rate whatever the tracker does, so a slow
/// response delays nothing but itself.
#[derive(Debug, Clone)]
pub struct OpenLoop {
    /// Connection use.
    pub mode: Mode,
    /// Requests per second.
    pub rate: f64,
    /// Sender threads: the most requests in flight at once.
    pub threads: usize,
    /// Before the measured window.
    pub warmup: Duration,
    /// The measured window.
    pub duration: Duration,
    /// Longest one request may take.
    pub op_timeout: Duration,
}

/// What one open-loop thread saw.
#[derive(Debug, Default)]
pub struct OpenResult {
    /// Outcomes in the measured window.
    pub counts: Counts,
    /// Latency of each counted response.
    pub samples: Vec<Duration>,
    /// Requests sent more than 1 ms after their scheduled time because every sender thread
    /// was still waiting on an earlier response.
    pub behind_schedule: u64,
    /// When the slowest responses were sent, and how long they took (over [`STALL`]).
    pub stalls: Vec<(Instant, Duration)>,
}

/// Responses slower than this are kept with their time, to see whether stalls are periodic.
pub const STALL: Duration = Duration::from_millis(5);
/// Most stalls kept per sender thread.
const MAX_STALLS: usize = 1000;

struct OpenCtx {
    targets: Vec<Arc<Target>>,
    workload: Arc<Workload>,
    cfg: OpenLoop,
    t0: Instant,
    start: Instant,
    end: Instant,
    next: AtomicU64,
    stop: Arc<AtomicBool>,
}

/// Start an open-loop run against `targets` (sender thread `t` sends to target `t % len`).
pub fn start_open(
    targets: &[Arc<Target>],
    workload: &Arc<Workload>,
    cfg: &OpenLoop,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Running<OpenResult>> {
    anyhow::ensure!(cfg.rate > 0.0, "the open-loop rate must be positive");
    anyhow::ensure!(!targets.is_empty(), "a load needs a tracker to send to");
    // Leave the threads a moment to start before the first scheduled send.
    let t0 = Instant::now() + Duration::from_millis(20);
    let start = t0 + cfg.warmup;
    let ctx = Arc::new(OpenCtx {
        targets: targets.to_vec(),
        workload: workload.clone(),
        cfg: cfg.clone(),
        t0,
        start,
        end: start + cfg.duration,
        next: AtomicU64::new(0),
        stop: stop.clone(),
    });
    let handles = (0..cfg.threads.max(1))
        .map(|t| {
            let ctx = ctx.clone();
            std::thread::Builder::new()
                .name(format!("probe-{t}"))
                .spawn(move || Ok(open_worker(&ctx, &ctx.targets[t % ctx.targets.len()])))
                .context("spawning a latency thread")
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Running {
        start: ctx.start,
        end: ctx.end,
        handles,
    })
}

fn open_worker(ctx: &OpenCtx, target: &Target) -> OpenResult {
    let mut out = OpenResult::default();
    let mut rng = SmallRng::from_rng(&mut rand::rng());
    let mut conn = None;
    let mut used = false;
    let mut request = Vec::with_capacity(512);
    let mut buf = Vec::with_capacity(4096);
    let period_ns = 1e9 / ctx.cfg.rate;
    let close = ctx.cfg.mode == Mode::ConnPerRequest;
    while !ctx.stop.load(Ordering::Relaxed) {
        let i = ctx.next.fetch_add(1, Ordering::Relaxed);
        let due = ctx.t0 + Duration::from_nanos((i as f64 * period_ns) as u64);
        if due >= ctx.end {
            break;
        }
        let measured = due >= ctx.start;
        request.clear();
        let announce = ctx.workload.random(&mut rng);
        write_announce(&mut request, &target.host, &announce, close);
        let now = Instant::now();
        // Latency counts from the scheduled time when the request is late because the
        // senders were all busy (no coordinated omission), from the actual send otherwise (a
        // sleep that overshoots is the generator's doing, not the tracker's).
        let began = if now < due {
            std::thread::sleep(due - now);
            Instant::now()
        } else {
            if measured && now - due > Duration::from_millis(1) {
                out.behind_schedule += 1;
            }
            due
        };
        let mut ev = Events::default();
        let result = request_blocking(
            ctx, target, &mut conn, &mut used, &mut buf, &request, &mut ev,
        );
        let took = began.elapsed();
        if !measured {
            if result.is_err() {
                conn = None;
            }
            continue;
        }
        out.counts.events(ev);
        match result {
            Ok(outcome) => {
                if matches!(outcome, Outcome::Ok { .. }) {
                    out.samples.push(took);
                    if took > STALL && out.stalls.len() < MAX_STALLS {
                        out.stalls.push((began, took));
                    }
                }
                out.counts.outcome(outcome);
            }
            Err(e) => {
                conn = None;
                out.counts.error(&e);
            }
        }
    }
    out
}

fn request_blocking(
    ctx: &OpenCtx,
    target: &Target,
    conn: &mut Option<std::net::TcpStream>,
    used: &mut bool,
    buf: &mut Vec<u8>,
    request: &[u8],
    ev: &mut Events,
) -> Result<Outcome, Failure> {
    let timed_out = |e: &std::io::Error| {
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        )
    };
    loop {
        let stream = match conn {
            Some(s) => s,
            None => {
                let s = conn::connect_blocking(target.addr, ctx.cfg.op_timeout).map_err(|e| {
                    if timed_out(&e) {
                        Failure::Timeout
                    } else {
                        Failure::Connect(e)
                    }
                })?;
                ev.connects += 1;
                *used = false;
                conn.insert(s)
            }
        };
        match conn::exchange_blocking(stream, buf, request) {
            Ok(reply) => {
                let outcome = classify(reply.status, &buf[reply.body.clone()]);
                if keep(target, ctx.cfg.mode, &reply, buf.len()) {
                    *used = true;
                } else {
                    if !conn::await_close_blocking(stream) {
                        ev.not_closed += 1;
                    }
                    *conn = None;
                }
                return Ok(outcome);
            }
            Err(e) if *used && e.retryable() && ev.resent == 0 => {
                target.server_closes.store(true, Ordering::Relaxed);
                ev.resent += 1;
                *conn = None;
            }
            Err(ExchangeError::Read(e)) if timed_out(&e) => return Err(Failure::Timeout),
            Err(e) => return Err(Failure::Exchange(e)),
        }
    }
}
