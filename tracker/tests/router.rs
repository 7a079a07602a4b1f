//! Handler tests through the router: no socket, `oneshot` requests.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::connect_info::MockConnectInfo;
use axum::http::{Request, StatusCode, header};
use fbpkg_common::api::{ApiError, PackageDetail, PackageSummary, TagInfo, VersionInfo};
use fbpkg_common::metainfo::{Format, Metainfo};
use fbpkg_common::tracker_proto::{
    AnnounceRequest, AnnounceResponse, Event, ScrapeRequest, ScrapeResponse, TrackerReply, Zone,
};
use fbpkg_common::{InfoHash, PeerId};
use fbpkg_tracker::metrics::AnnounceOutcome;
use fbpkg_tracker::{AppState, Config, SharedState, app, serve_announce};
use http_body_util::BodyExt;
use tower::ServiceExt;

struct Harness {
    _dir: tempfile::TempDir,
    state: SharedState,
}

fn harness(tweak: impl FnOnce(&mut Config)) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    tweak(&mut config);
    let state = AppState::open(config).unwrap();
    Harness { _dir: dir, state }
}

impl Harness {
    fn router(&self, from: &str) -> Router {
        app(self.state.clone()).layer(MockConnectInfo(from.parse::<SocketAddr>().unwrap()))
    }

    async fn call(
        &self,
        from: &str,
        req: Request<Body>,
    ) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
        let resp = self.router(from).oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec();
        (status, headers, body)
    }

    async fn get(&self, uri: &str) -> (StatusCode, Vec<u8>) {
        let (s, _, b) = self
            .call(
                "127.0.0.1:40000",
                Request::get(uri).body(Body::empty()).unwrap(),
            )
            .await;
        (s, b)
    }

    async fn put(&self, uri: &str, body: Vec<u8>, token: Option<&str>) -> (StatusCode, Vec<u8>) {
        let mut req = Request::put(uri);
        if let Some(t) = token {
            req = req.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let (s, _, b) = self
            .call("127.0.0.1:40000", req.body(Body::from(body)).unwrap())
            .await;
        (s, b)
    }

    async fn publish(&self, name: &str, m: &Metainfo) -> StatusCode {
        self.put(
            &format!("/api/v1/packages/{name}/{}", m.sha256),
            m.as_bytes().to_vec(),
            None,
        )
        .await
        .0
    }

    async fn announce(&self, from: &str, req: &AnnounceRequest) -> TrackerReply<AnnounceResponse> {
        let uri = format!("/announce?{}", req.to_query());
        let (s, _, b) = self
            .call(from, Request::get(uri).body(Body::empty()).unwrap())
            .await;
        assert_eq!(s, StatusCode::OK, "announces always answer 200");
        AnnounceResponse::decode(&b).unwrap()
    }
}

fn package(seed: u8, len: usize) -> Metainfo {
    let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
    Metainfo::build(
        &data[..],
        len as u64,
        "app.bin",
        "http://127.0.0.1:6969/announce",
        Format::File,
    )
    .unwrap()
}

fn announce_req(m: &Metainfo, id: u8, left: u64) -> AnnounceRequest {
    AnnounceRequest {
        info_hash: m.info_hash,
        peer_id: PeerId([id; 20]),
        port: 7000 + u16::from(id),
        uploaded: 0,
        downloaded: 0,
        left,
        event: Event::Started,
        compact: true,
        numwant: None,
        no_peer_id: false,
        key: None,
        ip: None,
        zone: None,
    }
}

fn ok(r: TrackerReply<AnnounceResponse>) -> AnnounceResponse {
    match r {
        TrackerReply::Ok(r) => r,
        TrackerReply::Failure(f) => panic!("tracker refused: {f}"),
    }
}

fn json<T: serde::de::DeserializeOwned>(b: &[u8]) -> T {
    serde_json::from_slice(b).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(b)))
}

