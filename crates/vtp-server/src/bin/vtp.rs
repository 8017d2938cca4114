//! `vtp`: a command-line client of the backend API.
//!
//! ```text
//! vtp upload digits.zip --user demo --name digits      # prints the dataset URI
//! vtp train --dataset <URI> --model small_cnn --epochs 8 --config '{"hflip": false}'
//! vtp watch <JOB>                                       # progress bar until it ends
//! vtp download <JOB> -o model/                        # weights and sidecar
//! vtp predict model/best.safetensors img.png --draw boxes.png   # with the `torch` feature
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
    /// API token, sent as `Authorization: Bearer` (a backend with
    /// `VTP_AUTH=tokens` needs one; make it with `vtp-backend token create`).
    #[arg(long, env = "VTP_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// A PEM bundle of CAs to trust besides the system's, for an https
    /// backend whose certificate a private CA signed.
    #[arg(long, env = "VTP_CA_CERT", global = true)]
    ca_cert: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Uploads a dataset archive (zip, tar, tar.gz of an ImageFolder).
    Upload {
        /// The archive.
        file: PathBuf,
        /// Owner; with a token, the token's user (the default).
        #[arg(long)]
        user: Option<String>,
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
        /// Owner; with a token, the token's user (the default).
        #[arg(long)]
        user: Option<String>,
        /// The job's framework: `tch`, or `ultralytics` for the YOLO family
        /// (the seed's job).
        #[arg(long, default_value = "tch")]
        framework: String,
    },
    /// Follows a job with a progress bar until it ends.
    Watch {
        /// Job id.
        job: String,
    },
    /// Downloads a job's checkpoint: its weights and their sidecar, under
    /// their own names (`best.safetensors`, `best.json`).
    Download {
        /// Job id.
        job: String,
        /// Output directory.
        #[arg(short, long, default_value = ".")]
        output: PathBuf,
    },
    /// Predicts with a downloaded checkpoint: each image's class, or a
    /// detector's boxes (in the image's pixels).
    #[cfg(feature = "torch")]
    Predict {
        /// The checkpoint (weights, sidecar or directory).
        checkpoint: PathBuf,
        /// Images.
        #[arg(required = true)]
        images: Vec<PathBuf>,
        /// Detection: smallest score kept.
        #[arg(long, default_value_t = 0.25)]
        conf: f32,
        /// Detection: NMS IoU threshold.
        #[arg(long, default_value_t = 0.7)]
        iou: f32,
        /// Detection: writes the images side by side with their boxes
        /// drawn, as a PNG.
        #[arg(long)]
        draw: Option<PathBuf>,
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
    let rows: Vec<&Value> = metrics.as_array().into_iter().flatten().collect();
    let detector = rows.iter().any(|r| r.get("map").is_some());
    let num = |row: &Value, key: &str| row[key].as_f64().unwrap_or(f64::NAN);
    if detector {
        println!("\nepoch   loss     val_loss  P       R       mAP50   mAP50-95  seconds  img/s");
        for row in &rows {
            println!(
                "{:>5}   {:<7.4}  {:<8.4}  {:<6.4}  {:<6.4}  {:<6.4}  {:<8.4}  {:>7.1}  {:>6.0}",
                row["epoch"],
                num(row, "loss"),
                num(row, "val_loss"),
                num(row, "precision"),
                num(row, "recall"),
                num(row, "map50"),
                num(row, "map"),
                num(row, "epoch_seconds"),
                num(row, "images_per_second")
            );
        }
    } else {
        println!("\nepoch   loss     val_loss  val_acc   seconds  img/s");
        for row in &rows {
            println!(
                "{:>5}   {:<7.4}  {:<8.4}  {:>6.2}%   {:>7.1}  {:>6.0}",
                row["epoch"],
                num(row, "loss"),
                num(row, "val_loss"),
                num(row, "val_accuracy") * 100.0,
                num(row, "epoch_seconds"),
                num(row, "images_per_second")
            );
        }
    }
    match job["status"].as_str() {
        Some("completed") => {
            let best = |key: &str| {
                rows.iter()
                    .filter_map(|r| r[key].as_f64())
                    .fold(0.0, f64::max)
            };
            if detector {
                println!(
                    "\njob {id} completed: best val mAP50-95 {:.4} (mAP50 {:.4})",
                    best("map"),
                    best("map50")
                );
            } else {
                println!(
                    "\njob {id} completed: best val accuracy {:.2}%",
                    best("val_accuracy") * 100.0
                );
            }
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
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = &cli.token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("the token is not a valid header value")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let mut builder = reqwest::Client::builder().default_headers(headers);
    if let Some(path) = &cli.ca_cert {
        builder = vtp_trainer::tls::trust_ca_file(builder, "--ca-cert", path)?;
    }
    let http = builder.build()?;
    let url = cli.url.trim_end_matches('/');
    // Without a token the backend has no user to take: name one.
    let owner = |user: Option<String>| match (user, &cli.token) {
        (Some(user), _) => Some(user),
        (None, None) => Some("demo".to_owned()),
        (None, Some(_)) => None,
    };
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
            let mut form = reqwest::multipart::Form::new().part(
                "file",
                reqwest::multipart::Part::bytes(data).file_name(file_name),
            );
            if let Some(user) = owner(user) {
                form = form.text("user_id", user);
            }
            let form = form.text("dataset_name", name);
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
            framework,
        } => {
            let mut config: Value =
                serde_json::from_str(&config).context("--config is not JSON")?;
            config["epochs"] = epochs.into();
            let mut body = json!({"model_name": model, "framework": framework, "dataset_s3_uri": dataset, "config": config});
            if let Some(user) = owner(user) {
                body["user_id"] = user.into();
            }
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
            let record = check(
                http.get(format!("{url}/training/jobs/{job}"))
                    .send()
                    .await?,
            )
            .await?;
            let Some(uri) = record["checkpoint_s3_uri"].as_str() else {
                bail!(
                    "job {job} has no checkpoint yet (status {})",
                    record["status"]
                );
            };
            let weights = uri.rsplit('/').next().unwrap_or("best.safetensors");
            let stem = weights.strip_suffix(".safetensors").unwrap_or(weights);
            tokio::fs::create_dir_all(&output)
                .await
                .with_context(|| format!("creating {}", output.display()))?;
            for (route, name) in [
                (
                    format!("{url}/training/jobs/{job}/checkpoint"),
                    weights.to_owned(),
                ),
                (
                    format!("{url}/training/jobs/{job}/checkpoint/{stem}.json"),
                    format!("{stem}.json"),
                ),
            ] {
                let response = http.get(route).send().await?;
                if !response.status().is_success() {
                    check(response).await?;
                    unreachable!("check fails on an error status");
                }
                let bytes = response.bytes().await?;
                let path = output.join(&name);
                tokio::fs::write(&path, &bytes).await?;
                println!("{} bytes -> {}", bytes.len(), path.display());
            }
        }
        #[cfg(feature = "torch")]
        Command::Predict {
            checkpoint,
            images,
            conf,
            iou,
            draw,
        } => predict(&checkpoint, &images, conf, iou, draw.as_deref())?,
    }
    Ok(())
}

