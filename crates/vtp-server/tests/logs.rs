//! `VTP_LOG_FORMAT=json`: the real backend binary logs one JSON object per
//! line, and every line about a request carries its `request_id`, every
//! line about a job its `job_id`.

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};

#[tokio::test]
async fn json_logs_carry_the_request_and_job_ids() {
    let dir = tempfile::tempdir().unwrap();
    let blobs = format!("file://{}", dir.path().join("blobs").display());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_vtp-backend"))
        .args(["--listen", "127.0.0.1:0", "--database-url", "memory://"])
        .args(["--blob-url", &blobs])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("VTP_LOG_FORMAT", "json")
        .env("VTP_LOG", "info,tower_http=debug")
        .current_dir(dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
    let url = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let line = stdout
                .next_line()
                .await
                .unwrap()
                .expect("the backend listens");
            if let Some(url) = line.strip_prefix("vtp-backend listening on ") {
                return url.trim().to_owned();
            }
        }
    })
    .await
    .unwrap();

    let http = reqwest::Client::new();
    let job: Value = http
        .post(format!("{url}/training/jobs"))
        .json(
            &json!({"user_id": "alice", "model_name": "small_cnn", "framework": "tch",
                      "dataset_s3_uri": format!("{blobs}/users/alice/datasets/d/d.zip")}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = job["id"].as_str().expect("a job").to_owned();
    let read = http
        .get(format!("{url}/training/jobs/{id}"))
        .header("x-request-id", "req-json-logs")
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), 200);
    child.start_kill().unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .await
        .unwrap();

    let lines: Vec<Value> = stderr
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"))
        })
        .collect();
    assert!(lines.len() >= 4, "{stderr}");
    for line in &lines {
        assert!(
            line["timestamp"].is_string() && line["level"].is_string(),
            "{line}"
        );
    }
    let span_field = |line: &Value, name: &str| -> Option<String> {
        line["spans"]
            .as_array()?
            .iter()
            .find_map(|span| span[name].as_str().map(str::to_owned))
    };
    let about_read: Vec<&Value> = lines
        .iter()
        .filter(|line| span_field(line, "request_id").as_deref() == Some("req-json-logs"))
        .collect();
    assert!(
        !about_read.is_empty(),
        "no line carries the request id:\n{stderr}"
    );
    for line in about_read {
        assert_eq!(
            span_field(line, "job_id").as_deref(),
            Some(id.as_str()),
            "{line}"
        );
    }
    // The create's lines carry their own request id, and no job id (the
    // job did not exist when the request came in).
    let create = lines
        .iter()
        .find(|line| {
            line["spans"].as_array().is_some_and(|spans| {
                spans
                    .iter()
                    .any(|s| s["uri"] == "/training/jobs" && s["method"] == "POST")
            })
        })
        .unwrap_or_else(|| panic!("no line about the create:\n{stderr}"));
    assert!(span_field(create, "request_id").is_some_and(|id| !id.is_empty()));
    println!(
        "a JSON log line about the job:\n{}",
        serde_json::to_string(about_read_first(&lines, &id)).unwrap()
    );
}

fn about_read_first<'a>(lines: &'a [Value], id: &str) -> &'a Value {
    lines
        .iter()
        .find(|line| line.to_string().contains(id))
        .expect("a line names the job")
}
