//! `vtp`: the command-line client of the VTP backend, on the typed client
//! of `vtp-client`.
//!
//! ```text
//! vtp upload digits.zip --name digits                  # prints the dataset URI
//! vtp train --dataset <URI> --model small_cnn --epochs 8 --config '{"hflip": false}'
//! vtp create --dataset <URI> --model yolo11n --framework ultralytics   # prints the job id
//! vtp start <JOB>; vtp watch <JOB>                     # progress bar until it ends
//! vtp list --status running; vtp get <JOB>; vtp metrics <JOB> --format csv
//! vtp download <JOB> -o model/                         # weights and sidecar
//! vtp cancel <JOB>
//! vtp --output json get <JOB>                          # any command, for scripts
//! vtp completions bash > /etc/bash_completion.d/vtp
//! vtp predict model/best.safetensors img.png --draw boxes.png   # with the `torch` feature
//! ```
//!
//! A failure prints one line, `error: ...`, on stderr and exits with 1
//! (2 for a usage error).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use vtp_client::{Client, ListJobs};
use vtp_core::api::EpochMetrics;
use vtp_core::{Job, JobId, JobStatus, NewJob};

#[derive(Debug, Parser)]
#[command(
    name = "vtp",
    version,
    about = "VTP client: upload datasets, create and start training jobs, watch them, read metrics, download checkpoints"
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
    /// `text` for people, `json` (the API's own JSON) for scripts.
    #[arg(long, value_enum, default_value = "text", global = true)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum TableFormat {
    Table,
    Csv,
}

