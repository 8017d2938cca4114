//! The architectures: a small CNN, ResNet-18/34 and MobileNetV2 (the last
//! three from tch's vision models, whose parameter names match torchvision).

use std::fmt;
use std::str::FromStr;

use tch::nn::{self, ModuleT};
use vtp_core::{Error, Result};

/// A model architecture.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// Three conv-bn-relu blocks and a linear head; fast on a CPU.
    SmallCnn,
    /// ResNet-18.
    ResNet18,
    /// ResNet-34.
    ResNet34,
    /// MobileNetV2.
    MobileNetV2,
}

/// What `GET /models` lists (the wire type of the trainer service).
pub use vtp_core::api::ModelInfo;

/// Every model of [`vtp_core::MODELS`] with its task and size, computed
/// once (building every network to count its parameters is not free).
///
/// # Errors
/// [`Error::InvalidInput`] if the catalog names a model this engine cannot
/// build (a test keeps that from happening).
pub fn catalog() -> Result<&'static [ModelInfo]> {
    static CATALOG: std::sync::OnceLock<std::result::Result<Vec<ModelInfo>, String>> =
        std::sync::OnceLock::new();
    CATALOG
        .get_or_init(|| {
            vtp_core::MODELS
                .iter()
                .map(|spec| match spec.task {
                    vtp_core::Task::Classify => Ok(spec.name.parse::<ModelKind>()?.info()),
                    task @ (vtp_core::Task::Segment
                    | vtp_core::Task::Pose
                    | vtp_core::Task::Obb) => Err(Error::invalid(
                        "model",
                        format!("the native engine has no {task} models ({})", spec.name),
                    )),
                    vtp_core::Task::Detect => {
                        let variant: super::detect::model::YoloVariant = spec.name.parse()?;
                        let vs = nn::VarStore::new(tch::Device::Cpu);
                        let _model =
                            super::detect::model::DetectionModel::new(&vs.root(), variant, 80);
                        Ok(ModelInfo {
                            name: spec.name.to_owned(),
                            task: spec.task,
                            description: spec.description.to_owned(),
                            min_image_size: spec.min_image_size,
                            parameters: Some(trainable_parameters(&vs)),
                            engine: vtp_core::Engine::Native,
                        })
                    }
                })
                .collect::<Result<Vec<_>>>()
                .map_err(|e| e.to_string())
        })
        .as_deref()
        .map_err(|e| Error::internal(format!("the model catalog: {e}")))
}

fn trainable_parameters(vs: &nn::VarStore) -> i64 {
    vs.trainable_variables()
        .iter()
        .map(tch::Tensor::numel)
        .sum::<usize>() as i64
}

impl ModelKind {
    /// Every architecture.
    pub const ALL: [ModelKind; 4] = [
        ModelKind::SmallCnn,
        ModelKind::ResNet18,
        ModelKind::ResNet34,
        ModelKind::MobileNetV2,
    ];

