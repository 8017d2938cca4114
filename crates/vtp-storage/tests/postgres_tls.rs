//! Postgres over TLS for real: a throwaway CA and server certificate (made
//! with `openssl`), a second Postgres cluster with `ssl=on` on a free port
//! (Debian's `initdb` and `postgres`, run as the `postgres` user), and the
//! job store connecting with `sslmode=verify-full`. A server certificate
//! from another CA is refused.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vtp_core::{JobStore, JobStoreExt, NewJob};
use vtp_storage::PostgresJobStore;
use vtp_storage::testing::services_required;

/// The Postgres server binaries of the machine.
fn pg_bin() -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path().join("bin"))
        .filter(|bin| bin.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop()
}

fn run(command: &mut Command) {
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a certificate for `localhost` / 127.0.0.1 signed by it.
fn certificates(dir: &Path, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = dir.join(format!("{name}-ca.key"));
    let ca = dir.join(format!("{name}-ca.pem"));
    let key = dir.join(format!("{name}-server.key"));
    let csr = dir.join(format!("{name}-server.csr"));
    let cert = dir.join(format!("{name}-server.crt"));
    let ext = dir.join(format!("{name}-ext.cnf"));
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .arg("-keyout")
        .arg(&ca_key)
        .arg("-out")
        .arg(&ca)
        .args(["-subj", &format!("/CN=vtp test CA {name}")]));
    run(Command::new("openssl")
        .args(["req", "-newkey", "rsa:2048", "-nodes"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .args(["-subj", "/CN=localhost"]));
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nsubjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-CAcreateserial"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-out")
        .arg(&cert)
        .arg("-extfile")
        .arg(&ext));
    (ca, cert, key)
}

struct Cluster {
    child: Child,
    port: u16,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a TLS-only cluster in `dir` as the `postgres` user.
fn start_cluster(dir: &Path, bin: &Path, cert: &Path, key: &Path) -> Cluster {
    let data = dir.join("data");
    let owner = |path: &Path| {
        run(Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(path))
    };
    owner(dir);
    run(Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join("initdb"))
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
        .arg(&data));
    for (from, to) in [(cert, "server.crt"), (key, "server.key")] {
        std::fs::copy(from, data.join(to)).unwrap();
    }
    owner(&data);
    run(Command::new("chmod")
        .arg("600")
        .arg(data.join("server.key")));
    // Only TLS connections from 127.0.0.1 are accepted.
    std::fs::write(
        data.join("pg_hba.conf"),
        "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    owner(&data);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new("runuser")
        .args(["-u", "postgres", "--"])
        .arg(bin.join("postgres"))
        .arg("-D")
        .arg(&data)
        .args([
            "-p",
            &port.to_string(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "ssl=on",
        ])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", dir.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cluster = Cluster { child, port };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the TLS cluster did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    cluster
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_job_store_speaks_verified_tls_and_refuses_a_wrong_ca() {
    let tools = pg_bin().filter(|_| {
        Command::new("openssl").arg("version").output().is_ok()
            && Command::new("runuser").arg("--help").output().is_ok()
            && std::env::var("USER").map_or(true, |u| u == "root")
    });
    let Some(bin) = tools else {
        assert!(
            !services_required(),
            "Postgres server binaries, openssl and runuser are required for the TLS test"
        );
        eprintln!("skipping: no Postgres server binaries, openssl or runuser");
        return;
    };
    let dir = tempfile::Builder::new()
        .prefix("vtp-pg-tls")
        .tempdir_in("/tmp")
        .unwrap();
    let (ca, cert, key) = certificates(dir.path(), "good");
    let (other_ca, _, _) = certificates(dir.path(), "other");
    let cluster = start_cluster(dir.path(), &bin, &cert, &key);

    let url = |host: &str, root: &Path| {
        format!(
            "postgres://postgres@{host}:{}/postgres?sslmode=verify-full&sslrootcert={}",
            cluster.port,
            root.display()
        )
    };
    let store = PostgresJobStore::connect(&url("localhost", &ca))
        .await
        .unwrap();
    let job = store
        .create_job(NewJob {
            user_id: "alice".into(),
            model_name: "small_cnn".into(),
            framework: "tch".into(),
            dataset_s3_uri: "s3://b/users/alice/datasets/d/".into(),
            config: serde_json::json!({}),
            priority: 0,
        })
        .await
        .unwrap();
    assert_eq!(store.get(job.id).await.unwrap(), job);
    // The session really is encrypted.
    let pool = sqlx::PgPool::connect(&url("127.0.0.1", &ca)).await.unwrap();
    let ssl: bool = sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(ssl);
    pool.close().await;

    // A certificate this CA did not sign is refused, and so is plaintext.
    let err = PostgresJobStore::connect(&url("localhost", &other_ca))
        .await
        .unwrap_err();
    assert!(
        matches!(err, vtp_core::Error::Unavailable { .. }),
        "{err:?}"
    );
    let plain = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        cluster.port
    );
    assert!(PostgresJobStore::connect(&plain).await.is_err());
    drop(cluster);
}
