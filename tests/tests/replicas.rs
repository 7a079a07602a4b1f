//! Tracker replicas sharing one PostgreSQL (catalog, tags, rollouts) and one Redis (peers),
//! against real servers:
//!
//! - a publish, a tag move and a rollout started on one replica are seen by the others (each
//!   answers from memory, kept current by LISTEN/NOTIFY); a version stored by one cannot be
//!   published with other metainfo through another; tag moves are history rows; versions are
//!   immutable in the database itself;
//! - agents on different replicas: a seed publishes through replica A, a leecher on replica B
//!   fetches it with no copying of catalogs, and B is killed with -9 in the middle of the
//!   download: the download finishes and a replica started afterwards knows everything;
//! - PostgreSQL killed: reads go on from memory, writes answer 503 promptly, `/readyz` stays
//!   200 (the replica still serves) and says the catalog is degraded; PostgreSQL back: the same replicas write again without a restart, and what
//!   one wrote meanwhile-elsewhere is picked up when its listener reconnects;
//! - the rollout controller runs on the replica holding the lease and judges hosts that talk
//!   only to the other replicas (votes shared through the database); kill -9 that replica and
//!   another takes the lease and finishes the next rollout;
//! - a rollout aborted or paused on one replica never moves the tag through another whose
//!   memory has not heard yet: a change reads the record as stored, holding the tag against
//!   every other replica's change.
//!
//! Every test skips, saying so, when PostgreSQL or redis-server is not installed.

use std::ffi::OsString;
use std::time::{Duration, Instant};

use fbpkg_common::api::{
    Report, RolloutRequest, RolloutState, RolloutStatus, TagInfo, VersionInfo,
};
use fbpkg_common::metainfo::Metainfo;
use fbpkg_common::pkgref::{PackageName, Selector, Tag};
use fbpkg_common::rollout::HostId;
use fbpkg_tests::{
    AgentProcess, PostgresServer, RedisServer, TrackerProcess, fbpkg_rs, http_client, move_tag,
    poll, publish, random_package, swarm, wait_for,
};
use fbpkg_tracker::rollout::{Action, Asker, wall_ms};
use fbpkg_tracker::{AppState, CatalogKind, Config, TrackerError};
use reqwest::StatusCode;

/// Long enough for anything on a loaded machine; each wait ends as soon as its condition holds.
const SEEN_WITHIN: Duration = Duration::from_secs(20);

struct Servers {
    pg: PostgresServer,
    redis: RedisServer,
    dir: tempfile::TempDir,
}

/// PostgreSQL and Redis, or `None` (skipped, said on stderr) when either is not installed.
fn servers() -> Option<Servers> {
    let pg = PostgresServer::start().expect("starting PostgreSQL")?;
    let redis = RedisServer::start().expect("starting redis-server")?;
    Some(Servers {
        pg,
        redis,
        dir: tempfile::tempdir().expect("tempdir"),
    })
}

impl Servers {
    /// A replica named `name` (its own --data-dir, the shared stores).
    fn replica(&self, name: &str, extra: &[&str]) -> TrackerProcess {
        let (pg, redis) = (self.pg.url(), self.redis.url());
        let mut args = vec![
            "--catalog",
            &pg,
            "--peer-store",
            &redis,
            "--catalog-timeout",
            "2s",
            "--rollout-tick",
            "50ms",
        ];
        args.extend_from_slice(extra);
        TrackerProcess::start_with_args(&self.dir.path().join(name), &args)
            .unwrap_or_else(|e| panic!("replica {name} starts: {e}"))
    }
}

macro_rules! servers_or_skip {
    () => {
        match servers() {
            Some(s) => s,
            None => return,
        }
    };
}

async fn get_json<T: for<'de> serde::Deserialize<'de>>(url: &str) -> Result<T, String> {
    let resp = http_client()
        .get(url)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| e.to_string())?;
    if status != StatusCode::OK {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    serde_json::from_slice(&body).map_err(|e| e.to_string())
}

/// What `base` resolves `app:<selector>` to.
async fn resolves(base: &str, selector: &str) -> Result<VersionInfo, String> {
    get_json(&format!("{base}/api/v1/packages/app/{selector}")).await
}

async fn readyz(base: &str) -> (StatusCode, String) {
    match http_client().get(format!("{base}/readyz")).send().await {
        Ok(r) => (r.status(), r.text().await.unwrap_or_default()),
        Err(e) => (StatusCode::BAD_GATEWAY, e.to_string()),
    }
}

