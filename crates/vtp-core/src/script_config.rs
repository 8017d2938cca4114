//! The `config` of a `python` job ([`crate::Framework::Python`]): the
//! user's own training script, from a code archive uploaded with
//! `POST /code/upload`.
//!
//! ```json
//! {"code_s3_uri": "s3://vtp/users/alice/code/digits/train.zip",
//!  "entrypoint": "train.py", "args": ["--lr", "0.01"], "epochs": 10}
//! ```
//!
//! The keys below are VTP's; any other key is the script's own
//! hyperparameter, handed to it whole as `run.config`. Lives here, below
//! every crate, so the backend refuses a bad config at create (a 422 naming
//! the field) and the trainer reads the very same type.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a `python` job runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ScriptConfig {
    /// The code archive (`.zip`, `.tar`, `.tar.gz`) as uploaded by
    /// `POST /code/upload`: one of the job owner's objects.
    pub code_s3_uri: String,
    /// The script to run, a relative path inside the archive
    /// (`train.py`, `src/train.py`).
    pub entrypoint: String,
    /// Its command-line arguments (at most [`ScriptConfig::MAX_ARGS`], each
    /// at most [`ScriptConfig::MAX_ARG_LEN`] bytes). Never a secret: they
    /// are stored with the job.
    #[serde(default)]
    pub args: Vec<String>,
    /// Epochs the script trains (`run.epochs`); progress is reported
    /// against it.
    #[serde(default = "default_epochs")]
    pub epochs: u32,
    /// The longest the script may go without a report, a step or a saved
    /// checkpoint before its attempt ends as hung (seconds, 1 to 86,400;
    /// the trainer's own setting when left out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_timeout_secs: Option<u64>,
    /// How many times the platform launches the job in all (read by the
    /// backend, as for any job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i32>,
    /// The image the script runs in on Kubernetes: the trainer's when left
    /// out; another only where the launcher allow-lists it
    /// (`VTP_K8S_SCRIPT_IMAGES`), checked when the job is created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Runs the entrypoint under `torchrun` (PyTorch's own launcher, c10d
    /// rendezvous), one process per rank; left out, one plain process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distributed: Option<Distributed>,
}

/// `config.distributed`: how many processes train together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Distributed {
    /// Processes on each machine (`torchrun --nproc-per-node`), 1 to
    /// [`Distributed::MAX_NPROC_PER_NODE`]: one per GPU, or CPU processes
    /// on gloo.
    #[serde(default = "one")]
    pub nproc_per_node: u32,
    /// Machines (`torchrun --nnodes`), 1 to [`Distributed::MAX_NNODES`].
    /// More than one needs a launcher that starts one trainer per machine
    /// (Kubernetes: an Indexed Job with a pod per machine and a headless
    /// Service for the rendezvous); the others refuse it at create.
    #[serde(default = "one")]
    pub nnodes: u32,
}

fn one() -> u32 {
    1
}

impl Distributed {
    /// Most processes on one machine.
    pub const MAX_NPROC_PER_NODE: u32 = 16;
    /// Most machines.
    pub const MAX_NNODES: u32 = 16;

    /// The `nnodes` a job's `config` asks for (1 when it names none, or
    /// names it badly: [`ScriptConfig::from_json`] says what is wrong).
    pub fn nnodes_of(config: &serde_json::Value) -> u64 {
        config
            .get("distributed")
            .and_then(|d| d.get("nnodes"))
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(1)
    }

    /// Processes in all (torch's `WORLD_SIZE`).
    pub fn world_size(&self) -> u32 {
        self.nproc_per_node * self.nnodes
    }
}

fn default_epochs() -> u32 {
    crate::TrainConfig::default().epochs
}

