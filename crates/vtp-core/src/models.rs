//! The model catalog: every architecture VTP trains, its task, and the
//! frameworks a job may name. It lives here, below every crate, so the
//! backend can refuse an unknown model or framework when a job is created
//! (without libtorch), and the trainer builds exactly the models listed.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// What a model learns to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Task {
    /// One class per image (ImageFolder datasets, accuracy).
    Classify,
    /// Boxes with classes (YOLO datasets, mAP).
    Detect,
    /// Boxes and masks (the `ultralytics` package's engine only).
    Segment,
    /// Boxes and keypoints (the `ultralytics` package's engine only).
    Pose,
    /// Oriented boxes (the `ultralytics` package's engine only).
    Obb,
}

impl Task {
    /// The name used in sidecars and listings.
    pub fn name(self) -> &'static str {
        match self {
            Task::Classify => "classify",
            Task::Detect => "detect",
            Task::Segment => "segment",
            Task::Pose => "pose",
            Task::Obb => "obb",
        }
    }
}

impl fmt::Display for Task {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The `framework` of a job: which family of models, dataset layout, loss
/// and metrics it means. `tch` and `ultralytics` are trained by VTP's own
/// libtorch engine; `python` runs the user's own code
/// ([`crate::ScriptConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Framework {
    /// VTP's engine with any model of the catalog.
    Tch,
    /// The Ultralytics model family (YOLO), its dataset layout
    /// (`data.yaml`), loss and metrics; weights interchangeable with the
    /// `ultralytics` package.
    Ultralytics,
    /// The user's own training script, from an uploaded code archive, run
    /// by the trainer's Python with the `vtp.run()` SDK; the model name is
    /// the user's to choose.
    Python,
}

impl Framework {
    /// Every framework.
    pub const ALL: [Framework; 3] = [Framework::Tch, Framework::Ultralytics, Framework::Python];

    /// The name jobs use.
    pub fn name(self) -> &'static str {
        match self {
            Framework::Tch => "tch",
            Framework::Ultralytics => "ultralytics",
            Framework::Python => "python",
        }
    }
}

impl FromStr for Framework {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Framework::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .ok_or_else(|| {
                Error::invalid(
                    "framework",
                    format!("unknown framework {s:?}; known: tch, ultralytics, python"),
                )
            })
    }
}

/// One architecture of the catalog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ModelSpec {
    /// The name used in `model_name` and `config.model`.
    pub name: &'static str,
    /// What it does.
    pub task: Task,
    /// Frameworks whose model family includes it.
    #[serde(skip)]
    pub frameworks: &'static [Framework],
    /// Other spellings accepted for it.
    #[serde(skip)]
    pub aliases: &'static [&'static str],
    /// One line about it.
    pub description: &'static str,
    /// Smallest `config.image_size` that survives the network's downsampling.
    pub min_image_size: u32,
    /// Largest `config.image_size` accepted.
    pub max_image_size: u32,
    /// `config.image_size` must be a multiple of this (a detector's largest
    /// stride; 1 for the classifiers, whose global pooling takes any size).
    pub image_size_multiple: u32,
}

const TCH: &[Framework] = &[Framework::Tch];
const BOTH: &[Framework] = &[Framework::Tch, Framework::Ultralytics];

