//! TLS wherever VTP's traffic leaves the machine, end to end on the real
//! binaries with Postgres and Garage: S3 is Garage behind a TLS-terminating
//! proxy, the backend API sits behind another (as behind an ingress), and a
//! throwaway CA signed both certificates. The backend, its trainer child
//! and the `vtp` CLI trust that CA through `VTP_CA_CERT` / `--ca-cert`, and
//! refuse a certificate nobody vouched for.

mod support;
#[path = "support/tls.rs"]
mod tls;

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use support::{ServiceProcess, run_binary as run};
use tls::{Pki, TlsProxy};
use vtp_core::{BlobKey, BlobStoreExt};
use vtp_storage::testing::{TestDatabase, TestS3};

/// The loopback address of an `http://host:port` URL.
fn socket_of(url: &str) -> SocketAddr {
    let url = reqwest::Url::parse(url).unwrap();
    let host = url.host_str().unwrap().replace("localhost", "127.0.0.1");
    format!("{host}:{}", url.port_or_known_default().unwrap())
        .parse()
        .unwrap()
}

fn shapes_zip(dir: &Path) -> String {
    vtp_trainer::testing::shapes_dataset(&dir.join("shapes"), 12, 5);
    let archive = dir.join("shapes.zip");
    vtp_trainer::testing::zip_dir(&dir.join("shapes"), &archive);
    archive.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_trains_with_every_connection_over_https() {
    let Some(db) = TestDatabase::create().await else {
        return;
    };
    let Some(s3) = TestS3::from_env() else { return };
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    let ca = pki.write_ca(dir.path(), "ca.pem");
    let other_ca = Pki::new().write_ca(dir.path(), "other-ca.pem");

    // S3 over https: the store trusts the CA it is given, and only that.
    let garage = socket_of(s3.settings.endpoint.as_deref().unwrap());
    let s3_tls = TlsProxy::start(garage, &pki).await;
    let blob_url = s3.fresh_url();
    let https_store = |ca: &Path| {
        let mut settings = s3.settings.clone();
        settings.endpoint = Some(s3_tls.url());
        settings.allow_http = false;
        vtp_storage::BlobStoreBuilder::new()
            .with_url(blob_url.clone())
            .with_s3(settings)
            .with_ca_cert(ca)
            .build()
            .unwrap()
    };
    let key = BlobKey::parse("tls/probe.txt").unwrap();
    let store = https_store(&ca);
    store
        .put_bytes(&key, Bytes::from_static(b"over tls"))
        .await
        .unwrap();
    assert_eq!(
        store.get_bytes(&key).await.unwrap(),
        Bytes::from_static(b"over tls")
    );
    let refused = https_store(&other_ca).get_bytes(&key).await.unwrap_err();
    assert!(
        vtp_core::error_chain(&refused).contains("certificate"),
        "{}",
        vtp_core::error_chain(&refused)
    );

    // The backend and its trainer child on that https store.
    let mut env = s3.env_for(&blob_url);
    env.retain(|(name, _)| !matches!(*name, "VTP_S3_ENDPOINT" | "VTP_S3_ALLOW_HTTP"));
    env.extend([
        ("VTP_S3_ENDPOINT", s3_tls.url()),
        ("VTP_CA_CERT", ca.display().to_string()),
        ("VTP_DATABASE_URL", db.url().to_owned()),
        ("VTP_LAUNCHER", "subprocess".to_owned()),
        ("VTP_TRAINER_BIN", support::trainer_bin()),
        (
            "VTP_WORK_DIR",
            dir.path().join("trainer").display().to_string(),
        ),
        ("VTP_AUTH", "tokens".to_owned()),
    ]);
    let backend = ServiceProcess::start(&env).await;
    let api = TlsProxy::start(socket_of(&backend.url), &pki).await;
    let (ok, token, err) = run(
        env!("CARGO_BIN_EXE_vtp-backend"),
        &env,
        &["token", "create", "--user", "tls"],
    );
    assert!(ok, "{err}");

    // The CLI over https, trusting the CA by flag.
    let cli_env = [("VTP_URL", api.url()), ("VTP_TOKEN", token.clone())];
    let ca_flag = ca.display().to_string();
    let vtp = |args: &[&str]| {
        let mut all = vec!["--ca-cert", ca_flag.as_str()];
        all.extend_from_slice(args);
        run(&support::vtp_cli(), &cli_env, &all)
    };
    let archive = shapes_zip(dir.path());
    let (ok, dataset, err) = vtp(&["upload", &archive, "--name", "shapes"]);
    assert!(ok, "{err}");
    assert!(dataset.contains("/users/tls/datasets/shapes/"), "{dataset}");
    let config =
        r#"{"image_size": 16, "batch_size": 16, "threads": 1, "workers": 1, "hflip": false}"#;
    let (ok, out, err) = vtp(&[
        "train",
        "--dataset",
        &dataset,
        "--epochs",
        "2",
        "--config",
        config,
    ]);
    assert!(ok, "{out}\n{err}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("job "))
        .expect("the CLI names the job")
        .trim()
        .to_owned();

    // The trainer child stored its checkpoint through the https store, and
    // every epoch reached the backend.
    let http = reqwest::Client::builder()
        .tls_certs_merge(reqwest::Certificate::from_pem_bundle(pki.ca_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let get = |path: String| {
        let request = http.get(format!("{}{path}", api.url())).bearer_auth(&token);
        async move {
            request
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let job = get(format!("/training/jobs/{id}")).await;
    assert_eq!(job["status"], "completed", "{job}");
    let metrics = get(format!("/training/jobs/{id}/metrics")).await;
    assert_eq!(metrics.as_array().unwrap().len(), 2, "{metrics}");
    let model = dir.path().join("model");
    let (ok, _, err) = vtp(&["download", &id, "-o", &model.display().to_string()]);
    assert!(ok, "{err}");
    let weights = std::fs::read(model.join("best.safetensors")).unwrap();
    let uri = job["checkpoint_s3_uri"].as_str().unwrap();
    let stored_key = uri
        .strip_prefix(&format!("{blob_url}/"))
        .expect("the checkpoint is in the job's store");
    assert_eq!(
        store
            .get_bytes(&BlobKey::parse(stored_key).unwrap())
            .await
            .unwrap(),
        Bytes::from(weights),
        "the download is the stored checkpoint"
    );

    // Without the CA, or with another one, the CLI refuses the backend's
    // certificate: a clear error, nothing sent.
    let (ok, _, err) = run(&support::vtp_cli(), &cli_env, &["watch", &id]);
    assert!(!ok && err.contains("certificate"), "{err}");
    let wrong = other_ca.display().to_string();
    let (ok, _, err) = run(
        &support::vtp_cli(),
        &cli_env,
        &["--ca-cert", &wrong, "watch", &id],
    );
    assert!(!ok && err.contains("certificate"), "{err}");
    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "not a certificate").unwrap();
    let junk = junk.display().to_string();
    let (ok, _, err) = run(
        &support::vtp_cli(),
        &cli_env,
        &["--ca-cert", &junk, "watch", &id],
    );
    assert!(!ok && err.contains("--ca-cert"), "{err}");

    // A backend told to trust another CA cannot reach the store: an upload
    // is refused with a server error, never acknowledged and lost.
    backend.kill().await;
    let mut wrong_env = env.clone();
    wrong_env.retain(|(name, _)| *name != "VTP_CA_CERT");
    wrong_env.push(("VTP_CA_CERT", wrong.clone()));
    let misconfigured = ServiceProcess::start(&wrong_env).await;
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(std::fs::read(&archive).unwrap())
                .file_name("shapes.zip"),
        )
        .text("dataset_name", "unreachable");
    let answer = reqwest::Client::new()
        .post(misconfigured.at("/datasets/upload"))
        .bearer_auth(&token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert!(answer.status().is_server_error(), "{answer:?}");
    let body = answer.text().await.unwrap();
    assert!(
        !body.contains("certificate"),
        "the cause is logged, not sent: {body}"
    );
}