impl ScriptConfig {
    /// Most command-line arguments.
    pub const MAX_ARGS: usize = 64;
    /// Longest argument, in bytes.
    pub const MAX_ARG_LEN: usize = 1024;
    /// Longest entrypoint path, in bytes.
    pub const MAX_ENTRYPOINT_LEN: usize = 256;
    /// Most epochs.
    pub const MAX_EPOCHS: u32 = 10_000;
    /// Longest `report_timeout_secs`: a day.
    pub const MAX_REPORT_TIMEOUT_SECS: u64 = 86_400;

    /// Reads and checks a job's `config`, naming the first bad field
    /// (`config.entrypoint`).
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        if !value.is_object() {
            return Err(Error::invalid("config", "must be a JSON object"));
        }
        for required in ["code_s3_uri", "entrypoint"] {
            if value.get(required).is_none() {
                return Err(Error::invalid(
                    format!("config.{required}"),
                    "is required for a python job",
                ));
            }
        }
        let config: ScriptConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            Error::invalid(format!("config.{path}"), e.into_inner().to_string())
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<()> {
        self.code_s3_uri
            .parse::<crate::BlobUri>()
            .map_err(|e| match e {
                Error::InvalidInput { message, .. } => {
                    Error::invalid("config.code_s3_uri", message)
                }
                other => other,
            })?;
        check_relative_path("config.entrypoint", &self.entrypoint)?;
        if let Some(image) = &self.image
            && (image.is_empty()
                || image.len() > 256
                || image.chars().any(|c| c.is_whitespace() || c.is_control()))
        {
            return Err(Error::invalid(
                "config.image",
                "must be an image reference of 1 to 256 characters, without spaces",
            ));
        }
        if self.args.len() > Self::MAX_ARGS {
            return Err(Error::invalid(
                "config.args",
                format!("{} arguments; at most {}", self.args.len(), Self::MAX_ARGS),
            ));
        }
        for (i, arg) in self.args.iter().enumerate() {
            if arg.len() > Self::MAX_ARG_LEN || arg.contains('\0') {
                return Err(Error::invalid(
                    format!("config.args[{i}]"),
                    format!("must be at most {} bytes, without NUL", Self::MAX_ARG_LEN),
                ));
            }
        }
        if !(1..=Self::MAX_EPOCHS).contains(&self.epochs) {
            return Err(Error::invalid(
                "config.epochs",
                format!("must be from 1 to {}", Self::MAX_EPOCHS),
            ));
        }
        if let Some(secs) = self.report_timeout_secs
            && !(1..=Self::MAX_REPORT_TIMEOUT_SECS).contains(&secs)
        {
            return Err(Error::invalid(
                "config.report_timeout_secs",
                format!("must be from 1 to {}", Self::MAX_REPORT_TIMEOUT_SECS),
            ));
        }
        if let Some(distributed) = self.distributed {
            if !(1..=Distributed::MAX_NPROC_PER_NODE).contains(&distributed.nproc_per_node) {
                return Err(Error::invalid(
                    "config.distributed.nproc_per_node",
                    format!("must be from 1 to {}", Distributed::MAX_NPROC_PER_NODE),
                ));
            }
            if !(1..=Distributed::MAX_NNODES).contains(&distributed.nnodes) {
                return Err(Error::invalid(
                    "config.distributed.nnodes",
                    format!("must be from 1 to {}", Distributed::MAX_NNODES),
                ));
            }
        }
        Ok(())
    }
}

/// The `config` of a job the `ultralytics` package trains
/// (`framework: "ultralytics"`, `config.engine: "package"`): the trainer
/// runs `python -m vtp.ultralytics_engine`, an SDK script of the `vtp`
/// package, which drives the package's own trainer.
///
/// ```json
/// {"engine": "package", "epochs": 50, "imgsz": 640, "batch": 16, "lr0": 0.01}
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct PackageConfig {
    /// Epochs to train.
    pub epochs: u32,
    /// As [`ScriptConfig::report_timeout_secs`].
    pub report_timeout_secs: Option<u64>,
    /// The package's own training arguments, from
    /// [`PackageConfig::TRAIN_ARGS`], as given.
    pub train_args: serde_json::Map<String, serde_json::Value>,
}

