//! Running the tracker: [`bind`] the listeners, then [`run`] serves until the token is cancelled.
//!
//! One listening socket per serving thread (`SO_REUSEPORT`), each thread with its own
//! single-threaded runtime: the kernel spreads connections over the sockets and a connection
//! lives and dies on one thread. With one shared multi-threaded runtime every short-lived
//! announce connection woke a second worker; profiles showed a quarter of the tracker's time
//! in context switches.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::error::TrackerError;
use crate::front;
use crate::http::{AppState, SharedState, app};
use crate::metrics::Cutoff;
use crate::peer_store::wall_ms;
use crate::postgres::{CATALOG_CHANNEL, Notice, Pg, ROLLOUT_CHANNEL};
use crate::rollout::shared;
use fbpkg_common::pkgref::{PackageName, Tag};

/// Listening sockets for one address, one per serving thread.
#[derive(Debug)]
pub struct Listeners {
    sockets: Vec<std::net::TcpListener>,
    addr: SocketAddr,
}

impl Listeners {
    /// The bound address (with the port the OS chose, if 0 was asked).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

fn reuseport_socket(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s.into())
}

/// Bind `threads` listening sockets to `addr` (0 threads = one per core).
pub fn bind(addr: SocketAddr, threads: usize) -> Result<Listeners, TrackerError> {
    let threads = if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    };
    let err = |e: std::io::Error| TrackerError::Config(format!("cannot listen on {addr}: {e}"));
    let first = reuseport_socket(addr).map_err(err)?;
    let bound = first.local_addr().map_err(err)?;
    let mut sockets = vec![first];
    for _ in 1..threads {
        sockets.push(reuseport_socket(bound).map_err(err)?);
    }
    Ok(Listeners {
        sockets,
        addr: bound,
    })
}

/// Serve until `shutdown` is cancelled, then let open connections finish (at most 10 s).
///
/// Also runs, on the caller's runtime, the sweeper that forgets peers silent for two announce
/// intervals, and with Redis the follower that keeps this replica's copy of the swarms
/// (`peer_store::mirror`).
pub async fn run(
    listeners: Listeners,
    state: SharedState,
    shutdown: CancellationToken,
) -> Result<(), TrackerError> {
    let addr = listeners.addr;
    tracing::info!(
        %addr,
        threads = listeners.sockets.len(),
        data_dir = %state.config.data_dir.display(),
        "tracker listening"
    );
    let sweeper = tokio::spawn(
        sweep(state.clone(), shutdown.clone()).instrument(tracing::info_span!("sweeper")),
    );
    let controller = tokio::spawn(
        crate::rollout::run_controller(state.clone(), shutdown.clone())
            .instrument(tracing::info_span!("rollout_controller")),
    );
    let follower = state
        .notices
        .lock()
        .ok()
        .and_then(|mut n| n.take())
        .map(|notices| {
            tokio::spawn(
                follow_replicas(state.clone(), notices, shutdown.clone())
                    .instrument(tracing::info_span!("replicas")),
            )
        });
    let sharer = state.pg.clone().map(|pg| {
        tokio::spawn(
            share_hosts(state.clone(), pg, shutdown.clone())
                .instrument(tracing::info_span!("host_votes")),
        )
    });
    let copies = state.peers.redis().is_some() && !state.config.no_peer_copies;
    let mirror = copies.then(|| {
        let (state, shutdown) = (state.clone(), shutdown.clone());
        tokio::spawn(
            async move {
                if let Some(store) = state.peers.redis() {
                    crate::peer_store::mirror::follow(store, &state.swarms, shutdown).await;
                }
            }
            .instrument(tracing::info_span!("mirror")),
        )
    });
    let router = app(state.clone());
    let mut done = Vec::new();
    for (i, socket) in listeners.sockets.into_iter().enumerate() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (state, router, shutdown) = (state.clone(), router.clone(), shutdown.clone());
        let span = tracing::Span::current();
        std::thread::Builder::new()
            .name(format!("tracker-{i}"))
            .spawn(move || {
                let _entered = span.enter();
                let served = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| TrackerError::storage("starting a serving thread", e))
                    .and_then(|rt| {
                        rt.block_on(accept_loop(socket, state, router, shutdown.clone()))
                    });
                if served.is_err() {
                    shutdown.cancel();
                }
                let _ = tx.send(served);
            })
            .map_err(|e| TrackerError::storage("starting a serving thread", e))?;
        done.push(rx);
    }
    let mut result = Ok(());
    for rx in done {
        match rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => result = Err(e),
            Err(_) => {
                result = Err(TrackerError::storage(
                    "serving thread",
                    std::io::Error::other("panicked"),
                ))
            }
        }
    }
    shutdown.cancel();
    let _ = sweeper.await;
    let _ = controller.await;
    for task in [follower, sharer, mirror].into_iter().flatten() {
        let _ = task.await;
    }
    tracing::info!(%addr, "tracker stopped");
    result
}