/// Every model VTP trains.
pub const MODELS: &[ModelSpec] = &[
    ModelSpec {
        name: "small_cnn",
        task: Task::Classify,
        frameworks: TCH,
        aliases: &["cnn", "smallcnn"],
        description: "3 conv-bn-relu blocks (32-64-128), global pooling, linear head",
        min_image_size: 8,
        max_image_size: 1024,
        image_size_multiple: 1,
    },
    ModelSpec {
        name: "resnet18",
        task: Task::Classify,
        frameworks: TCH,
        aliases: &["resnet_18"],
        description: "ResNet-18 (torchvision layout)",
        min_image_size: 32,
        max_image_size: 1024,
        image_size_multiple: 1,
    },
    ModelSpec {
        name: "resnet34",
        task: Task::Classify,
        frameworks: TCH,
        aliases: &["resnet_34"],
        description: "ResNet-34 (torchvision layout)",
        min_image_size: 32,
        max_image_size: 1024,
        image_size_multiple: 1,
    },
    ModelSpec {
        name: "mobilenet_v2",
        task: Task::Classify,
        frameworks: TCH,
        aliases: &["mobilenetv2"],
        description: "MobileNetV2 (torchvision layout)",
        min_image_size: 32,
        max_image_size: 1024,
        image_size_multiple: 1,
    },
    ModelSpec {
        name: "yolov8n",
        task: Task::Detect,
        frameworks: BOTH,
        aliases: &[],
        description: "YOLOv8 nano detector (Ultralytics layout and weights)",
        min_image_size: 32,
        max_image_size: 1280,
        image_size_multiple: 32,
    },
    ModelSpec {
        name: "yolov8s",
        task: Task::Detect,
        frameworks: BOTH,
        aliases: &[],
        description: "YOLOv8 small detector (Ultralytics layout and weights)",
        min_image_size: 32,
        max_image_size: 1280,
        image_size_multiple: 32,
    },
    ModelSpec {
        name: "yolo11n",
        task: Task::Detect,
        frameworks: BOTH,
        aliases: &["yolov11n"],
        description: "YOLO11 nano detector (Ultralytics layout and weights)",
        min_image_size: 32,
        max_image_size: 1280,
        image_size_multiple: 32,
    },
    ModelSpec {
        name: "yolo11s",
        task: Task::Detect,
        frameworks: BOTH,
        aliases: &["yolov11s"],
        description: "YOLO11 small detector (Ultralytics layout and weights)",
        min_image_size: 32,
        max_image_size: 1280,
        image_size_multiple: 32,
    },
];

/// The catalog entry for `name` (case-insensitive, `-` read as `_`, aliases
/// accepted).
///
/// # Errors
/// [`Error::InvalidInput`] on `field`, listing the known names.
pub fn find_model(field: &str, name: &str) -> Result<&'static ModelSpec> {
    let normalised = name.to_ascii_lowercase().replace('-', "_");
    MODELS
        .iter()
        .find(|m| m.name == normalised || m.aliases.contains(&normalised.as_str()))
        .ok_or_else(|| {
            let known: Vec<_> = MODELS.iter().map(|m| m.name).collect();
            Error::invalid(
                field,
                format!("unknown model {name:?}; known: {}", known.join(", ")),
            )
        })
}

/// Checks that a job's `model_name` and `framework` name a model VTP trains
/// within that framework's family.
///
/// # Errors
/// [`Error::InvalidInput`] naming `framework` or `model_name`.
pub fn check_model(model_name: &str, framework: &str) -> Result<&'static ModelSpec> {
    let framework: Framework = framework.parse()?;
    if framework == Framework::Python {
        return Err(Error::invalid(
            "framework",
            format!("{model_name:?} is a python job's own model, not one of the catalog's"),
        ));
    }
    let spec = find_model("model_name", model_name)?;
    if !spec.frameworks.contains(&framework) {
        let family: Vec<_> = MODELS
            .iter()
            .filter(|m| m.frameworks.contains(&framework))
            .map(|m| m.name)
            .collect();
        return Err(Error::invalid(
            "model_name",
            format!(
                "{} is not in the {} family; it has: {}",
                spec.name,
                framework.name(),
                family.join(", ")
            ),
        ));
    }
    Ok(spec)
}

/// Which engine trains a model: VTP's own (libtorch, in Rust) or the
/// `ultralytics` package, run as a program of its own
/// (`config.engine: "package"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// VTP's own engine: the default for every model it has.
    Native,
    /// The `ultralytics` package in the trainer's Python.
    Package,
}

/// A model the `ultralytics` package builds from its own configs (no
/// weights are downloaded): `{yolov8,yolo11}{n,s,m,l,x}` with a task's
/// suffix (`-seg`, `-cls`, `-pose`, `-obb`; none for detect).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageModel {
    /// The canonical name (`yolo11n-seg`).
    pub name: String,
    /// What it does.
    pub task: Task,
}

/// The package's model families.
const PACKAGE_FAMILIES: [(&str, &str); 2] = [("yolov8", "YOLOv8"), ("yolo11", "YOLO11")];
/// Their sizes.
const PACKAGE_SIZES: [(char, &str); 5] = [
    ('n', "nano"),
    ('s', "small"),
    ('m', "medium"),
    ('l', "large"),
    ('x', "extra large"),
];
/// The tasks' name suffixes.
const PACKAGE_TASKS: [(&str, Task); 5] = [
    ("", Task::Detect),
    ("-seg", Task::Segment),
    ("-cls", Task::Classify),
    ("-pose", Task::Pose),
    ("-obb", Task::Obb),
];