/// A small random version (`_n` names it in the test).
fn package(_n: u8, announce: &str) -> Metainfo {
    random_package(&mut rand::rng(), 40_000, "app.bin", announce).1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_one_replica_writes_every_replica_answers() {
    let s = servers_or_skip!();
    let replicas = ["a", "b", "c"].map(|n| s.replica(n, &[]));
    let bases = replicas.each_ref().map(TrackerProcess::base_url);
    let client = http_client();
    let (v1, v2) = (
        package(1, &replicas[0].announce_url()),
        package(2, &replicas[0].announce_url()),
    );

    // Published on A: B and C resolve it.
    let t0 = Instant::now();
    let st = publish(&client, &bases[0], "app", &v1)
        .await
        .expect("publish");
    assert_eq!(st, StatusCode::CREATED);
    for base in &bases[1..] {
        let sha = v1.sha256.to_hex();
        wait_for("the version on another replica", SEEN_WITHIN, || {
            let (base, sha) = (base.clone(), sha.clone());
            async move { resolves(&base, &sha).await.map(drop) }
        })
        .await;
    }
    eprintln!(
        "a publish on A was answered by B and C after {:?}",
        t0.elapsed()
    );
    // Its swarm is registered there too (announces for it are accepted).
    let ih = v1.info_hash.to_hex();
    swarm(&client, &bases[2], &ih)
        .await
        .expect("C lists the version's swarm");

    // The same version published again through C is a no-op; other metainfo under its hash
    // is refused, though C never stored it itself.
    assert_eq!(
        publish(&client, &bases[2], "app", &v1)
            .await
            .expect("publish"),
        StatusCode::OK
    );
    let mut tampered = v1.as_bytes().to_vec();
    let pieces = tampered
        .windows(8)
        .position(|w| w == b"6:pieces")
        .expect("piece hashes in the metainfo");
    let at = pieces
        + 8
        + tampered[pieces + 8..]
            .iter()
            .position(|&c| c == b':')
            .expect("a length")
        + 1;
    tampered[at] ^= 1;
    let conflict = client
        .put(format!("{}/api/v1/packages/app/{}", bases[2], v1.sha256))
        .body(tampered)
        .send()
        .await
        .expect("publish tampered");
    assert_eq!(conflict.status(), StatusCode::CONFLICT);

    // A tag moved on B, twice: A and C follow, and both moves are history rows.
    publish(&client, &bases[0], "app", &v2)
        .await
        .expect("publish v2");
    for v in [&v1, &v2] {
        let st = move_tag(&client, &bases[1], "app", "prod", &v.sha256)
            .await
            .expect("move tag");
        assert_eq!(st, StatusCode::OK);
    }
    for base in [&bases[0], &bases[2]] {
        wait_for("the tag on another replica", SEEN_WITHIN, || {
            let base = base.clone();
            let want = v2.sha256;
            async move {
                let tag: TagInfo =
                    get_json(&format!("{base}/api/v1/packages/app/tags/prod")).await?;
                if tag.sha256 == want && tag.history.len() == 2 {
                    Ok(())
                } else {
                    Err(format!("{tag:?}"))
                }
            }
        })
        .await;
    }
    let rows =
        s.pg.psql("SELECT sha256 FROM tag_moves WHERE name = 'app' AND tag = 'prod' ORDER BY id")
            .expect("psql");
    assert_eq!(
        rows.lines().collect::<Vec<_>>(),
        [v1.sha256.to_hex(), v2.sha256.to_hex()]
    );
    // The database itself keeps versions immutable.
    let edit = s.pg.psql("UPDATE versions SET published_at = 0");
    assert!(
        edit.as_ref()
            .is_err_and(|e| e.to_string().contains("never change")),
        "{edit:?}"
    );

    // A rollout started on C is seen on A.
    let v3 = package(3, &replicas[0].announce_url());
    publish(&client, &bases[0], "app", &v3)
        .await
        .expect("publish v3");
    let started = client
        .post(format!("{}/api/v1/rollouts", bases[2]))
        .json(
            &serde_json::json!({"name": "app", "tag": "prod", "to": v3.sha256.to_hex(),
            "phases": ["50", "100"], "bake_ms": 0, "max_failures": "0"}),
        )
        .send()
        .await
        .expect("start a rollout");
    assert!(
        started.status().is_success(),
        "{:?}\n{}",
        started.text().await,
        replicas[2].log_tail()
    );
    wait_for("the rollout on another replica", SEEN_WITHIN, || {
        let base = bases[0].clone();
        async move {
            let st: RolloutStatus = get_json(&format!("{base}/api/v1/rollouts/app/prod")).await?;
            st.current
                .filter(|c| c.rollout.to == v3.sha256)
                .map(drop)
                .ok_or_else(|| "no rollout yet".to_owned())
        }
    })
    .await;
    // Another replica started now loads everything from the database.
    let d = s.replica("d", &[]);
    let tag: TagInfo = get_json(&format!("{}/api/v1/packages/app/tags/prod", d.base_url()))
        .await
        .expect("the tag on a new replica");
    assert_eq!((tag.sha256, tag.history.len()), (v2.sha256, 2));
    let (ready, body) = readyz(&d.base_url()).await;
    assert_eq!(ready, StatusCode::OK, "{body}");
    assert!(body.contains("catalog: postgres://127.0.0.1:"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_keeps_reads_fails_writes_fast_and_heals() {
    let mut s = servers_or_skip!();
    let (a, b) = (s.replica("a", &[]), s.replica("b", &[]));
    let client = http_client();
    let v1 = package(1, &a.announce_url());
    publish(&client, &a.base_url(), "app", &v1)
        .await
        .expect("publish");
    let sha1 = v1.sha256.to_hex();
    wait_for("v1 on B", SEEN_WITHIN, || {
        let (base, sha) = (b.base_url(), sha1.clone());
        async move { resolves(&base, &sha).await.map(drop) }
    })
    .await;

    s.pg.kill().expect("kill PostgreSQL");
    // Reads: from memory, as before.
    for base in [a.base_url(), b.base_url()] {
        resolves(&base, &sha1)
            .await
            .expect("a read without the database");
    }
    // Writes: 503 with the reason, within the deadline (2 s), not a hang.
    let v2 = package(2, &a.announce_url());
    let t0 = Instant::now();
    let resp = client
        .put(format!(
            "{}/api/v1/packages/app/{}",
            a.base_url(),
            v2.sha256
        ))
        .body(v2.as_bytes().to_vec())
        .send()
        .await
        .expect("an answer, not a hang");
    let took = t0.elapsed();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let why = resp.text().await.unwrap_or_default();
    assert!(why.contains("unavailable"), "{why}");
    eprintln!("a publish without the database answered 503 after {took:?}");
    // Still ready (it serves reads and announces), and says what is degraded.
    wait_for("/readyz to name the catalog", SEEN_WITHIN, || {
        let base = a.base_url();
        async move {
            match readyz(&base).await {
                (StatusCode::OK, body) if body.contains("degraded: catalog postgres://") => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;

    s.pg.restart().expect("restart PostgreSQL");
    // The same processes write again: the pool makes new connections.
    let again = poll("publish through A again", SEEN_WITHIN, || {
        let (client, base, v2) = (client.clone(), a.base_url(), v2.clone());
        async move {
            match publish(&client, &base, "app", &v2).await {
                Ok(StatusCode::CREATED | StatusCode::OK) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    if let Err(e) = again {
        panic!(
            "{e}\nA log:\n{}\nPostgreSQL log:\n{}",
            a.log_tail(),
            s.pg.log()
        );
    }
    // And B hears of it: its listener reconnected.
    let sha2 = v2.sha256.to_hex();
    wait_for("v2 on B after the outage", SEEN_WITHIN, || {
        let (base, sha) = (b.base_url(), sha2.clone());
        async move { resolves(&base, &sha).await.map(drop) }
    })
    .await;
    let (ready, body) = readyz(&b.base_url()).await;
    assert_eq!(ready, StatusCode::OK, "{body}");
    assert!(!body.contains("degraded"), "{body}");
}

/// `log` holds a line saying the replica took the controller's lease.
fn took_lease(log: String) -> Result<(), String> {
    if log.contains("took the lease") {
        Ok(())
    } else {
        Err("not yet".to_owned())
    }
}

/// Start a one-phase rollout of app:prod to `to` through `base`.
async fn start_rollout(base: &str, to: &Metainfo) {
    let started = http_client()
        .post(format!("{base}/api/v1/rollouts"))
        .json(
            &serde_json::json!({"name": "app", "tag": "prod", "to": to.sha256.to_hex(),
            "phases": ["100"], "bake_ms": 0, "max_failures": "0"}),
        )
        .send()
        .await
        .expect("start a rollout");
    assert!(started.status().is_success(), "{:?}", started.text().await);
}

/// A host of the fleet: it resolves app:prod through `resolve_at`, checks it gets `want`, and
/// reports it activated through `report_at` (a load balancer's round robin).
async fn host_acts(host: &str, resolve_at: &str, report_at: &str, want: &Metainfo) {
    // As an agent following the tag does: resolve again until the rollout reaches it (the
    // replica hears of a rollout started elsewhere a moment later).
    wait_for("the host to resolve the new version", SEEN_WITHIN, || {
        let selector = format!("prod?host={host}");
        async move {
            let got = resolves(resolve_at, &selector).await?;
            if got.sha256 == want.sha256 {
                Ok(())
            } else {
                Err(format!("resolved {}", got.sha256))
            }
        }
    })
    .await;
    let report = http_client()
        .post(format!("{report_at}/api/v1/reports"))
        .json(
            &serde_json::json!({"name": "app", "hash": want.sha256.to_hex(), "host": host,
            "state": "activated"}),
        )
        .send()
        .await
        .expect("report");
    let status = report.status();
    let body = report.text().await.unwrap_or_default();
    assert!(
        status.is_success() && body.contains("app:prod#"),
        "{status}: {body}"
    );
}

async fn wait_for_tag(base: &str, want: &Metainfo) {
    wait_for("the rollout to finish", SEEN_WITHIN, || {
        let base = base.to_owned();
        async move {
            let tag: TagInfo = get_json(&format!("{base}/api/v1/packages/app/tags/prod")).await?;
            if tag.sha256 == want.sha256 {
                Ok(())
            } else {
                Err(format!("{tag:?}"))
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_controller_judges_every_host_and_moves_when_its_replica_dies() {
    let s = servers_or_skip!();
    let mut a = s.replica("a", &[]);
    // A started first: it holds the lease before the others exist.
    wait_for("A to hold the lease", SEEN_WITHIN, || {
        let log = a.log_tail();
        async move { took_lease(log) }
    })
    .await;
    let (b, c) = (s.replica("b", &[]), s.replica("c", &[]));
    let client = http_client();
    let vs = [1, 2, 3].map(|n| package(n, &a.announce_url()));
    for v in &vs {
        publish(&client, &a.base_url(), "app", v)
            .await
            .expect("publish");
    }
    move_tag(&client, &a.base_url(), "app", "prod", &vs[0].sha256)
        .await
        .expect("tag");

    // The host talks to B and C only; A's controller hears of it through the database.
    start_rollout(&a.base_url(), &vs[1]).await;
    host_acts("host-1", &b.base_url(), &c.base_url(), &vs[1]).await;
    wait_for_tag(&a.base_url(), &vs[1]).await;
    for r in [&b, &c] {
        assert!(
            took_lease(r.log_tail()).is_err(),
            "a second controller ran while A held the lease:\n{}",
            r.log_tail()
        );
    }

    // The next rollout, and A dies: B or C takes over and finishes it.
    start_rollout(&b.base_url(), &vs[2]).await;
    a.kill().expect("kill -9 replica A");
    wait_for("another replica to take the lease", SEEN_WITHIN, || {
        let logs = b.log_tail() + &c.log_tail();
        async move { took_lease(logs) }
    })
    .await;
    host_acts("host-1", &c.base_url(), &b.base_url(), &vs[2]).await;
    wait_for_tag(&b.base_url(), &vs[2]).await;
    wait_for_tag(&c.base_url(), &vs[2]).await;
    let current =
        s.pg.psql("SELECT sha256 FROM tags WHERE name = 'app' AND tag = 'prod'")
            .expect("psql");
    assert_eq!(current.trim(), vs[2].sha256.to_hex());
    let states =
        s.pg.psql("SELECT count(*) FROM rollout_changes WHERE name = 'app' AND tag = 'prod'")
            .expect("psql");
    assert!(
        states.trim().parse::<u32>().is_ok_and(|n| n >= 4),
        "transitions recorded: {states}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_different_replicas_share_a_package_through_the_stores() {
    const NAME: &str = "replicated";
    let s = servers_or_skip!();
    let (a, mut b) = (s.replica("a", &[]), s.replica("b", &[]));
    let base = s.dir.path();
    // A slow seed, so that the download is still going when B dies.
    let seed = AgentProcess::start(
        &base.join("seed/state"),
        &base.join("seed/cache"),
        &a.base_url(),
        &["--max-upload-rate", "1MiB"],
    )
    .await
    .expect("seed agent starts");
    // Random: blocks travel compressed between agents, and the rate limit must hold.
    let mut bytes = vec![0u8; 8 << 20];
    rand::RngExt::fill(&mut rand::rng(), &mut bytes[..]);
    let file = base.join("payload.bin");
    std::fs::write(&file, &bytes).expect("write the payload");
    let mut args: Vec<OsString> = vec!["publish".into(), NAME.into(), file.into()];
    args.extend(seed.host_args());
    let out = fbpkg_rs(args, Duration::from_secs(60)).await;
    assert!(out.success(), "publish: {out}");
    let reference = out.line().to_owned();

    // The leecher knows only B; B knows the version from the database, the seed from Redis.
    let sha = reference
        .strip_prefix(&format!("{NAME}:"))
        .expect("name:sha")
        .to_owned();
    wait_for("B to know the version", SEEN_WITHIN, || {
        let url = format!("{}/api/v1/packages/{NAME}/{sha}", b.base_url());
        async move { get_json::<VersionInfo>(&url).await.map(drop) }
    })
    .await;
    let leecher = AgentProcess::start(
        &base.join("leecher/state"),
        &base.join("leecher/cache"),
        &b.base_url(),
        &[],
    )
    .await
    .expect("leecher agent starts");
    let mut args: Vec<OsString> = vec!["get".into(), reference.clone().into()];
    args.extend(leecher.host_args());
    let get = tokio::spawn(fbpkg_rs(args, Duration::from_secs(120)));
    let started = poll("the download to start", SEEN_WITHIN, || {
        let leecher = &leecher;
        async move {
            let st = leecher.status().await.map_err(|e| e.to_string())?;
            match st.first() {
                Some(t) if t.bytes_have > 0 && t.bytes_have < t.size => Ok(()),
                other => Err(format!("{other:?}")),
            }
        }
    })
    .await;
    if let Err(e) = started {
        let out = if get.is_finished() {
            format!("{:?}", get.await)
        } else {
            get.abort();
            "get still running".to_owned()
        };
        panic!(
            "{out}\n{e}\nleecher log:\n{}\nseed log:\n{}\nB log:\n{}",
            leecher.log_tail(),
            seed.log_tail(),
            b.log_tail()
        );
    }
    b.kill().expect("kill -9 replica B mid-download");
    let out = get.await.expect("get task");
    assert!(
        out.success(),
        "get with its replica killed: {out}\nleecher log:\n{}\nseed log:\n{}",
        leecher.log_tail(),
        seed.log_tail()
    );
    assert!(
        std::fs::read(out.line()).expect("the fetched file") == bytes,
        "the leecher holds other bytes than the seed published"
    );
    // Nothing was lost with B: a replica started now knows the version.
    let c = s.replica("c", &[]);
    let v: VersionInfo = get_json(&format!("{}/api/v1/packages/{NAME}/{sha}", c.base_url()))
        .await
        .expect("the version on a new replica");
    assert_eq!(v.sha256.to_hex(), sha);
}

/// `sslmode=require`: every catalog connection to PostgreSQL is TLS, the server's certificate
/// verified against `--catalog-ca`; without that CA (the system's roots do not know it) the
/// replica does not start, and says why. Redis over TLS: `redis_peer_store.rs`.
#[tokio::test]
async fn the_catalog_reaches_postgres_over_tls_with_the_ca_it_is_given() {
    let Some(pg) = PostgresServer::start_tls().expect("starting PostgreSQL with TLS") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("{}?sslmode=require", pg.url());
    let ca = pg.ca_file();
    let ca = ca.to_str().expect("a UTF-8 path");
    let tracker = TrackerProcess::start_with_args(
        &dir.path().join("a"),
        &["--catalog", &url, "--catalog-ca", ca],
    )
    .expect("a replica given the CA starts");
    let (status, body) = readyz(&tracker.base_url()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(!body.contains("degraded"), "{body}");
    let v1 = package(1, &tracker.announce_url());
    let st = publish(&http_client(), &tracker.base_url(), "app", &v1)
        .await
        .expect("publish");
    assert_eq!(st, StatusCode::CREATED);
    let count = |ssl: bool| {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.usename = 'fbpkg' AND a.pid <> pg_backend_pid() AND s.ssl = {ssl}"
        );
        pg.psql(&sql)
            .expect("psql")
            .trim()
            .parse::<u32>()
            .expect("a count")
    };
    // The controller's lease is a session of its own, made outside the pool: TLS too, or a
    // TLS-only server refuses it and no replica ever runs the rollout controller.
    wait_for(
        "the replica to take the controller's lease",
        SEEN_WITHIN,
        || {
            let log = tracker.log_tail();
            async move { took_lease(log) }
        },
    )
    .await;
    assert!(count(true) >= 1, "the replica's connections are TLS");
    assert_eq!(count(false), 0, "and none is not");

    let blind = TrackerProcess::start_with_args(&dir.path().join("b"), &["--catalog", &url]);
    let err = blind.expect_err("a replica that cannot verify the server does not start");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}

/// A PostgreSQL that lets the replica's role in only with a client certificate: a replica
/// showing one (`--catalog-cert`, `--catalog-key`) starts and publishes; one without does
/// not start, and says why.
#[tokio::test]
async fn the_catalog_shows_postgres_its_client_certificate_when_it_asks() {
    let Some(pg) = PostgresServer::start_tls().expect("starting PostgreSQL with TLS") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("{}?sslmode=require", pg.mtls_url());
    let ca = pg.ca_file();
    let (cert, key) = pg.client_cert_file();
    let [ca, cert, key] = [&ca, &cert, &key].map(|p| p.to_str().expect("a UTF-8 path"));
    let tracker = TrackerProcess::start_with_args(
        &dir.path().join("a"),
        &[
            "--catalog",
            &url,
            "--catalog-ca",
            ca,
            "--catalog-cert",
            cert,
            "--catalog-key",
            key,
        ],
    )
    .expect("a replica showing its certificate starts");
    let (status, body) = readyz(&tracker.base_url()).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let v1 = package(1, &tracker.announce_url());
    let st = publish(&http_client(), &tracker.base_url(), "app", &v1)
        .await
        .expect("publish");
    assert_eq!(st, StatusCode::CREATED);

    let anonymous = TrackerProcess::start_with_args(
        &dir.path().join("b"),
        &["--catalog", &url, "--catalog-ca", ca],
    );
    let err = anonymous.expect_err("a replica without a client certificate does not start");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "{err}"
    );
}

/// Two replicas in this process (no listener running: each one's memory stays as it was until
/// told to reload), for changes that race.
fn replica_state(pg: &PostgresServer, dir: &std::path::Path) -> std::sync::Arc<AppState> {
    AppState::open(Config {
        data_dir: dir.to_path_buf(),
        catalog: CatalogKind::Postgres(pg.url()),
        catalog_timeout: Duration::from_secs(60),
        ..Config::default()
    })
    .expect("a replica's state opens")
}

fn app_prod() -> (PackageName, Tag) {
    (
        PackageName::new("app").expect("a name"),
        Tag::new("prod").expect("a tag"),
    )
}

/// A rollout of app:prod to `to` in one phase, with no bake and no failure allowed.
fn one_phase_to(to: &Metainfo) -> RolloutRequest {
    let (name, tag) = app_prod();
    RolloutRequest {
        name,
        tag,
        to: to.sha256.to_hex(),
        phases: vec!["100".parse().expect("a phase")],
        bake_ms: 0,
        max_failures: "0".parse().expect("a limit"),
        force: false,
    }
}

/// `host-1` resolves app:prod through `r` and reports `to` activated there.
fn host_activates(r: &AppState, to: &Metainfo) {
    let (name, tag) = app_prod();
    let ip: std::net::IpAddr = [127, 0, 0, 1].into();
    let host = HostId::new("host-1").expect("a host id");
    let who = Asker {
        host: host.clone(),
        zone: None,
        ip,
    };
    assert!(r.rollouts.resolve_for(&name, &tag, &who).is_some());
    let report: Report = serde_json::from_value(serde_json::json!({"name": "app",
        "hash": to.sha256.to_hex(), "host": "host-1", "state": "activated"}))
    .expect("a report");
    r.rollouts.report(report, ip).expect("the report counts");
}

/// An operator's abort or pause on one replica and the controller's last step on another:
/// the controller judges the record as stored, not its own memory of it, and a rollout
/// aborted or paused elsewhere never moves the tag. Before, the controller moved the tag from
/// a stale copy, then failed to save (the record had changed): aborted, and moved anyway.
/// And a change waits while another replica holds the tag's rollouts, without holding up
/// that replica's changes and reloads of other tags (they waited behind it, up to the
/// catalog's deadline).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_stopped_on_one_replica_never_moves_the_tag_on_another() {
    let Some(pg) = PostgresServer::start().expect("starting PostgreSQL") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (name, tag) = app_prod();
    let a = replica_state(&pg, &dir.path().join("a"));
    let vs = [1, 2].map(|n| package(n, "http://127.0.0.1:1/announce"));
    for v in &vs {
        a.catalog
            .publish(&name, &v.sha256, v.as_bytes())
            .expect("publish");
    }
    a.rollouts
        .move_tag_plain(&a.catalog, &name, &tag, &vs[0].sha256.to_hex(), wall_ms())
        .expect("tag");
    let start = || one_phase_to(&vs[1]);
    let tag_in_db = || {
        pg.psql("SELECT sha256 FROM tags WHERE name = 'app' AND tag = 'prod'")
            .expect("psql")
            .trim()
            .to_owned()
    };
    let stored = || {
        pg.psql("SELECT record FROM rollouts WHERE name = 'app' AND tag = 'prod'")
            .expect("psql")
    };

    for stop in [Action::Abort, Action::Pause] {
        a.rollouts
            .start(&a.catalog, start(), wall_ms())
            .expect("start");
        let b = replica_state(&pg, &dir.path().join(format!("b-{stop:?}")));
        b.rollouts
            .control(&b.catalog, &name, &tag, stop, wall_ms())
            .expect("B stops it");
        // A has not heard; its host is done, and the gate passes.
        host_activates(&a, &vs[1]);
        a.rollouts
            .tick(&a.catalog, tokio::time::Instant::now(), wall_ms())
            .expect("A's tick");
        assert_eq!(
            tag_in_db(),
            vs[0].sha256.to_hex(),
            "after {stop:?}: {}",
            stored()
        );
        let status = a.rollouts.status(&name, &tag).expect("a record");
        match stop {
            Action::Abort => assert!(status.current.is_none(), "{status:?}"),
            _ => assert_eq!(
                status.current.expect("active").rollout.state,
                RolloutState::Paused
            ),
        }
        if stop == Action::Pause {
            a.rollouts
                .control(&a.catalog, &name, &tag, Action::Abort, wall_ms())
                .expect("abort");
        }
    }

    // While one replica holds the tag's rollouts, another's change waits for it.
    let held =
        a.pg.as_ref()
            .expect("on PostgreSQL")
            .hold("a test", "fbpkg.rollout", "app:prod")
            .expect("hold");
    let b = replica_state(&pg, &dir.path().join("b-waits"));
    let starting = {
        let (b, req) = (b.clone(), start());
        std::thread::spawn(move || b.rollouts.start(&b.catalog, req, wall_ms()))
    };
    wait_for("B's start to wait for the lock", SEEN_WITHIN, || {
        let waiting = pg
            .psql("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            .unwrap_or_default();
        async move {
            if waiting.trim() == "1" {
                Ok(())
            } else {
                Err(format!("{} waiting", waiting.trim()))
            }
        }
    })
    .await;
    assert!(
        !starting.is_finished(),
        "B's start went on while A held the lock"
    );
    // Meanwhile B changes and reloads its other tags: only app:prod waits.
    let elsewhere = {
        let b = b.clone();
        std::thread::spawn(move || {
            let (name, _) = app_prod();
            let beta = Tag::new("beta").expect("a tag");
            let control = b
                .rollouts
                .control(&b.catalog, &name, &beta, Action::Abort, wall_ms());
            (control, b.rollouts.reload(&name, &beta))
        })
    };
    wait_for("B's change of another tag", SEEN_WITHIN, || {
        let done = elsewhere.is_finished();
        async move {
            if done {
                Ok(())
            } else {
                Err("still waiting".into())
            }
        }
    })
    .await;
    let (control, reload) = elsewhere.join().expect("the thread");
    assert!(
        matches!(control, Err(TrackerError::NotFound(_))),
        "{control:?}"
    );
    reload.expect("B's reload");
    assert!(
        !starting.is_finished(),
        "B's start went on while A held the lock"
    );
    drop(held);
    let r = starting.join().expect("the thread").expect("B's start");
    assert_eq!(r.to, vs[1].sha256);
}

/// What a rollout starts from, and whether its record is done, are judged on where the tag
/// is in the database, not where this replica's memory says it is:
///
/// - a rollout started on a replica that has not heard of a tag move a moment ago starts
///   from where the tag is (from its stale memory, every host outside the first phase was sent
///   back to the version before the move);
/// - a version published elsewhere that a replica first learns of through a write (a start
///   naming it) has its swarm registered there (its announces were refused as unregistered);
/// - when the controller's last step moved the tag but its record could not be saved, the
///   next change of the tag on any replica records the rollout done: an abort then finds no
///   rollout to abort, instead of recording "aborted" with the tag moved;
/// - a record the database holds but no replica can read is an error naming it (it was taken
///   for no record, and every change was refused as a conflict).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollouts_judge_the_tag_where_it_is_not_where_memory_says() {
    let Some(pg) = PostgresServer::start().expect("starting PostgreSQL") else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let (name, tag) = app_prod();
    let a = replica_state(&pg, &dir.path().join("a"));
    let vs = [1, 2, 3, 4].map(|n| package(n, "http://127.0.0.1:1/announce"));
    let publish = |v: &Metainfo| {
        a.catalog
            .publish(&name, &v.sha256, v.as_bytes())
            .expect("publish");
    };
    vs[..3].iter().for_each(publish);
    let move_on = |r: &AppState, to: &Metainfo| {
        r.rollouts
            .move_tag_plain(&r.catalog, &name, &tag, &to.sha256.to_hex(), wall_ms())
            .expect("tag")
    };
    move_on(&a, &vs[0]);
    let b = replica_state(&pg, &dir.path().join("b"));
    move_on(&a, &vs[1]);
    let req = one_phase_to(&vs[2]);
    let r = b
        .rollouts
        .start(&b.catalog, req, wall_ms())
        .expect("B starts a rollout");
    assert_eq!(r.from, Some(vs[1].sha256), "from where the tag is now");
    publish(&vs[3]);
    let fourth = Selector::parse(&vs[3].sha256.to_hex()).expect("a hash");
    b.catalog
        .resolve_fresh(&name, &fourth)
        .expect("B finds it in the database");
    let swarm = b.swarms.get(&vs[3].info_hash);
    assert!(
        swarm.is_some_and(|s| s.package.is_some()),
        "the swarm of a version B learnt of through a write is registered"
    );

    // A, the controller, moves the tag; the record's save fails.
    a.rollouts.reload(&name, &tag).expect("A hears of it");
    pg.psql(
        "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'refused by the test'; END $$; \
         CREATE TRIGGER refuse BEFORE UPDATE ON rollouts FOR EACH ROW EXECUTE FUNCTION refuse();",
    )
    .expect("psql");
    host_activates(&a, &vs[2]);
    let ticked = a
        .rollouts
        .tick(&a.catalog, tokio::time::Instant::now(), wall_ms());
    assert!(ticked.is_err(), "the save failed: {ticked:?}");
    let tag_in_db = || {
        pg.psql("SELECT sha256 FROM tags WHERE name = 'app' AND tag = 'prod'")
            .expect("psql")
            .trim()
            .to_owned()
    };
    assert_eq!(tag_in_db(), vs[2].sha256.to_hex(), "moved");
    pg.psql("DROP TRIGGER refuse ON rollouts").expect("psql");
    let aborted = b
        .rollouts
        .control(&b.catalog, &name, &tag, Action::Abort, wall_ms());
    assert!(aborted.is_err(), "nothing left to abort: {aborted:?}");
    let status = b.rollouts.status(&name, &tag).expect("a record");
    assert!(status.current.is_none(), "{status:?}");
    let last = status.history.last().expect("history");
    assert_eq!(
        (last.id, &last.state),
        (r.id, &RolloutState::Done),
        "{status:?}"
    );
    assert_eq!(tag_in_db(), vs[2].sha256.to_hex());

    // A record nobody can read is an error that says so, not a conflict for ever.
    pg.psql("UPDATE rollouts SET record = '{\"last_id\": \"x\"}' WHERE name = 'app'")
        .expect("psql");
    let err = b
        .rollouts
        .start(&b.catalog, one_phase_to(&vs[1]), wall_ms())
        .expect_err("unreadable")
        .to_string();
    assert!(
        err.contains("unreadable") && err.contains("app:prod"),
        "{err}"
    );
}

/// A replica's sessions that hold an advisory lock (the rollout controller's lease; a tag's
/// rollouts while they change) ask the server to probe them once idle 20 s: a replica whose
/// host dies without closing its connections (power lost, a panic, the network cut) lets
/// its locks go within about 40 s. With the kernel's defaults the server noticed after two
/// hours and more, and no replica could run the controller, or change that tag, meanwhile.
/// What is checked is the server's side of each locking session, in the kernel (`ss`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locking_session_whose_host_is_gone_is_noticed_within_a_minute() {
    let Some(pg) = PostgresServer::start().expect("starting PostgreSQL") else {
        return;
    };
    if std::process::Command::new("ss").arg("-V").output().is_err() {
        eprintln!("skipping: ss(8) is not installed (apt-get install iproute2)");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let a = replica_state(&pg, dir.path());
    wait_for("A to take the controller's lease", SEEN_WITHIN, || {
        let held = a.controller_lease.as_ref().is_some_and(|l| l.held());
        async move { if held { Ok(()) } else { Err("not yet".into()) } }
    })
    .await;
    let pg_port = pg
        .url()
        .rsplit(':')
        .next()
        .and_then(|p| p.split('/').next())
        .map(str::to_owned)
        .expect("a port");
    let hold =
        a.pg.as_ref()
            .expect("on PostgreSQL")
            .hold("a test", "fbpkg.rollout", "app:prod")
            .expect("hold");
    let ports = pg
        .psql(
            "SELECT a.client_port FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
             WHERE l.locktype = 'advisory' AND l.granted",
        )
        .expect("the locking sessions");
    let ports: Vec<&str> = ports.lines().map(str::trim).collect();
    assert_eq!(ports.len(), 2, "the lease and the hold: {ports:?}");
    for port in ports {
        let filter = format!("( sport = :{pg_port} and dport = :{port} )");
        // `timer:(keepalive,19sec,0)`: the time to the next probe (minutes when the idle time
        // is the kernel's default). While a reply is out the timer is the retransmission's
        // (`timer:(on,...)`): asked again.
        let (next, line) = wait_for("the session's keepalive timer", SEEN_WITHIN, || {
            let out = std::process::Command::new("ss")
                .args(["-tnoH", "state", "established", &filter])
                .output();
            async move {
                let line =
                    String::from_utf8_lossy(&out.map_err(|e| e.to_string())?.stdout).into_owned();
                let next = line
                    .split("timer:(keepalive,")
                    .nth(1)
                    .and_then(|t| t.split(',').next())
                    .map(str::to_owned);
                match next {
                    Some(next) => Ok((next, line)),
                    None => Err(format!("no keepalive timer: {line:?}")),
                }
            }
        })
        .await;
        assert!(
            (next.ends_with("sec") || next.ends_with("ms")) && !next.contains("min"),
            "the server probes a locking session after {next}: {line}"
        );
    }
    drop(hold);
}
