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
        // Scripts run with the trainer's own Python (its image on
        // Kubernetes): no operator setting allow-lists another image yet,
        // so asking for one is refused rather than ignored.
        if value.get("image").is_some() {
            return Err(Error::invalid(
                "config.image",
                "this platform runs scripts in the trainer's own environment; no other image is allow-listed",
            ));
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
        Ok(())
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
        assert_eq!(
            field_of(with("image", json!("evil/image:latest"))),
            "config.image"
        );
    }
}