/// Watch a listening socket for readiness.
#[allow(unsafe_code)]
fn register(socket: std::net::TcpListener) -> std::io::Result<AsyncFd<std::net::TcpListener>> {
    // SAFETY: the AsyncFd takes ownership of the listener, which owns its descriptor: it stays
    // open and is the same descriptor until the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(socket, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

async fn accept_loop(
    socket: std::net::TcpListener,
    state: SharedState,
    router: axum::Router,
    shutdown: CancellationToken,
) -> Result<(), TrackerError> {
    // Accepting from the std listener leaves new sockets unregistered with epoll, so a
    // connection answered on the spot (front::serve_immediately) never touches the reactor.
    let listener = register(socket).map_err(|e| TrackerError::storage("listener", e))?;
    let connections = TaskTracker::new();
    'serve: loop {
        let mut ready = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.readable() => r.map_err(|e| TrackerError::storage("listener", e))?,
        };
        loop {
            let (stream, remote) = match listener.get_ref().accept() {
                Ok(a) => a,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    break;
                }
                Err(e) => {
                    // Out of descriptors, typically: back off rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    drop(ready);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue 'serve;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let Some((stream, later)) = front::serve_immediately(stream, remote, &state) else {
                continue;
            };
            // Only connections that outlive their accept take a slot under the cap.
            let Ok(slot) = state.connections.clone().try_acquire_owned() else {
                state.metrics.cutoff(Cutoff::OverCap);
                tracing::debug!(peer = %remote, "connection refused: at the connection cap");
                continue;
            };
            let Ok(stream) = TcpStream::from_std(stream) else {
                continue;
            };
            match later {
                front::Later::Serve(buf) => connections.spawn(front::serve_connection(
                    stream,
                    remote,
                    state.clone(),
                    router.clone(),
                    shutdown.clone(),
                    buf,
                    slot,
                )),
                front::Later::Finish(rest) => {
                    connections.spawn(front::finish(stream, rest, remote, state.clone(), slot))
                }
            };
        }
    }
    drop(listener);
    connections.close();
    if tokio::time::timeout(Duration::from_secs(10), connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("connections still open 10 s after shutdown; closing them");
    }
    Ok(())
}

async fn sweep(state: SharedState, shutdown: CancellationToken) {
    let every = state.config.announce_interval / 2;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(cutoff) = Instant::now().checked_sub(state.config.announce_interval * 2) else {
            continue;
        };
        let s = state.clone();
        // Off the async workers: a sweep of a large tracker takes a while.
        let dropped = tokio::task::spawn_blocking(move || {
            let dropped = s.swarms.sweep(cutoff);
            // Copies of swarms the sweep dropped (unregistered, left empty) go too.
            if let Some(store) = s.peers.redis() {
                store.mirror().retain(|h| s.swarms.get(h).is_some());
            }
            dropped
        })
        .await
        .unwrap_or(0);
        if dropped > 0 {
            tracing::debug!(dropped, "expired silent peers");
        }
    }
}

/// How long a notice whose reload failed first waits before it is applied again; the wait
/// doubles while the retries fail, up to [`MAX_RELOAD_RETRY`].
const RELOAD_RETRY: Duration = Duration::from_secs(1);
/// The longest wait between two retries (the database away for long).
const MAX_RELOAD_RETRY: Duration = Duration::from_secs(60);
/// Notices waiting to be applied again; past this many, one full reload stands for them all
/// (and new notices do not wait behind a long line of retries, each up to a deadline).
const MAX_FAILED_NOTICES: usize = 16;

/// Apply what other replicas committed to the shared catalog: reload the package or tag a
/// notice names (everything after the listener reconnects); the versions published elsewhere
/// get their swarms on the way, so their announces are accepted here.
async fn follow_replicas(
    state: SharedState,
    notices: tokio::sync::mpsc::UnboundedReceiver<Notice>,
    shutdown: CancellationToken,
) {
    let apply = move |notice: Notice| {
        let s = state.clone();
        async move {
            match tokio::task::spawn_blocking(move || apply(&s, notice)).await {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(format!("reload task failed: {e}")),
            }
        }
    };
    apply_notices(notices, shutdown, apply).await;
}

