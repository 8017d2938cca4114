//! Everything a client can stretch has a bound, tested as an attacker
//! would, against the real `vtp-backend` binary: a multipart part header
//! that never ends, uploads that stall or crowd in, a request head sent a
//! byte at a time, pages of other sites posting to a local backend, floods
//! of event streams, of made-up tokens and of reports for made-up jobs,
//! concurrent starts racing the active-job cap, and creates past the
//! pending cap. Each is bounded in count and time.

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{BackendProcess, FaultProxy, json_of};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use vtp_storage::testing::{TestDatabase, TestS3};
use vtp_trainer::testing::TrainerDouble;

/// A backend on SQLite and local disk in `dir`, with `extra` settings.
async fn local_backend(dir: &std::path::Path, extra: &[(&str, &str)]) -> BackendProcess {
    let mut env = vec![
        (
            "VTP_DATABASE_URL",
            format!("sqlite://{}", dir.join("vtp.db").display()),
        ),
        (
            "VTP_BLOB_URL",
            format!("file://{}", dir.join("blobs").display()),
        ),
        ("VTP_LAUNCHER", "http".to_owned()),
        ("VTP_TRAINER_URL", "http://127.0.0.1:9".to_owned()),
    ];
    env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
    BackendProcess::start(&env).await
}

/// Resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

/// `host:port` of a backend.
fn authority(backend: &BackendProcess) -> String {
    backend.url.trim_start_matches("http://").to_owned()
}