    /// The name used in configs.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::SmallCnn => "small_cnn",
            ModelKind::ResNet18 => "resnet18",
            ModelKind::ResNet34 => "resnet34",
            ModelKind::MobileNetV2 => "mobilenet_v2",
        }
    }

    /// Its entry in the catalog of `vtp-core`, which holds what the backend
    /// checks without libtorch (image sizes, description).
    pub fn spec(self) -> &'static vtp_core::ModelSpec {
        vtp_core::MODELS
            .iter()
            .find(|m| m.name == self.name())
            .expect("every ModelKind is in vtp_core::MODELS (tested)")
    }

    /// Smallest input side that survives the network's downsampling.
    pub fn min_image_size(self) -> u32 {
        self.spec().min_image_size
    }

    /// Builds the network under `p` for `classes` outputs.
    pub fn build(self, p: &nn::Path, classes: i64) -> Box<dyn ModuleT> {
        match self {
            ModelKind::SmallCnn => Box::new(small_cnn(p, classes)),
            ModelKind::ResNet18 => Box::new(tch::vision::resnet::resnet18(p, classes)),
            ModelKind::ResNet34 => Box::new(tch::vision::resnet::resnet34(p, classes)),
            ModelKind::MobileNetV2 => Box::new(tch::vision::mobilenet::v2(p, classes)),
        }
    }

    /// Name, description and size.
    pub fn info(self) -> ModelInfo {
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let _model = self.build(&vs.root(), 10);
        let parameters = trainable_parameters(&vs);
        ModelInfo {
            name: self.name().to_owned(),
            task: vtp_core::Task::Classify,
            description: self.spec().description.to_owned(),
            min_image_size: self.min_image_size(),
            parameters: Some(parameters),
            engine: vtp_core::Engine::Native,
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ModelKind {
    type Err = Error;

    /// Any spelling the catalog ([`vtp_core::find_model`]) accepts.
    fn from_str(s: &str) -> Result<Self> {
        let name = vtp_core::find_model("config.model", s)?.name;
        let kind = ModelKind::ALL.into_iter().find(|k| k.name() == name);
        kind.ok_or_else(|| {
            let known: Vec<_> = ModelKind::ALL.iter().map(|k| k.name()).collect();
            Error::invalid(
                "config.model",
                format!(
                    "{s:?} is not a classifier; classifiers: {}",
                    known.join(", ")
                ),
            )
        })
    }
}

fn conv_bn(p: &nn::Path, name: &str, c_in: i64, c_out: i64) -> (nn::Conv2D, nn::BatchNorm) {
    let conv = nn::conv2d(
        p / format!("conv{name}"),
        c_in,
        c_out,
        3,
        nn::ConvConfig {
            padding: 1,
            bias: false,
            ..Default::default()
        },
    );
    let bn = nn::batch_norm2d(p / format!("bn{name}"), c_out, Default::default());
    (conv, bn)
}

/// The small CNN. In PyTorch terms (same parameter names):
///
/// ```text
/// conv1 = Conv2d(3, 32, 3, padding=1, bias=False); bn1 = BatchNorm2d(32)   -> relu -> max_pool2d(2)
/// conv2 = Conv2d(32, 64, 3, padding=1, bias=False); bn2 = BatchNorm2d(64)  -> relu -> max_pool2d(2)
/// conv3 = Conv2d(64, 128, 3, padding=1, bias=False); bn3 = BatchNorm2d(128) -> relu -> adaptive_avg_pool2d(1)
/// fc = Linear(128, classes)
/// ```
fn small_cnn(p: &nn::Path, classes: i64) -> nn::FuncT<'static> {
    let (c1, b1) = conv_bn(p, "1", 3, 32);
    let (c2, b2) = conv_bn(p, "2", 32, 64);
    let (c3, b3) = conv_bn(p, "3", 64, 128);
    let fc = nn::linear(p / "fc", 128, classes, Default::default());
    nn::func_t(move |xs, train| {
        xs.apply(&c1)
            .apply_t(&b1, train)
            .relu()
            .max_pool2d_default(2)
            .apply(&c2)
            .apply_t(&b2, train)
            .relu()
            .max_pool2d_default(2)
            .apply(&c3)
            .apply_t(&b3, train)
            .relu()
            .adaptive_avg_pool2d([1, 1])
            .flat_view()
            .apply(&fc)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_architecture_is_a_classifier_of_the_core_catalog() {
        for kind in ModelKind::ALL {
            let spec = vtp_core::MODELS
                .iter()
                .find(|m| m.name == kind.name())
                .unwrap_or_else(|| panic!("{kind} is missing from vtp_core::MODELS"));
            assert_eq!(spec.task, vtp_core::Task::Classify, "{kind}");
            assert_eq!(spec.image_size_multiple, 1, "{kind}");
        }
    }
}
