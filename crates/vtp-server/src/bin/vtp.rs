//! `vtp`: a command-line client of the backend API.
//!
//! ```text
//! vtp upload digits.zip --user demo --name digits      # prints the dataset URI
//! vtp train --dataset <URI> --model small_cnn --epochs 8 --config '{"hflip": false}'
//! vtp watch <JOB>                                       # progress bar until it ends
//! vtp download <JOB> -o best.safetensors
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    name = "vtp",
    version,
    about = "VTP client: upload datasets, train, watch, download checkpoints"
)]
struct Cli {
    /// Backend base URL.
    #[arg(
        long,
        env = "VTP_URL",
        default_value = "http://127.0.0.1:8000",
        global = true
    )]
    url: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Uploads a dataset archive (zip, tar, tar.gz of an ImageFolder).
    Upload {
        /// The archive.
        file: PathBuf,
        /// Owner.
        #[arg(long, default_value = "demo")]
        user: String,
        /// Dataset name.
        #[arg(long)]
        name: String,
    },
    /// Creates a job, starts it and follows it to the end.
    Train {
        /// Dataset URI (from `vtp upload`).
        #[arg(long)]
        dataset: String,
        /// Architecture.
        #[arg(long, default_value = "small_cnn")]
        model: String,
        /// Epochs.
        #[arg(long, default_value_t = 5)]
        epochs: u32,
        /// More hyperparameters, as a JSON object.
        #[arg(long, default_value = "{}")]
        config: String,
        /// Owner.
        #[arg(long, default_value = "demo")]
        user: String,
    },
    /// Follows a job with a progress bar until it ends.
    Watch {
        /// Job id.
        job: String,
    },
    /// Downloads a job's checkpoint.
    Download {
        /// Job id.
        job: String,
        /// Output file.
        #[arg(short, long, default_value = "checkpoint.safetensors")]
        output: PathBuf,
    },
}

async fn check(response: reqwest::Response) -> anyhow::Result<Value> {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        let message = body["error"]["message"].as_str().unwrap_or("no message");
        bail!("{status}: {message}");
    }
    Ok(body)
}

async fn watch(http: &reqwest::Client, url: &str, job: &str) -> anyhow::Result<Value> {
    let bar = ProgressBar::new(1000);
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bar:40} {percent:>3}% {msg}")
            .expect("a valid template"),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    loop {
        let job: Value = check(
            http.get(format!("{url}/training/jobs/{job}"))
                .send()
                .await?,
        )
        .await?;
        let progress = job["progress"].as_f64().unwrap_or(0.0);
        bar.set_position((progress * 1000.0) as u64);
        let status = job["status"].as_str().unwrap_or("?").to_owned();
        bar.set_message(format!(
            "{status}: {}",
            job["message"].as_str().unwrap_or("")
        ));
        if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
            bar.finish();
            return Ok(job);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn summarise(http: &reqwest::Client, url: &str, job: &Value) -> anyhow::Result<()> {
    let id = job["id"].as_str().unwrap_or_default();
    let metrics = check(
        http.get(format!("{url}/training/jobs/{id}/metrics"))
            .send()
            .await?,
    )
    .await?;
    println!("\nepoch   loss     val_loss  val_acc   seconds  img/s");
    for row in metrics.as_array().into_iter().flatten() {
        println!(
            "{:>5}   {:<7.4}  {:<8.4}  {:>6.2}%   {:>7.1}  {:>6.0}",
            row["epoch"],
            row["loss"].as_f64().unwrap_or(f64::NAN),
            row["val_loss"].as_f64().unwrap_or(f64::NAN),
            row["val_accuracy"].as_f64().unwrap_or(f64::NAN) * 100.0,
            row["epoch_seconds"].as_f64().unwrap_or(f64::NAN),
            row["images_per_second"].as_f64().unwrap_or(f64::NAN)
        );
    }
    match job["status"].as_str() {
        Some("completed") => {
            let best = metrics
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r["val_accuracy"].as_f64())
                .fold(0.0, f64::max);
            println!(
                "\njob {id} completed: best val accuracy {:.2}%",
                best * 100.0
            );
            println!(
                "checkpoint: {}",
                job["checkpoint_s3_uri"].as_str().unwrap_or("?")
            );
            Ok(())
        }
        other => bail!(
            "job {id} ended {}: {}",
            other.unwrap_or("?"),
            job["error"]
                .as_str()
                .or(job["message"].as_str())
                .unwrap_or("")
        ),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let http = reqwest::Client::new();
    let url = cli.url.trim_end_matches('/');
    match cli.command {
        Command::Upload { file, user, name } => {
            let data = tokio::fs::read(&file)
                .await
                .with_context(|| format!("reading {}", file.display()))?;
            let file_name = file
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("dataset.zip")
                .to_owned();
            let form = reqwest::multipart::Form::new()
                .part(
                    "file",
                    reqwest::multipart::Part::bytes(data).file_name(file_name),
                )
                .text("user_id", user)
                .text("dataset_name", name);
            let body = check(
                http.post(format!("{url}/datasets/upload"))
                    .multipart(form)
                    .send()
                    .await?,
            )
            .await?;
            println!("{}", body["s3_uri"].as_str().unwrap_or_default());
        }
        Command::Train {
            dataset,
            model,
            epochs,
            config,
            user,
        } => {
            let mut config: Value =
                serde_json::from_str(&config).context("--config is not JSON")?;
            config["epochs"] = epochs.into();
            let body = json!({"user_id": user, "model_name": model, "framework": "tch", "dataset_s3_uri": dataset, "config": config});
            let job = check(
                http.post(format!("{url}/training/jobs"))
                    .json(&body)
                    .send()
                    .await?,
            )
            .await?;
            let id = job["id"].as_str().unwrap_or_default().to_owned();
            println!("job {id}");
            check(
                http.post(format!("{url}/training/jobs/{id}/start"))
                    .send()
                    .await?,
            )
            .await?;
            let job = watch(&http, url, &id).await?;
            summarise(&http, url, &job).await?;
        }
        Command::Watch { job } => {
            let job = watch(&http, url, &job).await?;
            summarise(&http, url, &job).await?;
        }
        Command::Download { job, output } => {
            let response = http
                .get(format!("{url}/training/jobs/{job}/checkpoint"))
                .send()
                .await?;
            if !response.status().is_success() {
                check(response).await?;
                unreachable!("check fails on an error status");
            }
            let bytes = response.bytes().await?;
            tokio::fs::write(&output, &bytes).await?;
            println!("{} bytes -> {}", bytes.len(), output.display());
        }
    }
    Ok(())
}