#[tokio::test]
async fn publish_resolve_and_fetch_metainfo() {
    let h = harness(|_| {});
    let m = package(3, 100_000);
    assert_eq!(h.publish("app", &m).await, StatusCode::CREATED);
    assert_eq!(
        h.publish("app", &m).await,
        StatusCode::OK,
        "same metainfo again is fine"
    );

    let hex = m.sha256.to_hex();
    for sel in [hex.clone(), hex[..8].to_owned(), hex[..20].to_owned()] {
        let (s, b) = h.get(&format!("/api/v1/packages/app/{sel}")).await;
        assert_eq!(s, StatusCode::OK, "{sel}");
        let v: VersionInfo = json(&b);
        assert_eq!(
            (v.sha256, v.info_hash, v.size),
            (m.sha256, m.info_hash, 100_000)
        );
    }
    let (s, hdrs, body) = h
        .call(
            "127.0.0.1:1",
            Request::get(format!("/api/v1/packages/app/{hex}/metainfo"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(hdrs[header::CONTENT_TYPE], "application/x-bittorrent");
    assert_eq!(body, m.as_bytes());

    let (s, b) = h.get(&format!("/api/v1/resolve/{}", &hex[..10])).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(json::<VersionInfo>(&b).name.as_str(), "app");
}

/// A version stored has its swarm registered with it, not by the request after the store: a
/// publish whose request is dropped once the catalog has it (its client gone, its deadline
/// passed) left the version listed and every announce for it refused as unregistered, the
/// publisher's own included, until a restart.
#[tokio::test]
async fn a_version_stored_is_announced_to_whatever_became_of_its_request() {
    let h = harness(|_| {});
    let m = package(4, 100_000);
    let app = fbpkg_common::pkgref::PackageName::new("app").unwrap();
    // What the handler's blocking task does, with nobody left to carry on after it.
    h.state
        .catalog
        .publish(&app, &m.sha256, m.as_bytes())
        .unwrap();
    let answer = h.announce("127.0.0.1:1", &announce_req(&m, 1, 0)).await;
    ok(answer);
}

#[tokio::test]
async fn publish_rejections() {
    let h = harness(|_| {});
    let m = package(3, 100_000);
    let other = package(5, 100_000);
    // The URL's hash must be the metainfo's sha256.
    let (s, b) = h
        .put(
            &format!("/api/v1/packages/app/{}", other.sha256),
            m.as_bytes().to_vec(),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(json::<ApiError>(&b).error.contains("sha256"));
    // Garbage and hostile metainfo get the parser's reason.
    let (s, b) = h
        .put(
            &format!("/api/v1/packages/app/{}", m.sha256),
            b"d4:infoi1ee".to_vec(),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(json::<ApiError>(&b).error.contains("not a dictionary"));
    let deep = [vec![b'l'; 5000], vec![b'e'; 5000]].concat();
    let (s, b) = h
        .put(&format!("/api/v1/packages/app/{}", m.sha256), deep, None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(json::<ApiError>(&b).error.contains("nesting"));
    // Bad names and short hashes.
    assert_eq!(
        h.put(
            &format!("/api/v1/packages/App/{}", m.sha256),
            m.as_bytes().to_vec(),
            None
        )
        .await
        .0,
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        h.put("/api/v1/packages/app/abcdef12", m.as_bytes().to_vec(), None)
            .await
            .0,
        StatusCode::BAD_REQUEST
    );
    // A different metainfo for an existing name:hash is a conflict.
    assert_eq!(h.publish("app", &m).await, StatusCode::CREATED);
    let mut tampered = m.as_bytes().to_vec();
    let at = tampered.windows(8).position(|w| w == b"6:pieces").unwrap() + 12;
    tampered[at] ^= 0xff;
    let (s, b) = h
        .put(
            &format!("/api/v1/packages/app/{}", m.sha256),
            tampered,
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    assert!(json::<ApiError>(&b).error.contains("never changes"));
    // Too large a body.
    let h = harness(|c| c.max_body_bytes = 100);
    assert_eq!(h.publish("app", &m).await, StatusCode::PAYLOAD_TOO_LARGE);
}

/// A tree of tens of thousands of files (a virtualenv, a `node_modules`) has a metainfo of a
/// few MiB: it publishes within `max_body_bytes` (8 MiB). axum's own 2 MiB default for a body
/// read whole refused it with a plain-text 413, whatever the limit said.
#[tokio::test]
async fn a_metainfo_of_a_few_mib_is_published() {
    use fbpkg_common::metainfo::TreeItem;
    let items: Vec<TreeItem> = (0..20_000)
        .map(|i| TreeItem::File {
            path: vec![
                format!("lib-{:03}", i / 1000),
                format!("module-{i:05}-{}.py", "x".repeat(60)),
            ],
            length: 1,
            mode: 0o644,
        })
        .collect();
    let m = Metainfo::build_tree(
        items,
        |_| Ok(std::io::Cursor::new(vec![b'#'])),
        "venv",
        "http://127.0.0.1:6969/announce",
    )
    .unwrap();
    let size = m.as_bytes().len();
    assert!(size > 2 << 20 && size < 8 << 20, "{size} bytes");
    let h = harness(|_| {});
    let (s, b) = h
        .put(
            &format!("/api/v1/packages/venv/{}", m.sha256),
            m.as_bytes().to_vec(),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{}", String::from_utf8_lossy(&b));
    // Past the limit, the refusal says so in the API's own words, whether the body said its
    // length up front (as every HTTP client does) or not.
    let h = harness(|c| c.max_body_bytes = 1 << 20);
    for said in [true, false] {
        let mut req = Request::put(format!("/api/v1/packages/venv/{}", m.sha256));
        if said {
            req = req.header(header::CONTENT_LENGTH, size);
        }
        let (s, _, b) = h
            .call(
                "127.0.0.1:40000",
                req.body(Body::from(m.as_bytes().to_vec())).unwrap(),
            )
            .await;
        assert_eq!(s, StatusCode::PAYLOAD_TOO_LARGE, "length said: {said}");
        let e = json::<ApiError>(&b).error;
        assert!(e.contains("larger than this tracker takes"), "{e}");
    }
}

#[tokio::test]
async fn publishing_needs_the_token_when_one_is_set() {
    let h = harness(|c| c.publish_token = Some("s3cret".into()));
    let m = package(1, 50_000);
    let uri = format!("/api/v1/packages/app/{}", m.sha256);
    assert_eq!(
        h.put(&uri, m.as_bytes().to_vec(), None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.put(&uri, m.as_bytes().to_vec(), Some("wrong")).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.put(&uri, m.as_bytes().to_vec(), Some("s3cret")).await.0,
        StatusCode::CREATED
    );
    let tag_uri = "/api/v1/packages/app/tags/prod";
    assert_eq!(
        h.put(tag_uri, m.sha256.to_hex().into_bytes(), None).await.0,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        h.put(tag_uri, m.sha256.to_hex().into_bytes(), Some("s3cret"))
            .await
            .0,
        StatusCode::OK
    );
    // Reads stay open.
    assert_eq!(h.get("/api/v1/packages/app/prod").await.0, StatusCode::OK);
}

#[tokio::test]
async fn tags_move_and_keep_history_and_prefixes_can_be_ambiguous() {
    let h = harness(|_| {});
    let (a, b) = (package(1, 60_000), package(2, 60_000));
    assert_eq!(h.publish("app", &a).await, StatusCode::CREATED);
    assert_eq!(h.publish("app", &b).await, StatusCode::CREATED);
    let (s, _) = h
        .put(
            "/api/v1/packages/app/tags/prod",
            a.sha256.to_hex().into_bytes(),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, body) = h
        .put(
            "/api/v1/packages/app/tags/prod",
            b.sha256.to_hex().as_bytes()[..12].to_vec(),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let info: TagInfo = json(&body);
    assert_eq!(info.sha256, b.sha256);
    assert_eq!(
        info.history.iter().map(|m| m.sha256).collect::<Vec<_>>(),
        vec![a.sha256, b.sha256]
    );
    let (_, body) = h.get("/api/v1/packages/app/prod").await;
    assert_eq!(json::<VersionInfo>(&body).sha256, b.sha256);
    // Tags must point at existing versions, and a tag body must be a hash.
    let (s, _) = h
        .put(
            "/api/v1/packages/app/tags/prod",
            b"ffffffffffff".to_vec(),
            None,
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, _) = h
        .put("/api/v1/packages/app/tags/prod", b"staging".to_vec(), None)
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    let (s, _) = h
        .put(
            "/api/v1/packages/app/tags/a0a0a0a0",
            a.sha256.to_hex().into_bytes(),
            None,
        )
        .await;
    assert_eq!(
        s,
        StatusCode::BAD_REQUEST,
        "an all-hex tag would read as a hash"
    );

    // The same version under a second name makes a bare prefix ambiguous.
    assert_eq!(h.publish("other", &a).await, StatusCode::CREATED);
    let (s, body) = h
        .get(&format!("/api/v1/resolve/{}", &a.sha256.to_hex()[..8]))
        .await;
    assert_eq!(s, StatusCode::CONFLICT);
    let err: ApiError = json(&body);
    assert_eq!(err.candidates.len(), 2, "{err:?}");

    assert_eq!(
        h.get("/api/v1/packages/app/nosuchtag").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.get("/api/v1/packages/nosuch/prod").await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        h.get("/api/v1/packages/app/abc").await.0,
        StatusCode::BAD_REQUEST
    );

    let (_, body) = h.get("/api/v1/packages").await;
    let list: Vec<PackageSummary> = json(&body);
    assert_eq!(list.len(), 2);
    assert_eq!(list[0].versions, 2);
    let (_, body) = h.get("/api/v1/packages/app").await;
    let detail: PackageDetail = json(&body);
    assert_eq!(detail.versions.len(), 2);
    assert!(
        detail
            .versions
            .iter()
            .any(|v| v.tags.iter().any(|t| t.as_str() == "prod"))
    );
}

#[tokio::test]
async fn announce_serves_only_published_packages() {
    let h = harness(|_| {});
    let m = package(1, 70_000);
    match h.announce("127.0.0.1:5000", &announce_req(&m, 1, 10)).await {
        TrackerReply::Failure(f) => assert!(f.contains("unregistered"), "{f}"),
        other => panic!("{other:?}"),
    }
    h.publish("app", &m).await;
    let r = ok(h.announce("127.0.0.1:5000", &announce_req(&m, 1, 10)).await);
    assert_eq!(
        (r.complete, r.incomplete, r.peers.len()),
        (0, 1, 0),
        "never the asker"
    );
    assert_eq!(r.interval, 60);

    let open = harness(|c| c.allow_unregistered = true);
    ok(open
        .announce("127.0.0.1:5000", &announce_req(&m, 1, 10))
        .await);

    // Malformed announces are failure reasons too.
    let (s, _, b) = h
        .call(
            "127.0.0.1:1",
            Request::get("/announce?info_hash=x")
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert!(
        matches!(AnnounceResponse::decode(&b).unwrap(), TrackerReply::Failure(f) if f.contains("info_hash"))
    );
}

#[tokio::test]
async fn swarm_membership_roles_and_peer_lists() {
    let h = harness(|_| {});
    let m = package(1, 70_000);
    h.publish("app", &m).await;
    // Peer 1 seeds (left=0 with no "completed" event, as librqbit does), 2 and 3 leech.
    let mut seed = announce_req(&m, 1, 0);
    seed.event = Event::None;
    ok(h.announce("127.0.0.1:1", &seed).await);
    ok(h.announce("127.0.0.2:1", &announce_req(&m, 2, 5)).await);
    let r = ok(h.announce("127.0.0.3:1", &announce_req(&m, 3, 5)).await);
    assert_eq!((r.complete, r.incomplete), (1, 2));
    let mut addrs: Vec<String> = r.peers.iter().map(|p| p.addr.to_string()).collect();
    addrs.sort();
    assert_eq!(
        addrs,
        vec!["127.0.0.1:7001", "127.0.0.2:7002"],
        "the connection's address, the announced port"
    );

    // The seeder gets only leechers.
    let r = ok(h.announce("127.0.0.1:1", &seed).await);
    assert_eq!(r.peers.len(), 2);
    assert!(r.peers.iter().all(|p| p.addr.port() != 7001));

    // Dictionary format with and without peer ids.
    let mut dict = announce_req(&m, 3, 5);
    dict.compact = false;
    let r = ok(h.announce("127.0.0.3:1", &dict).await);
    assert!(r.peers.iter().all(|p| p.peer_id.is_some()));
    dict.no_peer_id = true;
    let r = ok(h.announce("127.0.0.3:1", &dict).await);
    assert!(r.peers.iter().all(|p| p.peer_id.is_none()));

    // numwant caps the list.
    let mut few = announce_req(&m, 3, 5);
    few.numwant = Some(1);
    assert_eq!(ok(h.announce("127.0.0.3:1", &few).await).peers.len(), 1);

    // stopped removes the peer.
    let mut stop = announce_req(&m, 2, 5);
    stop.event = Event::Stopped;
    ok(h.announce("127.0.0.2:1", &stop).await);
    let r = ok(h.announce("127.0.0.3:1", &announce_req(&m, 3, 5)).await);
    assert_eq!((r.complete, r.incomplete, r.peers.len()), (1, 1, 1));

    // Scrape agrees, and counts the leecher that finished.
    let mut done = announce_req(&m, 3, 0);
    done.event = Event::Completed;
    ok(h.announce("127.0.0.3:1", &done).await);
    let q = ScrapeRequest {
        info_hashes: vec![m.info_hash, InfoHash([9; 20])],
    }
    .to_query();
    let (_, b) = h.get(&format!("/scrape?{q}")).await;
    let TrackerReply::Ok(s) = ScrapeResponse::decode(&b).unwrap() else {
        panic!()
    };
    assert_eq!(s.files.len(), 1, "unknown hashes are left out");
    let st = s.files[&m.info_hash];
    assert_eq!((st.complete, st.incomplete, st.downloaded), (2, 0, 1));
}

#[tokio::test]
async fn ip_parameter_only_from_trusted_networks() {
    let h = harness(|c| c.trusted_networks = vec!["10.0.0.0/8".parse().unwrap()]);
    let m = package(1, 70_000);
    h.publish("app", &m).await;
    let mut claimed = announce_req(&m, 1, 5);
    claimed.ip = Some("192.0.2.7".parse().unwrap());
    ok(h.announce("127.0.0.9:1", &claimed).await); // untrusted: ip= ignored
    let mut claimed2 = announce_req(&m, 2, 5);
    claimed2.ip = Some("192.0.2.8".parse().unwrap());
    ok(h.announce("10.1.2.3:1", &claimed2).await); // trusted: ip= honoured
    let r = ok(h.announce("127.0.0.5:1", &announce_req(&m, 3, 5)).await);
    let mut ips: Vec<String> = r.peers.iter().map(|p| p.addr.ip().to_string()).collect();
    ips.sort();
    assert_eq!(ips, vec!["127.0.0.9", "192.0.2.8"]);
}

#[tokio::test]
async fn ipv6_peers_go_in_peers6() {
    let h = harness(|_| {});
    let m = package(1, 70_000);
    h.publish("app", &m).await;
    ok(h.announce("[::1]:1", &announce_req(&m, 1, 5)).await);
    let r = ok(h.announce("127.0.0.1:1", &announce_req(&m, 2, 5)).await);
    assert_eq!(r.peers.len(), 1);
    assert_eq!(r.peers[0].addr, "[::1]:7001".parse::<SocketAddr>().unwrap());
}

#[tokio::test]
async fn zones_put_closest_peers_first() {
    let h = harness(|_| {});
    let m = package(1, 70_000);
    h.publish("app", &m).await;
    for (id, zone) in [(1u8, "dc2/r1"), (2, "dc1/r9"), (3, "dc1/r7"), (4, "dc3/r7")] {
        let mut r = announce_req(&m, id, 5);
        r.zone = Some(Zone::new(zone).unwrap());
        ok(h.announce(&format!("127.0.0.{id}:1"), &r).await);
    }
    let mut me = announce_req(&m, 9, 5);
    me.zone = Some(Zone::new("dc1/r7").unwrap());
    me.numwant = Some(2);
    let r = ok(h.announce("127.0.0.9:1", &me).await);
    let got: Vec<u16> = r.peers.iter().map(|p| p.addr.port()).collect();
    assert_eq!(got, vec![7003, 7002], "same rack, then same datacenter");
}

#[tokio::test]
async fn one_address_making_up_peers_cannot_hide_the_seed() {
    let h = harness(|_| {});
    let m = package(1, 70_000);
    h.publish("app", &m).await;
    let mut seed = announce_req(&m, 1, 0);
    seed.event = Event::None;
    ok(h.announce("127.0.0.1:1", &seed).await);
    // 20,000 announces with made-up ids from one address.
    let limit = h.state.config.max_peers_per_address;
    let attacker = "127.0.0.2".parse().unwrap();
    let mut refused = 0;
    for _ in 0..20_000 {
        let mut fake = announce_req(&m, 0, 5);
        fake.peer_id = PeerId(rand::random());
        let now = tokio::time::Instant::now();
        let (body, outcome) = serve_announce(&h.state, attacker, &fake.to_query(), now);
        if outcome == AnnounceOutcome::AddressLimit {
            refused += 1;
            let TrackerReply::Failure(f) = AnnounceResponse::decode(&body).unwrap() else {
                panic!("a refusal is a failure reason")
            };
            assert!(f.contains("too many peers from 127.0.0.2"), "{f}");
        }
    }
    assert_eq!(refused, 20_000 - limit);
    let swarm = h.state.swarms.get(&m.info_hash).unwrap();
    assert_eq!(swarm.from_address(attacker), limit, "the first ones stay");
    assert_eq!((swarm.seeders().len(), swarm.leechers().len()), (1, limit));
    drop(swarm);
    // A real leecher elsewhere gets the seed, every time.
    let mut me = announce_req(&m, 3, 5);
    me.numwant = Some(50);
    for _ in 0..50 {
        let r = ok(h.announce("127.0.0.3:1", &me).await);
        assert_eq!(r.peers.len(), 50);
        assert_eq!(
            r.peers[0].addr,
            "127.0.0.1:7001".parse().unwrap(),
            "seed first"
        );
    }
    // Through the handler, refusals are counted and shown.
    for _ in 0..10 {
        let mut fake = announce_req(&m, 0, 5);
        fake.peer_id = PeerId(rand::random());
        match h.announce("127.0.0.2:1", &fake).await {
            TrackerReply::Failure(f) => assert!(f.contains("too many peers"), "{f}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(h.state.metrics.announces(AnnounceOutcome::AddressLimit), 10);
    let (_, b) = h.get("/metrics").await;
    let text = String::from_utf8(b).unwrap();
    assert!(
        text.contains("fbpkg_tracker_announces_total{outcome=\"address_limit\"} 10"),
        "{text}"
    );
}

#[tokio::test]
async fn a_known_peer_id_from_another_address_neither_stops_nor_moves_the_peer() {
    let h = harness(|_| {});
    let m = package(1, 70_000);
    h.publish("app", &m).await;
    ok(h.announce("127.0.0.1:1", &announce_req(&m, 1, 5)).await);
    let peers_of_3 = || async {
        let r = ok(h.announce("127.0.0.3:1", &announce_req(&m, 3, 5)).await);
        let mut v: Vec<String> = r.peers.iter().map(|p| p.addr.to_string()).collect();
        v.sort();
        v
    };
    assert_eq!(peers_of_3().await, ["127.0.0.1:7001"]);
    // Someone who learned peer 1's id (dict answers list ids) sends `stopped` for it...
    let mut stop = announce_req(&m, 1, 5);
    stop.event = Event::Stopped;
    ok(h.announce("127.0.0.66:1", &stop).await);
    assert_eq!(peers_of_3().await, ["127.0.0.1:7001"], "not stopped");
    // ... or announces it with their own port: that is another peer, beside the real one.
    let mut moved = announce_req(&m, 1, 5);
    moved.port = 9999;
    ok(h.announce("127.0.0.66:1", &moved).await);
    assert_eq!(
        peers_of_3().await,
        ["127.0.0.1:7001", "127.0.0.66:9999"],
        "not moved"
    );
    // The peer itself changing its port from its own address updates its entry.
    let mut new_port = announce_req(&m, 1, 5);
    new_port.port = 7100;
    ok(h.announce("127.0.0.1:1", &new_port).await);
    assert_eq!(peers_of_3().await, ["127.0.0.1:7100", "127.0.0.66:9999"]);
    // And its own `stopped` removes it.
    let mut stop = announce_req(&m, 1, 5);
    stop.event = Event::Stopped;
    ok(h.announce("127.0.0.1:1", &stop).await);
    assert_eq!(peers_of_3().await, ["127.0.0.66:9999"]);
}

#[tokio::test]
async fn compact_answers_carry_no_peer_ids() {
    let h = harness(|_| {});
    let m = package(1, 70_000);
    h.publish("app", &m).await;
    for id in 1..=5 {
        ok(
            h.announce(&format!("127.0.0.{id}:1"), &announce_req(&m, id, 5))
                .await,
        );
    }
    let asker = announce_req(&m, 9, 5);
    assert!(asker.compact);
    let (_, _, body) = h
        .call(
            "127.0.0.9:1",
            Request::get(format!("/announce?{}", asker.to_query()))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    let r = ok(AnnounceResponse::decode(&body).unwrap());
    assert_eq!(r.peers.len(), 5);
    assert!(r.peers.iter().all(|p| p.peer_id.is_none()));
    assert!(!body.windows(7).any(|w| w == b"peer id"));
    for id in 1..=5u8 {
        assert!(
            !body.windows(20).any(|w| w == [id; 20]),
            "peer {id}'s id is in a compact answer"
        );
    }
}

#[tokio::test]
async fn silent_peers_expire_after_two_intervals() {
    let h = harness(|c| c.announce_interval = Duration::from_secs(10));
    let m = package(1, 70_000);
    h.publish("app", &m).await;
    let t0 = tokio::time::Instant::now();
    let q1 = announce_req(&m, 1, 5).to_query();
    let q2 = announce_req(&m, 2, 5).to_query();
    serve_announce(&h.state, "127.0.0.1".parse().unwrap(), &q1, t0);
    serve_announce(
        &h.state,
        "127.0.0.2".parse().unwrap(),
        &q2,
        t0 + Duration::from_secs(15),
    );
    // The sweeper's cutoff at t0 + 25 s is "not seen for two intervals (20 s)".
    assert_eq!(h.state.swarms.sweep(t0 + Duration::from_secs(5)), 1);
    let swarm = h.state.swarms.get(&m.info_hash).unwrap();
    assert_eq!(swarm.leechers().len(), 1);
    assert_eq!(swarm.leechers()[0].peer_id, PeerId([2; 20]));
}

#[tokio::test]
async fn catalog_and_swarms_survive_restart() {
    let dir = tempfile::tempdir().unwrap();
    let config = Config {
        data_dir: dir.path().to_path_buf(),
        ..Config::default()
    };
    let m = package(7, 90_000);
    {
        let h = Harness {
            _dir: tempfile::tempdir().unwrap(),
            state: AppState::open(config.clone()).unwrap(),
        };
        assert_eq!(h.publish("app", &m).await, StatusCode::CREATED);
        h.put(
            "/api/v1/packages/app/tags/prod",
            m.sha256.to_hex().into_bytes(),
            None,
        )
        .await;
    }
    let h = Harness {
        _dir: dir,
        state: AppState::open(config).unwrap(),
    };
    let (s, b) = h.get("/api/v1/packages/app/prod").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(json::<VersionInfo>(&b).info_hash, m.info_hash);
    ok(h.announce("127.0.0.1:1", &announce_req(&m, 1, 5)).await);
}

#[tokio::test]
async fn dashboard_metrics_and_health() {
    let h = harness(|_| {});
    let m = package(1, 70_000);
    h.publish("web-app", &m).await;
    let mut r = announce_req(&m, 1, 35_000);
    r.zone = Some(Zone::new("dc1/rack7").unwrap());
    ok(h.announce("127.0.0.1:1", &r).await);
    let (s, b) = h.get("/").await;
    assert_eq!(s, StatusCode::OK);
    let html = String::from_utf8(b).unwrap();
    assert!(
        html.contains("web-app") && html.contains("dc1/rack7") && html.contains("50%"),
        "{html}"
    );
    assert!(html.contains("http-equiv=\"refresh\""));

    let (_, b) = h.get("/metrics").await;
    let text = String::from_utf8(b).unwrap();
    assert!(
        text.contains("fbpkg_tracker_announces_total{outcome=\"ok\"} 1"),
        "{text}"
    );
    assert!(text.contains("fbpkg_tracker_peers{role=\"leecher\"} 1"));
    assert!(text.contains("fbpkg_tracker_catalog_versions 1"));
    assert!(text.contains("fbpkg_tracker_request_duration_seconds_count{route=\"announce\"} 1"));

    assert_eq!(h.get("/healthz").await.0, StatusCode::OK);
    assert_eq!(h.get("/readyz").await.0, StatusCode::OK);
    let long = format!("/announce?{}", "a".repeat(5000));
    assert_eq!(h.get(&long).await.0, StatusCode::URI_TOO_LONG);
}

#[tokio::test]
async fn config_refuses_open_publishing_beyond_loopback() {
    let c = Config {
        listen: "0.0.0.0:6969".parse().unwrap(),
        ..Config::default()
    };
    assert!(
        c.validate(false)
            .unwrap_err()
            .to_string()
            .contains("publish token")
    );
    assert!(c.validate(true).is_ok());
    let c = Config {
        publish_token: Some("t".into()),
        ..c
    };
    assert!(c.validate(false).is_ok());
}