/// What a job is made of, for `create` and `train`.
#[derive(Debug, clap::Args)]
struct JobArgs {
    /// Dataset URI (from `vtp upload`).
    #[arg(long)]
    dataset: String,
    /// Architecture: `small_cnn`, `resnet18`, `resnet34`, `mobilenet_v2`,
    /// `yolov8n`, `yolov8s`, `yolo11n`, `yolo11s`.
    #[arg(long, default_value = "small_cnn")]
    model: String,
    /// Epochs (sets `config.epochs`).
    #[arg(long)]
    epochs: Option<u32>,
    /// More hyperparameters, as a JSON object (checked by the backend; see
    /// `TrainConfig` in its OpenAPI document).
    #[arg(long, default_value = "{}")]
    config: String,
    /// Owner; with a token, the token's user (the default).
    #[arg(long)]
    user: Option<String>,
    /// The job's framework: `tch`, `ultralytics` for the YOLO family (the
    /// seed's job), or `python` for your own script (its `--config` names
    /// `code_s3_uri` from `vtp upload-code` and `entrypoint`).
    #[arg(long, default_value = "tch")]
    framework: String,
    /// Its place in the queue: higher runs first (-100 to 100; above the
    /// backend's limit for users only with an admin token).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    priority: i32,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Uploads a dataset archive (zip, tar, tar.gz of an ImageFolder or a
    /// YOLO dataset); prints its URI.
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
    /// Uploads a code archive (zip, tar, tar.gz holding a training script)
    /// for `--framework python` jobs; prints its URI, their
    /// `config.code_s3_uri`.
    UploadCode {
        /// The archive.
        file: PathBuf,
        /// Owner; with a token, the token's user (the default).
        #[arg(long)]
        user: Option<String>,
        /// The code's name.
        #[arg(long)]
        name: String,
    },
    /// Creates a job (`pending`); prints its id.
    Create {
        #[command(flatten)]
        job: JobArgs,
        /// Makes the create safe to repeat: the same key and request again
        /// answer with the job it made.
        #[arg(long)]
        idempotency_key: Option<String>,
    },
    /// Starts a pending job.
    Start {
        /// Job id.
        job: JobId,
    },
    /// Creates a job, starts it and follows it to the end.
    Train {
        #[command(flatten)]
        job: JobArgs,
    },
    /// Lists jobs, newest first.
    List {
        /// Only this user's (an admin's token sees everyone's).
        #[arg(long)]
        user: Option<String>,
        /// Only jobs in this status.
        #[arg(long, value_parser = parse_status)]
        status: Option<JobStatus>,
        /// Page size.
        #[arg(long)]
        limit: Option<u32>,
        /// Jobs to skip.
        #[arg(long)]
        offset: Option<u32>,
    },
    /// Shows one job.
    Get {
        /// Job id.
        job: JobId,
    },
    /// Follows a job with a progress bar until it ends.
    Watch {
        /// Job id.
        job: JobId,
    },
    /// A job's per-epoch metrics, as a table or CSV.
    Metrics {
        /// Job id.
        job: JobId,
        /// `table` or `csv` (with `--output text`).
        #[arg(long, value_enum, default_value = "table")]
        format: TableFormat,
    },
    /// Downloads a job's checkpoint: its weights and their sidecar, under
    /// their own names (`best.safetensors`, `best.json`).
    Download {
        /// Job id.
        job: JobId,
        /// Output directory.
        #[arg(short = 'o', long = "dir", default_value = ".")]
        dir: PathBuf,
    },
    /// Cancels a job.
    Cancel {
        /// Job id.
        job: JobId,
    },
    /// Deletes a finished job with its checkpoints, metrics and events.
    Delete {
        /// Job id.
        job: JobId,
    },
    /// Deletes a dataset (refused while a job under way uses it).
    DeleteDataset {
        /// Dataset name.
        name: String,
        /// Owner; with a token, the token's user (the default).
        #[arg(long)]
        user: Option<String>,
    },
    /// Prints a shell completion script.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
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

fn parse_status(s: &str) -> Result<JobStatus, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
        let known: Vec<String> = JobStatus::ALL.iter().map(ToString::to_string).collect();
        format!("not a status; one of {}", known.join(", "))
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

/// Prints `value` as pretty JSON on stdout.
/// Prints an upload's answer: its URI, or with `--json` all of it.
fn print_uploaded<T: serde::Serialize>(
    file: &Path,
    uploaded: vtp_core::Result<T>,
    uri: impl Fn(&T) -> &String,
    json: bool,
) -> anyhow::Result<()> {
    let answer = uploaded.with_context(|| format!("uploading {}", file.display()))?;
    if json {
        print_json(&answer)?;
    } else {
        println!("{}", uri(&answer));
    }
    Ok(())
}

fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

fn client(url: &str, token: Option<&str>, ca_cert: Option<&Path>) -> anyhow::Result<Client> {
    let mut builder = Client::builder(url);
    if let Some(token) = token {
        builder = builder.token(token);
    }
    if let Some(path) = ca_cert {
        // Checked here, so a bad file is named by its flag.
        vtp_core::tls::read_ca_bundle("--ca-cert", path)?;
        builder = builder.ca_cert(path);
    }
    Ok(builder.build()?)
}

/// A new job from the flags; without a token the backend has no user to
/// take, so one is named.
fn new_job(args: JobArgs, token: bool) -> anyhow::Result<NewJob> {
    let mut config: serde_json::Value =
        serde_json::from_str(&args.config).context("--config is not JSON")?;
    if !config.is_object() {
        bail!("--config is not a JSON object");
    }
    if let Some(epochs) = args.epochs {
        config["epochs"] = epochs.into();
    }
    Ok(NewJob {
        user_id: owner(args.user, token).unwrap_or_default(),
        model_name: args.model,
        framework: args.framework,
        dataset_s3_uri: args.dataset,
        config,
        priority: args.priority,
    })
}

/// The owner to name: the flag, else (without a token) `demo`.
fn owner(user: Option<String>, token: bool) -> Option<String> {
    match (user, token) {
        (Some(user), _) => Some(user),
        (None, false) => Some("demo".to_owned()),
        (None, true) => None,
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let Cli {
        url,
        token,
        ca_cert,
        output,
        command,
    } = cli;
    let json = output == Output::Json;
    let command = match command {
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "vtp", &mut std::io::stdout());
            return Ok(());
        }
        #[cfg(feature = "torch")]
        Command::Predict {
            checkpoint,
            images,
            conf,
            iou,
            draw,
        } => return predict(&checkpoint, &images, conf, iou, draw.as_deref()),
        command => command,
    };
    let client = client(&url, token.as_deref(), ca_cert.as_deref())?;
    let token = token.is_some();
    match command {
        Command::Upload { file, user, name } => {
            let owner = owner(user, token);
            let uploaded = client.upload_dataset(&file, &name, owner.as_deref()).await;
            print_uploaded(&file, uploaded, |u| &u.s3_uri, json)?;
        }
        Command::UploadCode { file, user, name } => {
            let owner = owner(user, token);
            let uploaded = client.upload_code(&file, &name, owner.as_deref()).await;
            print_uploaded(&file, uploaded, |u| &u.s3_uri, json)?;
        }
        Command::Create {
            job,
            idempotency_key,
        } => {
            let new = new_job(job, token)?;
            let job = match &idempotency_key {
                Some(key) => client.create_job_with_key(&new, key).await?,
                None => client.create_job(&new).await?,
            };
            if json {
                print_json(&job)?;
            } else {
                println!("{}", job.id);
            }
        }
        Command::Start { job } => {
            let started = client.start_job(job).await?;
            if json {
                print_json(&started)?;
            } else {
                println!("job {} {}", started.job.id, started.job.status);
            }
        }
        Command::Train { job } => {
            let new = new_job(job, token)?;
            let job = client.create_job(&new).await?;
            if !json {
                println!("job {}", job.id);
            }
            client.start_job(job.id).await?;
            finish(&client, job.id, json).await?;
        }
        Command::List {
            user,
            status,
            limit,
            offset,
        } => {
            let page = client
                .list_jobs(&ListJobs {
                    user_id: user,
                    status,
                    limit,
                    offset,
                })
                .await?;
            if json {
                print_json(&page)?;
            } else {
                println!(
                    "{:<36}  {:<10}  {:<13}  {:>5}  created",
                    "id", "status", "model", "done"
                );
                for job in &page.jobs {
                    println!(
                        "{:<36}  {:<10}  {:<13}  {:>4.0}%  {}",
                        job.id.to_string(),
                        status_of(job),
                        job.model_name,
                        100.0 * job.progress,
                        job.created_at.format("%Y-%m-%d %H:%M:%S")
                    );
                }
                println!(
                    "{} of {} jobs (offset {})",
                    page.jobs.len(),
                    page.total,
                    page.offset
                );
            }
        }
        Command::Get { job } => {
            let job = client.job(job).await?;
            if json {
                print_json(&job)?;
            } else {
                describe(&job);
            }
        }
        Command::Watch { job } => finish(&client, job, json).await?,
        Command::Metrics { job, format } => {
            let rows = client.metrics(job).await?;
            if json {
                print_json(&rows)?;
            } else {
                match format {
                    TableFormat::Table => table(&rows),
                    TableFormat::Csv => csv(&rows),
                }
            }
        }
        Command::Download { job, dir } => {
            let weights = client.download_model(job, &dir).await?;
            let sidecar = weights.with_extension("json");
            if json {
                print_json(&serde_json::json!({"weights": weights, "sidecar": sidecar}))?;
            } else {
                for path in [&weights, &sidecar] {
                    let size = std::fs::metadata(path).map_or(0, |m| m.len());
                    println!("{size} bytes -> {}", path.display());
                }
            }
        }
        Command::Cancel { job } => {
            let job = client.cancel_job(job).await?;
            if json {
                print_json(&job)?;
            } else {
                println!("job {} {}", job.id, job.status);
            }
        }
        Command::Delete { job } => {
            client.delete_job(job).await?;
            if json {
                print_json(&serde_json::json!({"deleted": job}))?;
            } else {
                println!("job {job} deleted");
            }
        }
        Command::DeleteDataset { name, user } => {
            let user = owner(user, token);
            client.delete_dataset(&name, user.as_deref()).await?;
            if json {
                print_json(
                    &serde_json::json!({"deleted": {"user_id": user, "dataset_name": name}}),
                )?;
            } else {
                println!("dataset {name} deleted");
            }
        }
        Command::Completions { .. } => unreachable!("handled above"),
        #[cfg(feature = "torch")]
        Command::Predict { .. } => unreachable!("handled above"),
    }
    Ok(())
}