impl PackageConfig {
    /// The package's training arguments a job may set. The others are the
    /// platform's (`data`, `project`, `save_dir`, `resume`, `plots`) or
    /// would fetch something (`pretrained` weights by name).
    pub const TRAIN_ARGS: [&'static str; 45] = [
        "imgsz",
        "batch",
        "device",
        "workers",
        "optimizer",
        "lr0",
        "lrf",
        "momentum",
        "weight_decay",
        "warmup_epochs",
        "warmup_momentum",
        "warmup_bias_lr",
        "cos_lr",
        "close_mosaic",
        "seed",
        "deterministic",
        "patience",
        "single_cls",
        "rect",
        "mosaic",
        "mixup",
        "copy_paste",
        "degrees",
        "translate",
        "scale",
        "shear",
        "perspective",
        "flipud",
        "fliplr",
        "hsv_h",
        "hsv_s",
        "hsv_v",
        "erasing",
        "dropout",
        "box",
        "cls",
        "dfl",
        "pose",
        "kobj",
        "nbs",
        "overlap_mask",
        "mask_ratio",
        "fraction",
        "cache",
        "freeze",
    ];
    /// VTP's own keys beside them.
    const KEYS: [&'static str; 5] = [
        "engine",
        "model",
        "epochs",
        "report_timeout_secs",
        "max_attempts",
    ];
    /// The largest `imgsz`.
    pub const MAX_IMGSZ: u64 = 4096;
    /// The largest `batch`.
    pub const MAX_BATCH: i64 = 1024;

    /// Whether a job's `config` asks for the package engine.
    pub fn wanted(config: &serde_json::Value) -> bool {
        config.get("engine").and_then(serde_json::Value::as_str) == Some("package")
    }

    /// Reads and checks a package job's `config`, naming the first bad
    /// field. The package checks its arguments' types itself when it
    /// starts; the ones whose bad values would cost a launch are checked
    /// here.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the field.
    pub fn from_json(value: &serde_json::Value) -> Result<Self> {
        let Some(object) = value.as_object() else {
            return Err(Error::invalid("config", "must be a JSON object"));
        };
        if !Self::wanted(value) {
            return Err(Error::invalid(
                "config.engine",
                "must be \"package\" for the ultralytics package's engine",
            ));
        }
        let mut train_args = serde_json::Map::new();
        for (key, value) in object {
            if Self::TRAIN_ARGS.contains(&key.as_str()) {
                train_args.insert(key.clone(), value.clone());
            } else if !Self::KEYS.contains(&key.as_str()) {
                return Err(Error::invalid(
                    format!("config.{key}"),
                    format!(
                        "is not a training argument the package engine takes; it takes {}",
                        Self::TRAIN_ARGS.join(", ")
                    ),
                ));
            }
        }
        let epochs = match object.get("epochs") {
            None => default_epochs(),
            Some(epochs) => epochs
                .as_u64()
                .and_then(|e| u32::try_from(e).ok())
                .filter(|e| (1..=ScriptConfig::MAX_EPOCHS).contains(e))
                .ok_or_else(|| {
                    Error::invalid(
                        "config.epochs",
                        format!(
                            "must be a whole number from 1 to {}",
                            ScriptConfig::MAX_EPOCHS
                        ),
                    )
                })?,
        };
        let report_timeout_secs = match object.get("report_timeout_secs") {
            None => None,
            Some(secs) => Some(
                secs.as_u64()
                    .filter(|s| (1..=ScriptConfig::MAX_REPORT_TIMEOUT_SECS).contains(s))
                    .ok_or_else(|| {
                        Error::invalid(
                            "config.report_timeout_secs",
                            format!(
                                "must be from 1 to {}",
                                ScriptConfig::MAX_REPORT_TIMEOUT_SECS
                            ),
                        )
                    })?,
            ),
        };
        if let Some(imgsz) = object.get("imgsz")
            && !imgsz
                .as_u64()
                .is_some_and(|i| (32..=Self::MAX_IMGSZ).contains(&i))
        {
            return Err(Error::invalid(
                "config.imgsz",
                format!(
                    "must be a whole number of pixels from 32 to {}",
                    Self::MAX_IMGSZ
                ),
            ));
        }
        if let Some(batch) = object.get("batch")
            && !batch
                .as_i64()
                .is_some_and(|b| b == -1 || (1..=Self::MAX_BATCH).contains(&b))
        {
            return Err(Error::invalid(
                "config.batch",
                format!(
                    "must be from 1 to {}, or -1 for the package's automatic size",
                    Self::MAX_BATCH
                ),
            ));
        }
        // The package's multi-GPU training starts its own processes, which
        // do not carry the SDK's callbacks: refused until they do.
        if let Some(device) = object.get("device") {
            let text = match device {
                serde_json::Value::String(text) => text.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                _ => String::new(),
            };
            if text.is_empty() || text.contains(',') || text.len() > 16 {
                return Err(Error::invalid(
                    "config.device",
                    "must name one device (\"cpu\", \"0\", \"mps\"); the package engine trains on one",
                ));
            }
        }
        Ok(PackageConfig {
            epochs,
            report_timeout_secs,
            train_args,
        })
    }
}