impl PackageModel {
    /// One line about it.
    pub fn description(&self) -> String {
        let (family, size) = PACKAGE_FAMILIES
            .iter()
            .flat_map(|(prefix, family)| {
                PACKAGE_SIZES.iter().filter_map(move |(letter, size)| {
                    self.name
                        .starts_with(&format!("{prefix}{letter}"))
                        .then_some((*family, *size))
                })
            })
            .next()
            .unwrap_or(("YOLO", ""));
        format!(
            "{family} {size} {} model, trained by the ultralytics package",
            self.task
        )
    }
}

/// Every model the package engine takes.
pub fn package_models() -> Vec<PackageModel> {
    PACKAGE_FAMILIES
        .iter()
        .flat_map(|(family, _)| {
            PACKAGE_SIZES.iter().flat_map(move |(size, _)| {
                PACKAGE_TASKS
                    .iter()
                    .map(move |(suffix, task)| PackageModel {
                        name: format!("{family}{size}{suffix}"),
                        task: *task,
                    })
            })
        })
        .collect()
}

/// The package model `name` (case-insensitive; `yolov11` read as `yolo11`,
/// as the native catalog does).
///
/// # Errors
/// [`Error::InvalidInput`] on `model_name`, with the names' pattern.
pub fn find_package_model(name: &str) -> Result<PackageModel> {
    let normalised = name.to_ascii_lowercase().replace("yolov11", "yolo11");
    package_models()
        .into_iter()
        .find(|m| m.name == normalised)
        .ok_or_else(|| {
            Error::invalid(
                "model_name",
                format!(
                    "unknown model {name:?} for the ultralytics package engine; it takes \
                     yolov8 or yolo11, a size (n, s, m, l, x) and a task's suffix \
                     (none for detect, -seg, -cls, -pose, -obb): yolo11n-seg, yolov8s-pose, ..."
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_framework_is_named_exactly_as_the_document_enumerates_it() {
        for framework in Framework::ALL {
            assert_eq!(framework.name().parse::<Framework>().unwrap(), framework);
            let json = serde_json::to_value(framework).unwrap();
            assert_eq!(json, framework.name());
        }
        // The OpenAPI document's enum is lowercase, and so is the server:
        // what the schema refuses, the server refuses too.
        for other in ["TCH", "Ultralytics", "pytorch", ""] {
            let err = other.parse::<Framework>().unwrap_err();
            assert!(
                err.to_string().contains("known: tch, ultralytics, python"),
                "{err}"
            );
        }
    }

    #[test]
    fn the_package_engine_knows_every_task_of_both_families() {
        let models = package_models();
        assert_eq!(models.len(), 50);
        let seg = find_package_model("YOLO11n-seg").unwrap();
        assert_eq!(
            (seg.name.as_str(), seg.task),
            ("yolo11n-seg", Task::Segment)
        );
        assert_eq!(
            find_package_model("yolov11s-cls").unwrap().task,
            Task::Classify
        );
        assert_eq!(find_package_model("yolov8x-obb").unwrap().task, Task::Obb);
        assert_eq!(find_package_model("yolov8m").unwrap().task, Task::Detect);
        assert_eq!(
            find_package_model("yolov8n-pose").unwrap().description(),
            "YOLOv8 nano pose model, trained by the ultralytics package"
        );
        for bad in [
            "yolo11q-seg",
            "yolo11n-depth",
            "resnet18",
            "yolo11n-seg.pt",
            "",
        ] {
            assert!(find_package_model(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_seeds_job_is_a_detector() {
        let spec = check_model("yolo11n", "ultralytics").unwrap();
        assert_eq!(spec.task, Task::Detect);
        assert_eq!(check_model("YOLOv11n", "tch").unwrap().name, "yolo11n");
        assert_eq!(find_model("m", "ResNet-18").unwrap().name, "resnet18");
    }

    #[test]
    fn unknown_names_are_refused_naming_the_field() {
        for (model, framework, field) in [
            ("yolo9000", "ultralytics", "model_name"),
            ("yolo11n", "keras", "framework"),
            ("resnet18", "ultralytics", "model_name"),
        ] {
            match check_model(model, framework) {
                Err(Error::InvalidInput { field: got, .. }) => assert_eq!(got, field),
                other => panic!("{model}/{framework}: {other:?}"),
            }
        }
    }
}