/// Apply each notice; one that fails (the database away, a deadline passed) is applied again
/// after [`RELOAD_RETRY`], then after twice as long, until it succeeds. Dropped, it would
/// leave this replica's memory behind until the same package or tag changed again: hosts
/// resolving a rollout another replica aborted, votes pushed for a rollout that is over.
async fn apply_notices<F, Fut>(
    mut notices: tokio::sync::mpsc::UnboundedReceiver<Notice>,
    shutdown: CancellationToken,
    apply: F,
) where
    F: Fn(Notice) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let mut failed: Vec<Notice> = Vec::new();
    let mut wait = RELOAD_RETRY;
    let retry = tokio::time::sleep(RELOAD_RETRY);
    tokio::pin!(retry);
    loop {
        let (batch, again) = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = notices.recv() => match n {
                Some(n) => (vec![n], false),
                None => return,
            },
            () = &mut retry, if !failed.is_empty() => (std::mem::take(&mut failed), true),
        };
        for notice in batch {
            let applied = apply(notice.clone()).await;
            if applied.is_ok() && !again && !failed.is_empty() {
                // The database answers again: the ones waiting need not wait out the backoff.
                wait = RELOAD_RETRY;
                retry.as_mut().reset(Instant::now());
            }
            if let Err(e) = applied {
                if failed.is_empty() {
                    wait = if again {
                        (wait * 2).min(MAX_RELOAD_RETRY)
                    } else {
                        RELOAD_RETRY
                    };
                    retry.as_mut().reset(Instant::now() + wait);
                }
                if !again {
                    tracing::warn!(error = %e, "could not reload a change made on another replica; trying again");
                }
                keep_for_retry(&mut failed, notice);
            }
        }
        if again && failed.is_empty() {
            tracing::info!("reloaded the changes made on other replicas that had failed");
        }
    }
}

fn keep_for_retry(failed: &mut Vec<Notice>, notice: Notice) {
    if failed.contains(&Notice::Resync) || failed.contains(&notice) {
        return;
    }
    if notice == Notice::Resync || failed.len() >= MAX_FAILED_NOTICES {
        failed.clear();
        failed.push(Notice::Resync);
    } else {
        failed.push(notice);
    }
}

/// Share host votes with the other replicas (see [`crate::rollout::shared`]): push what
/// changed here every `--rollout-tick` (at once when a host appears), and while a rollout is
/// active pull what the others pushed.
async fn share_hosts(state: SharedState, pg: Arc<Pg>, shutdown: CancellationToken) {
    // Rows committed by others up to this long before our last read may not have been visible
    // to it yet (commits in flight, clocks apart): read again.
    const OVERLAP_MS: u64 = 2_000;
    let period = state.config.rollout_tick.max(Duration::from_millis(10));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let host_timeout = u64::try_from(state.config.rollout_host_timeout.as_millis()).unwrap_or(0);
    let mut since = wall_ms().saturating_sub(host_timeout);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
            _ = state.rollouts.host_appeared() => {}
        }
        let (votes, addrs) = state.rollouts.take_dirty();
        let active = state.rollouts.has_active();
        if votes.is_empty() && addrs.is_empty() && !active {
            continue;
        }
        let (s, pg) = (state.clone(), pg.clone());
        let from = since;
        let done = tokio::task::spawn_blocking(move || {
            shared::push(&pg, &votes, &addrs)?;
            if !active {
                return Ok(None);
            }
            let read_at = wall_ms();
            let (votes, addrs) = shared::pull(&pg, from)?;
            s.rollouts.merge_shared(votes, addrs);
            Ok::<_, TrackerError>(Some(read_at))
        })
        .await;
        match done {
            Ok(Ok(read)) => {
                if let Some(at) = read {
                    since = at.saturating_sub(OVERLAP_MS);
                }
                warned = false;
            }
            // Soft state: hosts report again at their next follow interval.
            Ok(Err(e)) if !warned => {
                tracing::warn!(error = %e, "could not share host votes with the other replicas");
                warned = true;
            }
            Ok(Err(_)) => {}
            Err(e) => tracing::error!(error = %e, "host vote task failed"),
        }
    }
}

fn apply(state: &AppState, notice: Notice) -> Result<(), TrackerError> {
    match notice {
        // The versions a reload brings in get their swarms through the catalog's hook
        // (`Catalog::on_new_version`), whoever reloads.
        Notice::Resync => {
            state.catalog.reload_all()?;
            state.rollouts.reload_all()
        }
        Notice::Changed { channel, payload } if channel == CATALOG_CHANNEL => {
            let Ok(name) = PackageName::new(&payload) else {
                return Ok(());
            };
            state.catalog.reload(&name).map(drop)
        }
        Notice::Changed { channel, payload } if channel == ROLLOUT_CHANNEL => {
            let Some((name, tag)) = payload
                .split_once(':')
                .and_then(|(n, t)| Some((PackageName::new(n).ok()?, Tag::new(t).ok()?)))
            else {
                return Ok(());
            };
            state.rollouts.reload(&name, &tag)
        }
        Notice::Changed { .. } => Ok(()),
    }
}