/// Follows the job's event stream to its end (in text, a progress bar and a
/// line per epoch as it finishes), then prints its metrics and outcome (one
/// JSON document with `--output json`); a job that did not complete is an
/// error.
async fn finish(client: &Client, id: JobId, json: bool) -> anyhow::Result<()> {
    use futures::StreamExt;
    let mut events = client.events(id, -1);
    let bar = (!json).then(|| {
        let bar = ProgressBar::new(1000);
        bar.set_style(
            ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bar:40} {percent:>3}% {msg}",
            )
            .expect("a valid template"),
        );
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    });
    let mut last = None;
    while let Some(event) = events.next().await {
        let event = event?;
        let job = &event.job;
        if let Some(bar) = &bar {
            bar.set_position((job.progress * 1000.0) as u64);
            bar.set_message(format!(
                "{}: {}",
                job.status,
                job.message.as_deref().unwrap_or("")
            ));
            if let Some(epoch) = &event.metrics {
                let values: Vec<String> = epoch
                    .values
                    .iter()
                    .map(|(name, value)| format!("{name} {value:.4}"))
                    .collect();
                bar.println(format!("epoch {}: {}", epoch.epoch, values.join(", ")));
            }
        }
        last = Some(event.job);
    }
    if let Some(bar) = &bar {
        bar.finish();
    }
    let job = match last {
        Some(job) if job.status.is_terminal() => job,
        _ => client.job(id).await?,
    };
    let rows = client.metrics(id).await?;
    if json {
        print_json(&serde_json::json!({"job": job, "metrics": rows}))?;
    } else {
        println!();
        table(&rows);
    }
    if job.status != JobStatus::Completed {
        bail!(
            "job {id} ended {}: {}",
            job.status,
            job.error
                .as_deref()
                .or(job.message.as_deref())
                .unwrap_or("")
        );
    }
    if !json {
        let best = |key: &str| {
            rows.iter()
                .filter_map(|r| r.values.get(key).copied())
                .fold(0.0, f64::max)
        };
        if is_detector(&rows) {
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
            job.checkpoint_s3_uri.as_deref().unwrap_or("?")
        );
    }
    Ok(())
}

