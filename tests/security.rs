//! The security model, tested as an attacker would: the real `vtp-backend`
//! binary with `VTP_AUTH=tokens` on Postgres and Garage, tokens made with
//! its own `token create`, a trainer double as the launcher. User B tries
//! every route on user A's objects; trainer reports are forged, replayed,
//! re-signed with another job's secret and pointed outside their job.

mod support;

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use support::{BackendProcess, json_of, signed};
use vtp_core::{BlobKey, BlobStore, BlobStoreExt, CallbackSecret};
use vtp_storage::testing::{TestDatabase, TestS3};
use vtp_trainer::testing::TrainerDouble;

struct Env {
    backend: BackendProcess,
    blobs: std::sync::Arc<dyn BlobStore>,
    trainer: TrainerDouble,
    env: Vec<(&'static str, String)>,
    _db: TestDatabase,
}

/// Runs `vtp-backend token ...` against the test database; its stdout.
fn token_command(env: &[(&'static str, String)], args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["token"];
    all.extend_from_slice(args);
    support::run_binary(env!("CARGO_BIN_EXE_vtp-backend"), env, &all)
}

fn token(env: &[(&'static str, String)], user: &str, admin: bool) -> String {
    let mut args = vec!["create", "--user", user];
    if admin {
        args.push("--admin");
    }
    let (ok, out, err) = token_command(env, &args);
    assert!(ok, "token create: {err}");
    assert!(out.starts_with("vtp_"), "{out}");
    assert!(!err.contains(&out), "the token is printed once, on stdout");
    out
}

impl Env {
    async fn new() -> Option<Self> {
        Self::with(&[]).await
    }

    async fn with(extra: &[(&'static str, &str)]) -> Option<Self> {
        let db = TestDatabase::create().await?;
        let s3 = TestS3::from_env()?;
        let blob_url = s3.fresh_url();
        let trainer = TrainerDouble::start().await;
        let mut env = s3.env_for(&blob_url);
        env.push(("VTP_DATABASE_URL", db.url().to_owned()));
        env.push(("VTP_LAUNCHER", "http".to_owned()));
        env.push(("VTP_TRAINER_URL", trainer.url()));
        env.push(("VTP_AUTH", "tokens".to_owned()));
        env.extend(extra.iter().map(|(k, v)| (*k, (*v).to_owned())));
        let backend = BackendProcess::start(&env).await;
        let blobs = s3.builder().with_url(blob_url).build().unwrap();
        Some(Env {
            backend,
            blobs,
            trainer,
            env,
            _db: db,
        })
    }

    fn client(token: Option<&str>) -> reqwest::Client {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(token) = token {
            headers.insert(
                reqwest::header::AUTHORIZATION,
                format!("Bearer {token}").parse().unwrap(),
            );
        }
        reqwest::Client::builder()
            .default_headers(headers)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap()
    }

    async fn upload(
        &self,
        http: &reqwest::Client,
        fields: &[(&str, &str)],
        bytes: &[u8],
    ) -> (u16, Value) {
        let mut form = reqwest::multipart::Form::new().part(
            "file",
            reqwest::multipart::Part::bytes(bytes.to_vec()).file_name("data.zip"),
        );
        for (name, value) in fields {
            form = form.text(name.to_string(), value.to_string());
        }
        let (status, body) = json_of(
            http.post(self.backend.at("/datasets/upload"))
                .multipart(form)
                .send()
                .await
                .unwrap(),
        )
        .await;
        (status.as_u16(), body)
    }

    async fn call(&self, request: reqwest::RequestBuilder) -> (u16, Value) {
        let (status, body) = json_of(request.send().await.unwrap()).await;
        (status.as_u16(), body)
    }

    /// Creates and starts a job of the token's user on `dataset`; returns
    /// its id and the callback secret the trainer received.
    async fn started_job(&self, http: &reqwest::Client, dataset: &str) -> (String, CallbackSecret) {
        let body =
            json!({"model_name": "small_cnn", "framework": "tch", "dataset_s3_uri": dataset});
        let (status, job) = self
            .call(http.post(self.backend.at("/training/jobs")).json(&body))
            .await;
        assert_eq!(status, 201, "{job}");
        let id = job["id"].as_str().unwrap().to_owned();
        // Counted before the start: the backend's queue hands the job to
        // the trainer a moment after it answers, which on a loaded machine
        // may be before this test reads the count again.
        let launched = self.trainer.started().len() + 1;
        let (status, started) = self
            .call(http.post(self.backend.at(&format!("/training/jobs/{id}/start"))))
            .await;
        assert_eq!(status, 202, "{started}");
        let request = self
            .trainer
            .wait_started(launched)
            .await
            .into_iter()
            .find(|r| r.job_id.to_string() == id)
            .expect("the job was launched");
        (id, request.callback_secret.expect("a callback secret"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_see_only_their_own_objects() {
    let Some(env) = Env::new().await else { return };
    let alice_token = token(&env.env, "alice", false);
    let bob_token = token(&env.env, "bob", false);
    let admin_token = token(&env.env, "root", true);
    let (alice, bob, admin, anonymous) = (
        Env::client(Some(&alice_token)),
        Env::client(Some(&bob_token)),
        Env::client(Some(&admin_token)),
        Env::client(None),
    );

    // No token, a wrong token: 401 with a challenge; health and metrics stay open.
    for client in [
        &anonymous,
        &Env::client(Some("vtp_0123")),
        &Env::client(Some("Basic x")),
    ] {
        let response = client
            .get(env.backend.at("/training/jobs"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
        assert_eq!(response.headers()["www-authenticate"], "Bearer");
    }
    let (status, _) = env.call(anonymous.get(env.backend.at("/health"))).await;
    assert_eq!(status, 200);

    // Alice uploads (her user is taken from the token) and trains.
    let archive = b"PK alice's dataset".as_slice();
    let (status, uploaded) = env
        .upload(&alice, &[("dataset_name", "digits")], archive)
        .await;
    assert_eq!(status, 201, "{uploaded}");
    assert_eq!(uploaded["user_id"], "alice");
    let dataset = uploaded["s3_uri"].as_str().unwrap().to_owned();
    assert!(
        dataset.contains("/users/alice/datasets/digits/"),
        "{dataset}"
    );
    let (id, secret) = env.started_job(&alice, &dataset).await;
    let checkpoint = BlobKey::parse(&format!("jobs/{id}/best.safetensors")).unwrap();
    env.blobs
        .put_bytes(&checkpoint, Bytes::from_static(b"alice's weights"))
        .await
        .unwrap();
    let callback = env.backend.at(&format!("/training/jobs/{id}/callback"));
    for report in [
        json!({"status": "running", "seq": 1, "metrics": {"epoch": 1, "loss": 0.5}}),
        json!({"status": "completed", "seq": 2, "checkpoint_s3_uri": env.blobs.uri(&checkpoint)}),
    ] {
        let (status, answer) = env.call(signed(&alice, &callback, &secret, &report)).await;
        assert_eq!(status, 200, "{answer}");
    }
    let (_, before) = env
        .call(alice.get(env.backend.at(&format!("/training/jobs/{id}"))))
        .await;
    assert_eq!(before["status"], "completed");

    // Bob, with Alice's ids: every route answers as if nothing were there.
    let job = format!("/training/jobs/{id}");
    let routes = [
        ("GET", job.clone()),
        ("POST", format!("{job}/start")),
        ("DELETE", job.clone()),
        ("GET", format!("{job}/metrics")),
        ("GET", format!("{job}/events")),
        ("GET", format!("{job}/checkpoint")),
        ("GET", format!("{job}/checkpoint/best.json")),
        ("GET", format!("{job}/checkpoint/best.safetensors")),
    ];
    for (method, path) in &routes {
        let request = bob.request(method.parse().unwrap(), env.backend.at(path));
        let (status, body) = env.call(request).await;
        assert_eq!(status, 404, "bob {method} {path}: {body}");
    }
    let (status, page) = env.call(bob.get(env.backend.at("/training/jobs"))).await;
    assert_eq!((status, page["total"].as_u64()), (200, Some(0)), "{page}");
    let (status, _) = env
        .call(bob.get(env.backend.at("/training/jobs?user_id=alice")))
        .await;
    assert_eq!(status, 403);
    // Uploading as Alice is refused; the same dataset name lands under Bob.
    let (status, _) = env
        .upload(
            &bob,
            &[("user_id", "alice"), ("dataset_name", "digits")],
            b"PK evil",
        )
        .await;
    assert_eq!(status, 403);
    let (status, own) = env
        .upload(&bob, &[("dataset_name", "digits")], b"PK bob's")
        .await;
    assert_eq!(status, 201, "{own}");
    assert!(
        own["s3_uri"].as_str().unwrap().contains("/users/bob/"),
        "{own}"
    );
    // A job on Alice's dataset, or in Alice's name, is refused.
    let on_alices =
        json!({"model_name": "small_cnn", "framework": "tch", "dataset_s3_uri": dataset});
    let (status, body) = env
        .call(bob.post(env.backend.at("/training/jobs")).json(&on_alices))
        .await;
    assert_eq!(
        (status, &body["error"]["field"]),
        (422, &json!("dataset_s3_uri")),
        "{body}"
    );
    let mut as_alice = on_alices.clone();
    as_alice["user_id"] = json!("alice");
    let (status, _) = env
        .call(bob.post(env.backend.at("/training/jobs")).json(&as_alice))
        .await;
    assert_eq!(status, 403);
    // A checkpoint of Alice's job as Bob's starting weights is refused too.
    let mut init = json!({"model_name": "small_cnn", "framework": "tch",
                          "dataset_s3_uri": own["s3_uri"], "config": {"init_weights": env.blobs.uri(&checkpoint)}});
    let (status, body) = env
        .call(bob.post(env.backend.at("/training/jobs")).json(&init))
        .await;
    assert_eq!(
        (status, &body["error"]["field"]),
        (422, &json!("config.init_weights")),
        "{body}"
    );
    init["config"] = json!({});
    let (status, _) = env
        .call(bob.post(env.backend.at("/training/jobs")).json(&init))
        .await;
    assert_eq!(status, 201, "bob's own dataset is fine");

    // Mass assignment: server-owned fields in a create body are refused.
    for (field, value) in [
        ("status", json!("completed")),
        ("created_at", json!("2020-01-01T00:00:00Z")),
        ("checkpoint_s3_uri", json!(env.blobs.uri(&checkpoint))),
        ("id", json!(id)),
    ] {
        let mut body =
            json!({"model_name": "small_cnn", "framework": "tch", "dataset_s3_uri": dataset});
        body[field] = value;
        let (status, answer) = env
            .call(alice.post(env.backend.at("/training/jobs")).json(&body))
            .await;
        assert_eq!(status, 422, "{field}: {answer}");
    }

    // Alice's job, dataset and checkpoint are as they were.
    let (_, after) = env
        .call(alice.get(env.backend.at(&format!("/training/jobs/{id}"))))
        .await;
    assert_eq!(after, before);
    let key = env.blobs.key_for(&dataset).unwrap();
    assert_eq!(
        env.blobs.get_bytes(&key).await.unwrap(),
        Bytes::from(archive)
    );
    let weights = alice
        .get(env.backend.at(&format!("{job}/checkpoint")))
        .send()
        .await
        .unwrap();
    assert_eq!(weights.status(), 200);
    assert_eq!(
        weights.bytes().await.unwrap(),
        Bytes::from_static(b"alice's weights")
    );

    // The admin sees everyone's; a revoked token sees nothing.
    let (status, _) = env.call(admin.get(env.backend.at(&job))).await;
    assert_eq!(status, 200);
    let (_, all) = env.call(admin.get(env.backend.at("/training/jobs"))).await;
    assert_eq!(all["total"], 2, "{all}");
    let (ok, listed, _) = token_command(&env.env, &["list"]);
    assert!(
        ok && listed.contains("alice") && !listed.contains(&alice_token),
        "{listed}"
    );
    let alice_id = listed
        .lines()
        .find(|l| l.contains(" alice "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_owned();
    let (ok, _, err) = token_command(&env.env, &["revoke", &alice_id]);
    assert!(ok, "{err}");
    let (status, _) = env.call(alice.get(env.backend.at(&job))).await;
    assert_eq!(status, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_must_be_signed_by_their_own_job() {
    let Some(env) = Env::new().await else { return };
    let alice = Env::client(Some(&token(&env.env, "alice", false)));
    let (_, uploaded) = env
        .upload(&alice, &[("dataset_name", "d")], b"PK data")
        .await;
    let dataset = uploaded["s3_uri"].as_str().unwrap().to_owned();
    let (a, secret_a) = env.started_job(&alice, &dataset).await;
    let (b, secret_b) = env.started_job(&alice, &dataset).await;
    let url = env.backend.at(&format!("/training/jobs/{a}/callback"));
    let http = Env::client(None);
    let running = json!({"status": "running", "seq": 1, "progress": 0.1});
    let delivery = signed(&http, &url, &secret_a, &running);
    // Captured as it went over the wire: the same id, timestamp, signature
    // and body bytes are sent again below.
    let captured = delivery.try_clone().expect("a buffered body clones");
    let (status, _) = env.call(delivery).await;
    assert_eq!(status, 200);
    let (_, before) = env
        .call(alice.get(env.backend.at(&format!("/training/jobs/{a}"))))
        .await;

    let report = json!({"status": "completed", "seq": 9, "progress": 1.0});
    let body = report.to_string();
    let now = chrono::Utc::now().timestamp();
    let headed = |id: &str, ts: i64, signature: String| {
        http.post(&url)
            .header("content-type", "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", signature)
            .body(body.clone())
    };
    let cases: Vec<(&str, reqwest::RequestBuilder, u16)> = vec![
        ("unsigned", http.post(&url).json(&report), 401),
        (
            "a forged HMAC",
            headed(
                "x",
                now,
                CallbackSecret::generate()
                    .sign("x", now, body.as_bytes())
                    .unwrap(),
            ),
            401,
        ),
        ("an empty signature", headed("x", now, "v1,".into()), 401),
        (
            "six minutes old",
            headed(
                "x",
                now - 360,
                secret_a.sign("x", now - 360, body.as_bytes()).unwrap(),
            ),
            401,
        ),
        (
            "job B's secret",
            signed(&http, &url, &secret_b, &report),
            401,
        ),
        (
            "a checkpoint outside jobs/{a}/",
            signed(
                &http,
                &url,
                &secret_a,
                &json!({"status": "completed", "seq": 9, "checkpoint_s3_uri": dataset}),
            ),
            422,
        ),
        (
            "another job's checkpoint",
            signed(
                &http,
                &url,
                &secret_a,
                &json!({"status": "completed", "seq": 9, "checkpoint_s3_uri": env.blobs.uri(&BlobKey::parse(&format!("jobs/{b}/best.safetensors")).unwrap())}),
            ),
            422,
        ),
        (
            "a resume point in another job's sets",
            signed(
                &http,
                &url,
                &secret_a,
                &json!({"status": "running", "seq": 9, "last_checkpoint_s3_uri": env.blobs.uri(&BlobKey::parse(&format!("jobs/{b}/epochs/000001/last.safetensors")).unwrap())}),
            ),
            422,
        ),
        (
            "a seq near i64::MAX",
            signed(
                &http,
                &url,
                &secret_a,
                &json!({"status": "running", "seq": i64::MAX - 1}),
            ),
            422,
        ),
    ];
    for (what, request, expected) in cases {
        let (status, answer) = env.call(request).await;
        assert_eq!(status, expected, "{what}: {answer}");
    }
    // A byte-identical replay of a valid delivery is harmless.
    let (status, answer) = env.call(captured).await;
    assert_eq!(
        (status, &answer["applied"]),
        (200, &json!(false)),
        "{answer}"
    );
    let (_, after) = env
        .call(alice.get(env.backend.at(&format!("/training/jobs/{a}"))))
        .await;
    assert_eq!(after, before, "nothing changed the job");

    // The real reports still go through.
    let (status, answer) = env
        .call(signed(
            &http,
            &url,
            &secret_a,
            &json!({"status": "completed", "seq": 2}),
        ))
        .await;
    assert_eq!(
        (status, &answer["job_status"]),
        (200, &json!("completed")),
        "{answer}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bursts_are_limited_per_user_and_others_go_on() {
    let Some(env) = Env::with(&[
        ("VTP_RATE_CREATES_PER_MINUTE", "3"),
        ("VTP_MAX_ACTIVE_JOBS_PER_USER", "1"),
    ])
    .await
    else {
        return;
    };
    let alice = Env::client(Some(&token(&env.env, "alice", false)));
    let bob = Env::client(Some(&token(&env.env, "bob", false)));
    let mut datasets = Vec::new();
    for client in [&alice, &bob] {
        let (status, uploaded) = env
            .upload(client, &[("dataset_name", "d")], b"PK data")
            .await;
        assert_eq!(status, 201, "{uploaded}");
        datasets.push(uploaded["s3_uri"].as_str().unwrap().to_owned());
    }
    let create = |client: &reqwest::Client, dataset: &str| {
        client.post(env.backend.at("/training/jobs")).json(
            &json!({"model_name": "small_cnn", "framework": "tch", "dataset_s3_uri": dataset}),
        )
    };
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (status, job) = env.call(create(&alice, &datasets[0])).await;
        assert_eq!(status, 201, "{job}");
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    let response = create(&alice, &datasets[0]).send().await.unwrap();
    assert_eq!(response.status(), 429);
    let retry: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // Bob is not held back by Alice's burst.
    let (status, bobs) = env.call(create(&bob, &datasets[1])).await;
    assert_eq!(status, 201, "{bobs}");

    // One active job each: Alice's second start waits, Bob's goes.
    let start = |client: &reqwest::Client, id: &str| {
        client.post(env.backend.at(&format!("/training/jobs/{id}/start")))
    };
    let (status, _) = env.call(start(&alice, &ids[0])).await;
    assert_eq!(status, 202);
    let (status, answer) = env.call(start(&alice, &ids[1])).await;
    assert_eq!(status, 429, "{answer}");
    let (_, job) = env
        .call(alice.get(env.backend.at(&format!("/training/jobs/{}", ids[1]))))
        .await;
    assert_eq!(
        job["status"], "pending",
        "a refused start leaves the job as it was"
    );
    let (status, _) = env.call(start(&bob, bobs["id"].as_str().unwrap())).await;
    assert_eq!(status, 202);

    // Values that would exhaust a trainer are refused at create.
    for config in [
        json!({"epochs": 1_000_000}),
        json!({"batch_size": 4096, "image_size": 4096}),
    ] {
        let (status, answer) = env
            .call(bob.post(env.backend.at("/training/jobs")).json(
                &json!({"model_name": "small_cnn", "framework": "tch", "dataset_s3_uri": datasets[1], "config": config}),
            ))
            .await;
        assert_eq!(status, 422, "{config}: {answer}");
    }
}

/// Runs the `vtp` CLI against the backend; (success, stdout, stderr).
fn cli(env: &Env, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut command = std::process::Command::new(support::vtp_cli());
    command
        .env_remove("VTP_TOKEN")
        .env("VTP_URL", &env.backend.url)
        .args(args);
    if let Some(token) = token {
        command.env("VTP_TOKEN", token);
    }
    let out = command.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_sends_its_token_and_fails_clearly_without_one() {
    let Some(env) = Env::new().await else { return };
    let alice = token(&env.env, "alice", false);
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("data.zip");
    std::fs::write(&archive, b"PK cli upload").unwrap();
    let file = archive.display().to_string();

    let (ok, _, err) = cli(&env, None, &["upload", &file, "--name", "d"]);
    assert!(!ok, "an upload without a token fails");
    assert!(
        err.contains("unauthenticated") && err.contains("Bearer"),
        "{err}"
    );
    let (ok, uri, err) = cli(&env, Some(&alice), &["upload", &file, "--name", "d"]);
    assert!(ok, "{err}");
    assert!(
        uri.contains("/users/alice/datasets/d/"),
        "the token's user owns it: {uri}"
    );
    // --token wins over the environment.
    let (ok, _, err) = cli(
        &env,
        Some("vtp_wrong"),
        &["--token", &alice, "upload", &file, "--name", "e"],
    );
    assert!(ok, "{err}");
    let (ok, _, err) = cli(
        &env,
        Some(&alice),
        &["upload", &file, "--name", "f", "--user", "bob"],
    );
    assert!(!ok && err.contains("forbidden"), "{err}");
}

#[test]
fn auth_cannot_be_off_beyond_loopback() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_vtp-backend"))
        .env("VTP_LISTEN", "0.0.0.0:0")
        .env("VTP_AUTH", "off")
        .env("VTP_DATABASE_URL", "memory://")
        .env("VTP_BLOB_URL", "memory://")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve without authentication"),
        "{stderr}"
    );
}