/// Reads an HTTP response's head from `stream`: its status and the
/// whole text read (up to `limit` bytes, or until the peer closes).
async fn read_response(stream: &mut tokio::net::TcpStream, limit: usize) -> (u16, String) {
    let mut buf = vec![0u8; limit];
    let mut read = 0;
    while read < limit {
        match stream.read(&mut buf[read..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
        if String::from_utf8_lossy(&buf[..read]).contains("\r\n\r\n{") {
            // The head and the start of a JSON body: enough, the rest may
            // never be followed by a close.
            let text = String::from_utf8_lossy(&buf[..read]).into_owned();
            if text.trim_end().ends_with('}') {
                break;
            }
        }
    }
    let text = String::from_utf8_lossy(&buf[..read]).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

/// The chunked-encoding frame of `data`.
fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_part_header_that_never_ends_is_refused_after_a_few_kib_and_costs_no_memory() {
    let dir = tempfile::tempdir().unwrap();
    let backend = local_backend(dir.path(), &[]).await;
    let http = reqwest::Client::new();
    // Warm up what a first request allocates.
    http.get(backend.at("/health")).send().await.unwrap();
    let before = rss_kib(backend.pid());

    let mut stream = tokio::net::TcpStream::connect(authority(&backend))
        .await
        .unwrap();
    let head = format!(
        "POST /datasets/upload?user_id=mallory&dataset_name=d HTTP/1.1\r\nHost: {}\r\n\
         Content-Type: multipart/form-data; boundary=XB\r\nTransfer-Encoding: chunked\r\n\r\n",
        authority(&backend)
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
        .write_all(&chunk(
            b"--XB\r\nContent-Disposition: form-data; name=\"file\"; filename=\"",
        ))
        .await
        .unwrap();
    // A filename that never ends, 16 KiB at a time, up to 400 MiB; after
    // each chunk, a look for the answer.
    let a = chunk(&[b'a'; 16 * 1024]);
    let mut sent = 0usize;
    let mut answer = None;
    while sent < 400 << 20 {
        if stream.write_all(&a).await.is_err() {
            break;
        }
        sent += 16 * 1024;
        let mut peek = [0u8; 1];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(2), stream.peek(&mut peek)).await
            && n > 0
        {
            answer = Some(read_response(&mut stream, 4096).await);
            break;
        }
    }
    let (status, text) = match answer {
        Some(answer) => answer,
        None => read_response(&mut stream, 4096).await,
    };
    assert_eq!(status, 413, "{text}");
    assert!(text.contains("part_header_too_large"), "{text}");
    assert!(
        sent <= 256 * 1024,
        "refused after a few KiB, not after {} KiB",
        sent / 1024
    );
    let grown = rss_kib(backend.pid()).saturating_sub(before);
    assert!(grown < 16 * 1024, "the backend grew by {grown} KiB");
    eprintln!(
        "part-header bomb: refused after {} KiB sent, backend RSS {before} -> +{grown} KiB",
        sent / 1024
    );
    // The backend still serves.
    let (status, _) = json_of(http.get(backend.at("/health")).send().await.unwrap()).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_crowding_uploads_are_cut_off_and_leave_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let backend = local_backend(
        dir.path(),
        &[
            ("VTP_UPLOAD_IDLE_SECS", "2"),
            ("VTP_MAX_CONCURRENT_UPLOADS_PER_USER", "1"),
        ],
    )
    .await;
    // An upload that sends its first part's header and a little data, then
    // nothing.
    let mut stalled = tokio::net::TcpStream::connect(authority(&backend))
        .await
        .unwrap();
    let head = format!(
        "POST /datasets/upload?user_id=u&dataset_name=d HTTP/1.1\r\nHost: {}\r\n\
         Content-Type: multipart/form-data; boundary=XB\r\nTransfer-Encoding: chunked\r\n\r\n",
        authority(&backend)
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled
        .write_all(&chunk(
            b"--XB\r\nContent-Disposition: form-data; name=\"file\"; filename=\"d.zip\"\r\n\r\nPK\x03\x04",
        ))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Meanwhile the same user's second upload is one too many.
    let http = reqwest::Client::new();
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"PK".to_vec()).file_name("e.zip"),
        )
        .text("user_id", "u")
        .text("dataset_name", "e");
    let response = http
        .post(backend.at("/datasets/upload"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    // The stalled one is cut off after its idle limit.
    let started = Instant::now();
    let (status, text) = read_response(&mut stalled, 4096).await;
    assert_eq!(status, 408, "{text}");
    assert!(text.contains("upload_stalled"), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // It staged nothing that stays, and its place is free again.
    let staging = dir.path().join("blobs/uploads/tmp");
    let left = std::fs::read_dir(&staging).map_or(0, |d| d.count());
    assert_eq!(left, 0, "a staged object was left in {}", staging.display());
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"PK".to_vec()).file_name("e.zip"),
        )
        .text("user_id", "u")
        .text("dataset_name", "e");
    let response = http
        .post(backend.at("/datasets/upload"))
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_sent_slowly_is_cut_off() {
    let dir = tempfile::tempdir().unwrap();
    let backend = local_backend(dir.path(), &[("VTP_HEADER_TIMEOUT_SECS", "1")]).await;
    let mut slow = tokio::net::TcpStream::connect(authority(&backend))
        .await
        .unwrap();
    slow.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        .await
        .unwrap();
    let started = Instant::now();
    let mut byte = [0u8; 1];
    // A byte a little more often than never: the head stays incomplete.
    let closed = tokio::time::timeout(Duration::from_secs(8), async {
        loop {
            if slow.write_all(b"a").await.is_err() {
                return;
            }
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(300), slow.read(&mut byte)).await
            {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was never closed");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_of_other_sites_cannot_use_a_backend_without_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let backend = local_backend(dir.path(), &[]).await;
    let own = authority(&backend);
    let http = reqwest::Client::new();
    let job = json!({"user_id": "u", "model_name": "small_cnn", "framework": "tch",
                     "dataset_s3_uri": "s3://b/users/u/datasets/d/"});
    let post = |origin: Option<&str>| {
        let mut request = http.post(backend.at("/training/jobs")).json(&job);
        if let Some(origin) = origin {
            request = request.header("origin", origin);
        }
        request
    };
    // Cross-site request forgery: a page elsewhere posts to the backend.
    for origin in [
        "https://evil.example",
        "http://localhost:3000",
        "null",
        &format!("http://evil.example:{}", own.rsplit(':').next().unwrap()),
    ] {
        let (status, body) = json_of(post(Some(origin)).send().await.unwrap()).await;
        assert_eq!(status, 403, "{origin}: {body}");
        assert_eq!(body["error"]["code"], "forbidden_origin");
    }
    // A form's body, which a page may send anywhere without asking.
    let (status, _) = json_of(
        http.post(backend.at("/training/jobs"))
            .header("content-type", "text/plain")
            .body(job.to_string())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 415);
    let (status, _) = json_of(
        http.post(backend.at("/training/jobs"))
            .body(job.to_string())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 415, "JSON must say it is JSON");
    // An upload from a page elsewhere.
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(b"PK".to_vec()).file_name("d.zip"),
        )
        .text("user_id", "u")
        .text("dataset_name", "d");
    let response = http
        .post(backend.at("/datasets/upload"))
        .header("origin", "https://evil.example")
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    // DNS rebinding: a site's own name pointed at 127.0.0.1; reads refused.
    let mut rebound = tokio::net::TcpStream::connect(&own).await.unwrap();
    rebound
        .write_all(
            b"GET /training/jobs HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
    let (status, text) = read_response(&mut rebound, 8192).await;
    assert_eq!(status, 403, "{text}");
    // The backend's own pages, and programs (no Origin), are served.
    let (status, body) = json_of(post(Some(&format!("http://{own}"))).send().await.unwrap()).await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = json_of(post(None).send().await.unwrap()).await;
    assert_eq!(status, 201, "{body}");
    let (status, _) = json_of(
        http.get(format!(
            "http://localhost:{}/training/jobs",
            own.rsplit(':').next().unwrap()
        ))
        .send()
        .await
        .unwrap(),
    )
    .await;
    assert_eq!(status, 200, "localhost is this machine");
}

/// A backend with tokens on Postgres (through a proxy that can take the
/// database away) and Garage, launching on a trainer double.
struct Shared {
    backend: BackendProcess,
    env: Vec<(&'static str, String)>,
    proxy: FaultProxy,
    trainer: TrainerDouble,
    _db: TestDatabase,
    s3: TestS3,
    blob_url: String,
}

impl Shared {
    async fn start(extra: &[(&'static str, &str)]) -> Option<Self> {
        let db = TestDatabase::create().await?;
        let s3 = TestS3::from_env()?;
        let mut url = url::Url::parse(db.url()).unwrap();
        let target = {
            use std::net::ToSocketAddrs;
            format!(
                "{}:{}",
                url.host_str().unwrap(),
                url.port_or_known_default().unwrap()
            )
            .to_socket_addrs()
            .unwrap()
            .next()
            .unwrap()
        };
        let proxy = FaultProxy::start(target).await;
        url.set_host(Some("127.0.0.1")).unwrap();
        url.set_port(Some(proxy.addr().port())).unwrap();
        let blob_url = s3.fresh_url();
        let trainer = TrainerDouble::start().await;
        let mut env = s3.env_for(&blob_url);
        env.push(("VTP_DATABASE_URL", url.to_string()));
        env.push(("VTP_LAUNCHER", "http".to_owned()));
        env.push(("VTP_TRAINER_URL", trainer.url()));
        env.push(("VTP_AUTH", "tokens".to_owned()));
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let backend = BackendProcess::start(&env).await;
        Some(Shared {
            backend,
            env,
            proxy,
            trainer,
            _db: db,
            s3,
            blob_url,
        })
    }

    fn token(&self, user: &str) -> String {
        let (ok, out, err) = support::run_binary(
            env!("CARGO_BIN_EXE_vtp-backend"),
            &self.env,
            &["token", "create", "--user", user],
        );
        assert!(ok, "{err}");
        out
    }

    fn client(token: &str) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
    }

    /// A dataset of `user`'s, uploaded; its URI.
    async fn dataset(&self, http: &reqwest::Client) -> String {
        let form = reqwest::multipart::Form::new()
            .part(
                "file",
                reqwest::multipart::Part::bytes(b"PK data".to_vec()).file_name("d.zip"),
            )
            .text("dataset_name", "d");
        let (status, body) = json_of(
            http.post(self.backend.at("/datasets/upload"))
                .multipart(form)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 201, "{body}");
        body["s3_uri"].as_str().unwrap().to_owned()
    }

    async fn create(&self, http: &reqwest::Client, dataset: &str) -> (u16, Value) {
        let body =
            json!({"model_name": "small_cnn", "framework": "tch", "dataset_s3_uri": dataset});
        let (status, job) = json_of(
            http.post(self.backend.at("/training/jobs"))
                .json(&body)
                .send()
                .await
                .unwrap(),
        )
        .await;
        (status.as_u16(), job)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_starts_leave_at_most_the_cap_active_and_creates_stop_at_the_pending_cap()
{
    let Some(env) = Shared::start(&[
        ("VTP_MAX_ACTIVE_JOBS_PER_USER", "3"),
        ("VTP_MAX_PENDING_JOBS_PER_USER", "20"),
        ("VTP_RATE_CREATES_PER_MINUTE", "1000"),
    ])
    .await
    else {
        return;
    };
    let alice = Shared::client(&env.token("alice"));
    let dataset = env.dataset(&alice).await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        let (status, job) = env.create(&alice, &dataset).await;
        assert_eq!(status, 201, "{job}");
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    // The pending cap: a 21st job waits for one of these to start.
    let (status, refused) = env.create(&alice, &dataset).await;
    assert_eq!(status, 429, "{refused}");

    let starts = ids.iter().map(|id| {
        let (http, url) = (
            alice.clone(),
            env.backend.at(&format!("/training/jobs/{id}/start")),
        );
        async move { http.post(url).send().await.unwrap().status().as_u16() }
    });
    let statuses = futures::future::join_all(starts).await;
    let started = statuses.iter().filter(|s| **s == 202).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    assert_eq!((started, refused), (3, 17), "{statuses:?}");
    let (_, active) = json_of(
        alice
            .get(env.backend.at("/training/jobs?status=queued"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(active["total"], 3, "{active}");
    env.trainer.wait_started(3).await;
    // Now one more may be created.
    let (status, _) = env.create(&alice, &dataset).await;
    assert_eq!(status, 201);
    let _ = (&env.s3, &env.blob_url);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_credentials_are_refused_before_the_database() {
    let Some(env) = Shared::start(&[("VTP_RATE_AUTH_LOOKUPS_PER_MINUTE", "5")]).await else {
        return;
    };
    let alice = Shared::client(&env.token("alice"));
    // An anonymous health check says only up or down; a user learns more.
    let (status, anonymous) = json_of(reqwest::get(env.backend.at("/health")).await.unwrap()).await;
    assert_eq!(
        (status.as_u16(), &anonymous),
        (200, &json!({"status": "ok"}))
    );
    let (_, known) = json_of(alice.get(env.backend.at("/health")).send().await.unwrap()).await;
    assert_eq!(known["database"], "ok", "{known}");
    let http = reqwest::Client::new();
    // Well-formed, unknown tokens: each costs a lookup (401), until the
    // client address's budget of failures is spent; then 429, before any
    // database work.
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let token = vtp_core::auth::random_token();
        let response = http
            .get(env.backend.at("/training/jobs"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    let first_refused = statuses.iter().position(|s| *s == 429).unwrap_or(12);
    assert!(
        (5..=6).contains(&first_refused)
            && statuses[..first_refused].iter().all(|s| *s == 401)
            && statuses[first_refused..].iter().all(|s| *s == 429),
        "a few lookups, then refusals: {statuses:?}"
    );
    // With the database away, nothing from that address reaches it: made-up
    // tokens are refused as before (a lookup would answer 503 now), and
    // tokens that cannot be tokens are refused without one anyway.
    env.proxy.set_down(true);
    let response = http
        .get(env.backend.at("/training/jobs"))
        .bearer_auth(vtp_core::auth::random_token())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 429);
    assert!(response.headers().contains_key("retry-after"));
    for bad in ["nonsense", "vtp_0123", &format!("vtp_{}", "Z".repeat(64))] {
        let (status, body) = json_of(
            http.get(env.backend.at("/training/jobs"))
                .bearer_auth(bad)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 401, "{bad}: {body}");
    }
    // Reports for made-up jobs: unsigned or stale ones 401 at once; signed
    // ones for unknown jobs are counted against the same budget.
    let job = vtp_core::JobId::new();
    let url = env.backend.at(&format!("/training/jobs/{job}/callback"));
    let (status, _) = json_of(
        http.post(&url)
            .json(&json!({"status": "running"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 401, "no signature, no lookup");
    let signed = support::signed(
        &http,
        &url,
        &vtp_core::CallbackSecret::generate(),
        &json!({"status": "running", "seq": 1}),
    );
    let (status, _) = json_of(signed.send().await.unwrap()).await;
    assert_eq!(status, 429, "the client's lookups are spent");
    env.proxy.set_down(false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_event_streams_from_one_user_get_429_past_the_cap_and_others_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("vtp.db").display());
    let mut env = vec![("VTP_DATABASE_URL", db)];
    let token = |user: &str, env: &[(&'static str, String)]| {
        let (ok, out, err) = support::run_binary(
            env!("CARGO_BIN_EXE_vtp-backend"),
            env,
            &["token", "create", "--user", user],
        );
        assert!(ok, "{err}");
        out
    };
    let (mallory, alice) = (token("mallory", &env), token("alice", &env));
    env.extend([
        (
            "VTP_BLOB_URL",
            format!("file://{}", dir.path().join("blobs").display()),
        ),
        ("VTP_LAUNCHER", "http".to_owned()),
        ("VTP_TRAINER_URL", "http://127.0.0.1:9".to_owned()),
        ("VTP_AUTH", "tokens".to_owned()),
        ("VTP_MAX_STREAMS_PER_USER", "16".to_owned()),
        ("VTP_STREAM_MAX_SECS", "600".to_owned()),
    ]);
    let backend = BackendProcess::start(&env).await;
    let (mallory, alice) = (Shared::client(&mallory), Shared::client(&alice));
    let job = json!({"model_name": "small_cnn", "framework": "tch",
                     "dataset_s3_uri": format!("file://{}/blobs/users/mallory/datasets/d/x.zip", dir.path().display())});
    let (status, created) = json_of(
        mallory
            .post(backend.at("/training/jobs"))
            .json(&job)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let events = backend.at(&format!(
        "/training/jobs/{}/events",
        created["id"].as_str().unwrap()
    ));
    // 1,000 streams, 64 at a time: the first 16 stay open, the rest are
    // refused at once.
    let mut open = Vec::new();
    let mut refused = 0;
    for _ in 0..1000 / 64 + 1 {
        let batch = futures::future::join_all((0..64).map(|_| mallory.get(&events).send())).await;
        for response in batch {
            let response = response.unwrap();
            match response.status().as_u16() {
                200 => open.push(response),
                429 => {
                    assert!(response.headers().contains_key("retry-after"));
                    refused += 1;
                }
                other => panic!("{other}"),
            }
        }
    }
    assert_eq!(open.len(), 16, "the cap");
    assert_eq!(refused, 1024 - 16);
    // Another user is served as before.
    for _ in 0..20 {
        let response = alice
            .get(backend.at("/training/jobs"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
    }
    let (status, _) = json_of(alice.get(&events).send().await.unwrap()).await;
    assert_eq!(status, 404, "and another user's job is not theirs to watch");
    // Closing one frees its place.
    drop(open.pop());
    let again = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            let response = mallory.get(&events).send().await.unwrap();
            if response.status() == 200 {
                return response;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("a closed stream frees its place");
    open.push(again);

    // Shutting down ends every stream: the backend exits promptly.
    let pid = backend.pid();
    let started = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let mut ended = 0;
    for stream in open {
        let body = tokio::time::timeout(Duration::from_secs(10), stream.bytes()).await;
        assert!(body.is_ok(), "a stream outlived the shutdown");
        ended += 1;
    }
    assert_eq!(ended, 16);
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "the backend did not exit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_stream_ends_after_its_lifetime_and_a_reconnect_misses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let backend = local_backend(dir.path(), &[("VTP_STREAM_MAX_SECS", "2")]).await;
    let http = reqwest::Client::new();
    let job = json!({"user_id": "u", "model_name": "small_cnn", "framework": "tch",
                     "dataset_s3_uri": "s3://b/users/u/datasets/d/"});
    let (_, created) = json_of(
        http.post(backend.at("/training/jobs"))
            .json(&job)
            .send()
            .await
            .unwrap(),
    )
    .await;
    let id = created["id"].as_str().unwrap();
    let started = Instant::now();
    let text = tokio::time::timeout(
        Duration::from_secs(10),
        http.get(backend.at(&format!("/training/jobs/{id}/events")))
            .send()
            .await
            .unwrap()
            .text(),
    )
    .await
    .expect("the stream ends after its lifetime")
    .unwrap();
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(text.contains("event: status"), "{text}");
    // The job was cancelled meanwhile: the reconnect gets just that.
    let (status, _) = json_of(
        http.delete(backend.at(&format!("/training/jobs/{id}")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    let rest = http
        .get(backend.at(&format!("/training/jobs/{id}/events")))
        .header("last-event-id", "0")
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(rest.contains("\"cancelled\""), "{rest}");
    assert!(!rest.contains("id: 0\n"), "nothing twice: {rest}");
}