#[cfg(feature = "torch")]
fn predict(
    checkpoint: &std::path::Path,
    images: &[PathBuf],
    conf: f32,
    iou: f32,
    draw: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use vtp_trainer::engine::{DetectOptions, Predictor};
    let predictor = Predictor::load(checkpoint)?;
    if predictor.task() == vtp_core::Task::Classify {
        for (path, p) in images.iter().zip(predictor.predict_paths(images)?) {
            println!("{}\t{}\t{:.4}", path.display(), p.class, p.probability);
        }
        return Ok(());
    }
    let options = DetectOptions {
        conf,
        iou,
        ..DetectOptions::default()
    };
    let found = predictor.detect_paths(images, &options)?;
    for (path, boxes) in images.iter().zip(&found) {
        for b in boxes {
            println!(
                "{}\t{}\t{:.4}\t{:.1}\t{:.1}\t{:.1}\t{:.1}",
                path.display(),
                b.class,
                b.score,
                b.bbox[0],
                b.bbox[1],
                b.bbox[2],
                b.bbox[3]
            );
        }
    }
    if let Some(out) = draw {
        let decoded = images
            .iter()
            .map(|p| vtp_trainer::data::loader::open_image(p))
            .collect::<vtp_core::Result<Vec<_>>>()?;
        let sheet = vtp_trainer::engine::detect::draw::contact_sheet(&decoded, &found);
        sheet
            .save(out)
            .with_context(|| format!("writing {}", out.display()))?;
        println!("drawn: {}", out.display());
    }
    Ok(())
}