fn is_detector(rows: &[EpochMetrics]) -> bool {
    rows.iter().any(|r| r.values.contains_key("map"))
}

/// The metrics as the demo prints them.
fn table(rows: &[EpochMetrics]) {
    let num = |row: &EpochMetrics, key: &str| row.values.get(key).copied().unwrap_or(f64::NAN);
    if is_detector(rows) {
        println!("epoch   loss     val_loss  P       R       mAP50   mAP50-95  seconds  img/s");
        for row in rows {
            println!(
                "{:>5}   {:<7.4}  {:<8.4}  {:<6.4}  {:<6.4}  {:<6.4}  {:<8.4}  {:>7.1}  {:>6.0}",
                row.epoch,
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
        println!("epoch   loss     val_loss  val_acc   seconds  img/s");
        for row in rows {
            println!(
                "{:>5}   {:<7.4}  {:<8.4}  {:>6.2}%   {:>7.1}  {:>6.0}",
                row.epoch,
                num(row, "loss"),
                num(row, "val_loss"),
                num(row, "val_accuracy") * 100.0,
                num(row, "epoch_seconds"),
                num(row, "images_per_second")
            );
        }
    }
}

/// Every metric of every epoch as CSV: `epoch,recorded_at,<names...>`.
fn csv(rows: &[EpochMetrics]) {
    let mut names: Vec<&String> = rows.iter().flat_map(|r| r.values.keys()).collect();
    names.sort();
    names.dedup();
    let header: Vec<&str> = names.iter().map(|n| n.as_str()).collect();
    println!("epoch,recorded_at,{}", header.join(","));
    for row in rows {
        let values: Vec<String> = names
            .iter()
            .map(|n| row.values.get(*n).map(f64::to_string).unwrap_or_default())
            .collect();
        println!(
            "{},{},{}",
            row.epoch,
            row.recorded_at.to_rfc3339(),
            values.join(",")
        );
    }
}

/// A job's status, with its place in the queue while it waits
/// (`queued #3`).
fn status_of(job: &Job) -> String {
    match job.queue_position {
        Some(place) => format!("{} #{place}", job.status),
        None => job.status.to_string(),
    }
}

/// A job for people.
fn describe(job: &Job) {
    println!("id          {}", job.id);
    println!("status      {}", status_of(job));
    if let Some(place) = job.queue_position {
        println!("queue       place {place}: waits for a free slot");
    }
    println!("priority    {}", job.priority);
    println!("progress    {:.0}%", 100.0 * job.progress);
    println!("owner       {}", job.user_id);
    println!("model       {} ({})", job.model_name, job.framework);
    println!("dataset     {}", job.dataset_s3_uri);
    println!("config      {}", job.config);
    println!("attempt     {}", job.attempt);
    if let Some(message) = &job.message {
        println!("message     {message}");
    }
    if let Some(error) = &job.error {
        println!("error       {error}");
    }
    if let Some(uri) = &job.checkpoint_s3_uri {
        println!("checkpoint  {uri}");
    }
    if let Some(report) = &job.per_class {
        println!("per class   {}", per_class_line(report));
    }
    println!("created     {}", job.created_at.to_rfc3339());
    if let Some(at) = job.finished_at {
        println!("finished    {}", at.to_rfc3339());
    }
}

/// `accuracy: cat 0.91, dog 0.88, bird -` (a class without validation images: `-`).
fn per_class_line(report: &vtp_core::ClassReport) -> String {
    let values: Vec<String> = report
        .classes
        .iter()
        .zip(&report.values)
        .map(|(class, value)| match value {
            Some(value) => format!("{class} {value:.3}"),
            None => format!("{class} -"),
        })
        .collect();
    format!("{}: {}", report.metric, values.join(", "))
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