/// A path inside an archive: relative, `/`-separated, no `..`, `.` or empty
/// segment, no backslash or NUL, at most
/// [`ScriptConfig::MAX_ENTRYPOINT_LEN`] bytes.
fn check_relative_path(field: &str, path: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::invalid(field, format!("{path:?} {why}")));
    if path.is_empty() {
        return bad("is empty");
    }
    if path.len() > ScriptConfig::MAX_ENTRYPOINT_LEN {
        return bad(&format!(
            "is longer than {} bytes",
            ScriptConfig::MAX_ENTRYPOINT_LEN
        ));
    }
    if path.contains(['\\', '\0']) {
        return bad("must use `/` and hold no NUL");
    }
    if path.starts_with('/') {
        return bad("must be relative to the archive's root");
    }
    if path
        .split('/')
        .any(|segment| segment.is_empty() || segment == "." || segment == "..")
    {
        return bad("must not hold empty, `.` or `..` segments");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn field_of(value: serde_json::Value) -> String {
        match ScriptConfig::from_json(&value) {
            Err(Error::InvalidInput { field, .. }) => field,
            other => panic!("{value}: {other:?}"),
        }
    }

    #[test]
    fn the_issues_example_reads_with_the_scripts_own_keys_kept() {
        let value = json!({"code_s3_uri": "s3://vtp/users/a/code/c/train.zip",
            "entrypoint": "src/train.py", "args": ["--lr", "0.01"], "epochs": 10, "lr": 0.01});
        let config = ScriptConfig::from_json(&value).unwrap();
        assert_eq!(config.entrypoint, "src/train.py");
        assert_eq!(config.args, ["--lr", "0.01"]);
        assert_eq!(config.epochs, 10);
        assert_eq!(config.report_timeout_secs, None);
        assert_eq!(config.distributed, None);
    }

    #[test]
    fn a_package_config_keeps_the_packages_arguments_and_names_a_bad_one() {
        let value = json!({"engine": "package", "model": "yolo11n-seg", "epochs": 3,
            "imgsz": 64, "batch": 8, "lr0": 0.02, "max_attempts": 2});
        let config = PackageConfig::from_json(&value).unwrap();
        assert_eq!(config.epochs, 3);
        assert_eq!(
            config.train_args.keys().collect::<Vec<_>>(),
            ["batch", "imgsz", "lr0"]
        );
        let field = |value: serde_json::Value| match PackageConfig::from_json(&value) {
            Err(Error::InvalidInput { field, .. }) => field,
            other => panic!("{value}: {other:?}"),
        };
        assert_eq!(field(json!({"engine": "native"})), "config.engine");
        assert_eq!(
            field(json!({"engine": "package", "data": "/etc"})),
            "config.data"
        );
        assert_eq!(
            field(json!({"engine": "package", "save_dir": "/"})),
            "config.save_dir"
        );
        assert_eq!(
            field(json!({"engine": "package", "epochs": 0})),
            "config.epochs"
        );
        assert_eq!(
            field(json!({"engine": "package", "imgsz": 8})),
            "config.imgsz"
        );
        assert_eq!(
            field(json!({"engine": "package", "batch": 0})),
            "config.batch"
        );
        assert_eq!(
            field(json!({"engine": "package", "device": "0,1"})),
            "config.device"
        );
        assert_eq!(field(json!([1])), "config");
        assert!(PackageConfig::from_json(&json!({"engine": "package", "device": 0})).is_ok());
    }

    #[test]
    fn a_distributed_run_reads_with_one_node_by_default() {
        let value = json!({"code_s3_uri": "s3://vtp/k.zip", "entrypoint": "ddp.py",
            "distributed": {"nproc_per_node": 2}});
        let distributed = ScriptConfig::from_json(&value)
            .unwrap()
            .distributed
            .unwrap();
        assert_eq!(
            distributed,
            Distributed {
                nproc_per_node: 2,
                nnodes: 1
            }
        );
        assert_eq!(distributed.world_size(), 2);
    }

    #[test]
    fn bad_configs_name_their_field() {
        let base = json!({"code_s3_uri": "s3://vtp/k.zip", "entrypoint": "train.py"});
        let with = |key: &str, value: serde_json::Value| {
            let mut v = base.clone();
            v[key] = value;
            v
        };
        assert_eq!(
            field_of(json!({"entrypoint": "t.py"})),
            "config.code_s3_uri"
        );
        assert_eq!(
            field_of(json!({"code_s3_uri": "s3://vtp/k"})),
            "config.entrypoint"
        );
        assert_eq!(
            field_of(with("code_s3_uri", json!("ftp://x"))),
            "config.code_s3_uri"
        );
        for bad in [
            "/etc/passwd",
            "../up.py",
            "a//b.py",
            "./t.py",
            "a\\b.py",
            "",
        ] {
            assert_eq!(
                field_of(with("entrypoint", json!(bad))),
                "config.entrypoint",
                "{bad}"
            );
        }
        assert_eq!(field_of(with("entrypoint", json!(7))), "config.entrypoint");
        assert_eq!(field_of(with("args", json!("--lr 1"))), "config.args");
        assert_eq!(field_of(with("args", json!(vec!["x"; 65]))), "config.args");
        assert_eq!(
            field_of(with("args", json!(["ok", "a\0b"]))),
            "config.args[1]"
        );
        assert_eq!(field_of(with("epochs", json!(0))), "config.epochs");
        assert_eq!(field_of(with("epochs", json!(10_001))), "config.epochs");
        assert_eq!(
            field_of(with("report_timeout_secs", json!(0))),
            "config.report_timeout_secs"
        );
        assert_eq!(field_of(json!([1])), "config");
        for (distributed, field) in [
            (
                json!({"nproc_per_node": 0}),
                "config.distributed.nproc_per_node",
            ),
            (
                json!({"nproc_per_node": 17}),
                "config.distributed.nproc_per_node",
            ),
            (json!({"nnodes": 0}), "config.distributed.nnodes"),
            (json!({"nnodes": 17}), "config.distributed.nnodes"),
            (json!({"nprocs": 2}), "config.distributed.nprocs"),
            (json!(2), "config.distributed"),
        ] {
            assert_eq!(
                field_of(with("distributed", distributed.clone())),
                field,
                "{distributed}"
            );
        }
        assert_eq!(field_of(with("image", json!("a b"))), "config.image");
        // Whether an image is allowed is the launcher's to say.
        ScriptConfig::from_json(&with("image", json!("registry.example/vtp-trainer:timm")))
            .unwrap();
    }
}
