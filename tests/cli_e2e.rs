//! The `vtp` CLI end to end, every subcommand against the real backend on
//! its embedded defaults (SQLite, local disk, the trainer as a child
//! process) with tokens on: upload, upload-code, create (idempotent with a
//! key), list, get, start, watch, metrics (table, CSV, JSON), download,
//! predict, cancel, delete and delete-dataset; and the one-line errors a
//! script sees when it asks for something that is not there.

mod support;

use serde_json::Value;
use support::{ServiceProcess, run_binary as run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_subcommand_against_the_embedded_backend() {
    let dir = tempfile::tempdir().unwrap();
    let env = vec![
        (
            "VTP_DATABASE_URL",
            format!("sqlite://{}", dir.path().join("vtp.db").display()),
        ),
        (
            "VTP_BLOB_URL",
            format!("file://{}", dir.path().join("blobs").display()),
        ),
        ("VTP_LAUNCHER", "subprocess".to_owned()),
        ("VTP_TRAINER_BIN", support::trainer_bin()),
        (
            "VTP_WORK_DIR",
            dir.path().join("trainer").display().to_string(),
        ),
        ("VTP_AUTH", "tokens".to_owned()),
        ("VTP_ALLOW_USER_CODE", "true".to_owned()),
    ];
    let backend = ServiceProcess::start(&env).await;
    let (ok, token, err) = run(
        env!("CARGO_BIN_EXE_vtp-backend"),
        &env,
        &["token", "create", "--user", "cli"],
    );
    assert!(ok, "{err}");
    let cli_env = [("VTP_URL", backend.url.clone()), ("VTP_TOKEN", token)];
    let vtp = |args: &[&str]| run(&support::vtp_cli(), &cli_env, args);
    let vtp_ok = |args: &[&str]| {
        let (ok, out, err) = vtp(args);
        assert!(ok, "vtp {args:?}: {out}\n{err}");
        out
    };
    let vtp_json = |args: &[&str]| -> Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = vtp_ok(&all);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("vtp {args:?}: {e}: {out}"))
    };
    // A failure is one line on stderr, `error: ...`, and exit status 1.
    let vtp_err = |args: &[&str]| {
        let (ok, out, err) = vtp(args);
        assert!(!ok, "vtp {args:?} succeeded: {out}");
        assert!(out.is_empty(), "vtp {args:?} printed {out:?}");
        assert!(err.starts_with("error: "), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        err
    };

    // Uploads print the URI, or all of the answer with --output json.
    vtp_trainer::testing::shapes_dataset(&dir.path().join("shapes"), 12, 5);
    let archive = dir.path().join("shapes.zip");
    vtp_trainer::testing::zip_dir(&dir.path().join("shapes"), &archive);
    let archive = archive.display().to_string();
    let dataset = vtp_ok(&["upload", &archive, "--name", "shapes"]);
    assert!(dataset.contains("/users/cli/datasets/shapes/"), "{dataset}");
    let again = vtp_json(&["upload", &archive, "--name", "shapes"]);
    assert_eq!(again["user_id"], "cli", "{again}");
    assert!(
        again["s3_uri"].as_str().unwrap().contains("shapes"),
        "{again}"
    );
    let err = vtp_err(&["upload", "/no/such/archive.zip", "--name", "gone"]);
    assert!(err.contains("/no/such/archive.zip"), "{err}");

    let code = dir.path().join("code");
    std::fs::create_dir_all(&code).unwrap();
    std::fs::write(code.join("train.py"), "import vtp\n").unwrap();
    let code_zip = dir.path().join("code.zip");
    vtp_trainer::testing::zip_dir(&code, &code_zip);
    let code_uri = vtp_ok(&[
        "upload-code",
        &code_zip.display().to_string(),
        "--name",
        "mine",
    ]);
    assert!(code_uri.contains("mine"), "{code_uri}");

    // Create prints the id; the same idempotency key makes no second job.
    let config =
        r#"{"image_size": 16, "batch_size": 16, "threads": 1, "workers": 1, "hflip": false}"#;
    let job_args = [
        "--dataset",
        dataset.as_str(),
        "--epochs",
        "2",
        "--config",
        config,
    ];
    let create = |key: &str| {
        let mut args = vec!["create", "--idempotency-key", key];
        args.extend_from_slice(&job_args);
        vtp_ok(&args)
    };
    let id = create("cli-create-1");
    assert_eq!(create("cli-create-1"), id, "the key's job again");
    let other = create("cli-create-2");
    assert_ne!(other, id);
    let err = vtp_err(&["create", "--dataset", &dataset, "--config", "[1]"]);
    assert!(err.contains("--config is not a JSON object"), "{err}");
    let err = vtp_err(&["create", "--dataset", &dataset, "--model", "no_such_net"]);
    assert!(err.contains("model_name"), "{err}");

    // Get, list (with its filters) on the pending jobs.
    let shown = vtp_ok(&["get", &id]);
    assert!(shown.contains(&format!("id          {id}")), "{shown}");
    assert!(shown.contains("status      pending"), "{shown}");
    assert!(shown.contains("owner       cli"), "{shown}");
    let job = vtp_json(&["get", &id]);
    assert_eq!(job["config"]["epochs"], 2, "{job}");
    let listed = vtp_ok(&["list", "--status", "pending"]);
    assert!(listed.contains(&id) && listed.contains(&other), "{listed}");
    assert!(listed.ends_with("2 of 2 jobs (offset 0)"), "{listed}");
    let page = vtp_json(&["list", "--limit", "1", "--offset", "1"]);
    assert_eq!(page["total"], 2, "{page}");
    assert_eq!(page["jobs"].as_array().unwrap().len(), 1, "{page}");
    // A usage error is clap's: exit status 2, the known statuses named.
    let (ok, _, err) = vtp(&["list", "--status", "sleeping"]);
    assert!(!ok && err.contains("not a status; one of pending"), "{err}");

    // Cancel the other one while it is pending.
    let cancelled = vtp_ok(&["cancel", &other]);
    assert_eq!(cancelled, format!("job {other} cancelled"));

    // Start, then watch to the end: a line per epoch and the outcome.
    let started = vtp_ok(&["start", &id]);
    assert!(started.starts_with(&format!("job {id} ")), "{started}");
    let watched = vtp_ok(&["watch", &id]);
    assert!(
        watched.contains(&format!("job {id} completed: best val accuracy")),
        "{watched}"
    );
    assert!(watched.contains("checkpoint: "), "{watched}");
    let err = vtp_err(&["start", &id]);
    assert!(err.contains("completed"), "{err}");

    // Metrics: a table, CSV with every metric, and the API's JSON.
    let table = vtp_ok(&["metrics", &id]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("epoch   loss"), "{table}");
    assert_eq!(lines.len(), 3, "a header and two epochs: {table}");
    let csv = vtp_ok(&["metrics", &id, "--format", "csv"]);
    let mut rows = csv.lines();
    let header: Vec<&str> = rows.next().unwrap().split(',').collect();
    assert_eq!(&header[..2], ["epoch", "recorded_at"], "{csv}");
    assert!(header.contains(&"val_accuracy"), "{csv}");
    let rows: Vec<Vec<&str>> = rows.map(|r| r.split(',').collect()).collect();
    assert_eq!(rows.len(), 2, "{csv}");
    assert!(rows.iter().all(|r| r.len() == header.len()), "{csv}");
    assert_eq!(rows[1][0], "2", "{csv}");
    let metrics = vtp_json(&["metrics", &id]);
    let accuracy = header.iter().position(|h| *h == "val_accuracy").unwrap();
    assert_eq!(
        rows[1][accuracy].parse::<f64>().unwrap(),
        metrics[1]["val_accuracy"].as_f64().unwrap(),
        "the CSV carries the values as recorded"
    );

    // Download the weights and their sidecar, and predict with them.
    let model = dir.path().join("model");
    let downloaded = vtp_json(&["download", &id, "-o", &model.display().to_string()]);
    let weights = downloaded["weights"].as_str().unwrap();
    assert!(std::path::Path::new(weights).is_file(), "{downloaded}");
    assert!(model.join("best.json").is_file(), "{downloaded}");
    let image = dir.path().join("shapes/disc/0.png").display().to_string();
    let predicted = vtp_ok(&["predict", weights, &image]);
    let fields: Vec<&str> = predicted.split('\t').collect();
    assert_eq!(fields.len(), 3, "{predicted}");
    assert_eq!(fields[0], image);
    assert!(
        ["disc", "square", "stripes"].contains(&fields[1]),
        "{predicted}"
    );
    let probability: f64 = fields[2].parse().unwrap();
    assert!((0.0..=1.0).contains(&probability), "{predicted}");

    // Deletes: the dataset, then the finished jobs; gone is an error after.
    assert_eq!(
        vtp_ok(&["delete-dataset", "shapes"]),
        "dataset shapes deleted"
    );
    let err = vtp_err(&["delete-dataset", "shapes"]);
    assert!(err.to_lowercase().contains("not found"), "{err}");
    assert_eq!(vtp_ok(&["delete", &id]), format!("job {id} deleted"));
    let deleted = vtp_json(&["delete", &other]);
    assert_eq!(deleted["deleted"], other.as_str(), "{deleted}");
    for args in [
        &["get", id.as_str()][..],
        &["metrics", &id],
        &["watch", &id],
    ] {
        let err = vtp_err(args);
        assert!(err.to_lowercase().contains("not found"), "{args:?}: {err}");
    }
    let listed = vtp_json(&["list"]);
    assert_eq!(listed["total"], 0, "{listed}");

    // Without the token, the backend refuses, and the CLI says so.
    let (ok, _, err) = run(
        &support::vtp_cli(),
        &[("VTP_URL", backend.url.clone())],
        &["list"],
    );
    assert!(!ok && err.starts_with("error: "), "{err}");
    backend.kill().await;
}