/// A tracker running in this process (the demo and tests embed one).
#[derive(Debug)]
pub struct Embedded {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its state, for inspection.
    pub state: Arc<AppState>,
    /// Cancel to stop it.
    pub shutdown: CancellationToken,
    /// Finishes when it has stopped.
    pub task: tokio::task::JoinHandle<Result<(), TrackerError>>,
}

impl Embedded {
    /// Open the catalog, bind `config.listen` (port 0 picks a free one) and serve in a task.
    pub async fn start(
        config: crate::Config,
        shutdown: CancellationToken,
    ) -> Result<Self, TrackerError> {
        let listeners = bind(config.listen, config.threads)?;
        let addr = listeners.local_addr();
        let state = AppState::open(config)?;
        let task = tokio::spawn(
            run(listeners, state.clone(), shutdown.clone())
                .instrument(tracing::info_span!("tracker", %addr)),
        );
        Ok(Self {
            addr,
            state,
            shutdown,
            task,
        })
    }

    /// The announce URL peers should use.
    pub fn announce_url(&self) -> String {
        format!("http://{}/announce", self.addr)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex;

    use super::*;

    fn changed(payload: &str) -> Notice {
        Notice::Changed {
            channel: ROLLOUT_CHANNEL.into(),
            payload: payload.into(),
        }
    }

    /// A notice whose reload fails is applied again until it succeeds, each wait twice the
    /// last, and at once when another notice shows the database answers again; more than
    /// sixteen failing at once become one full reload.
    #[tokio::test(start_paused = true)]
    async fn a_reload_that_failed_is_tried_again_until_it_succeeds() {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let calls: Arc<Mutex<Vec<(Notice, bool)>>> = Arc::default();
        let times: Arc<Mutex<Vec<Instant>>> = Arc::default();
        let t = times.clone();
        let down = Arc::new(std::sync::atomic::AtomicU32::new(2));
        let (c, d) = (calls.clone(), down.clone());
        let apply = move |n: Notice| {
            let ok = d
                .fetch_update(
                    std::sync::atomic::Ordering::Relaxed,
                    std::sync::atomic::Ordering::Relaxed,
                    |left| left.checked_sub(1),
                )
                .is_err();
            c.lock().unwrap().push((n, ok));
            t.lock().unwrap().push(Instant::now());
            async move {
                if ok {
                    Ok(())
                } else {
                    Err("database away".into())
                }
            }
        };
        let task = tokio::spawn(apply_notices(rx, shutdown.clone(), apply));
        tx.send(changed("app:prod")).unwrap();
        tokio::time::sleep(RELOAD_RETRY * 5).await;
        let seen = calls.lock().unwrap().clone();
        let want = vec![
            (changed("app:prod"), false),
            (changed("app:prod"), false),
            (changed("app:prod"), true),
        ];
        assert_eq!(seen, want, "applied again until it succeeded, then no more");
        let at = times.lock().unwrap().clone();
        let waits: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
        assert_eq!(
            waits,
            [RELOAD_RETRY, RELOAD_RETRY * 2],
            "each wait twice the last"
        );

        calls.lock().unwrap().clear();
        let n = u32::try_from(MAX_FAILED_NOTICES).unwrap() + 1;
        down.store(n, std::sync::atomic::Ordering::Relaxed);
        for i in 0..n {
            tx.send(changed(&format!("app:t{i}"))).unwrap();
        }
        tokio::time::sleep(RELOAD_RETRY * 5).await;
        let seen = calls.lock().unwrap().clone();
        assert_eq!(seen.len(), MAX_FAILED_NOTICES + 2, "{:?}", &seen[..3]);
        assert!(seen[..=MAX_FAILED_NOTICES].iter().all(|(_, ok)| !ok));
        assert_eq!(seen.last().unwrap(), &(Notice::Resync, true));

        // Backing off, and a fresh notice is applied: the database answers; no more waiting.
        calls.lock().unwrap().clear();
        times.lock().unwrap().clear();
        down.store(2, std::sync::atomic::Ordering::Relaxed);
        tx.send(changed("app:x")).unwrap();
        tokio::time::sleep(RELOAD_RETRY + RELOAD_RETRY / 2).await;
        tx.send(changed("app:y")).unwrap();
        tokio::time::sleep(RELOAD_RETRY / 10).await;
        let seen = calls.lock().unwrap().clone();
        let want = vec![
            (changed("app:x"), false),
            (changed("app:x"), false),
            (changed("app:y"), true),
            (changed("app:x"), true),
        ];
        assert_eq!(seen, want);
        let at = times.lock().unwrap().clone();
        assert_eq!(at[3], at[2], "retried as soon as the fresh one was applied");
        shutdown.cancel();
        task.await.unwrap();
    }
}
