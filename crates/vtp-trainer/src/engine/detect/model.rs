//! The YOLO detection networks (YOLOv8 and YOLO11, scales `n` and `s`)
//! with the parameter names of an Ultralytics `DetectionModel`'s
//! `state_dict` (`model.0.conv.weight`, ..., `model.23.dfl.conv.weight`),
//! so that checkpoints move both ways through safetensors.
//!
//! The layer tables below restate the architectures of Ultralytics'
//! `yolov8.yaml` and `yolo11.yaml`; the width/depth scaling follows the
//! same rules (channels rounded up to a multiple of 8, repeats rounded).

use std::fmt;
use std::str::FromStr;

use tch::Tensor;
use tch::nn::Path;
use vtp_core::Error;

use super::anchors::{dist2bbox, make_anchors};
use super::blocks::{C2Psa, C2f, Conv, Detect, Sppf};
use Module::{Concat, Upsample};
use Source::{Layers, Previous};

/// A YOLO architecture and scale.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum YoloVariant {
    /// YOLOv8 nano.
    V8n,
    /// YOLOv8 small.
    V8s,
    /// YOLO11 nano.
    V11n,
    /// YOLO11 small.
    V11s,
}

impl YoloVariant {
    /// Every variant.
    pub const ALL: [YoloVariant; 4] = [
        YoloVariant::V8n,
        YoloVariant::V8s,
        YoloVariant::V11n,
        YoloVariant::V11s,
    ];

    /// The Ultralytics model name (`yolov8n`, `yolo11n`, ...).
    pub fn name(self) -> &'static str {
        match self {
            YoloVariant::V8n => "yolov8n",
            YoloVariant::V8s => "yolov8s",
            YoloVariant::V11n => "yolo11n",
            YoloVariant::V11s => "yolo11s",
        }
    }

    /// One line about it.
    pub fn description(self) -> &'static str {
        match self {
            YoloVariant::V8n => "YOLOv8 nano: C2f backbone and neck, 3.2M parameters at 80 classes",
            YoloVariant::V8s => {
                "YOLOv8 small: C2f backbone and neck, 11.2M parameters at 80 classes"
            }
            YoloVariant::V11n => {
                "YOLO11 nano: C3k2 and C2PSA attention, 2.6M parameters at 80 classes"
            }
            YoloVariant::V11s => {
                "YOLO11 small: C3k2 and C2PSA attention, 9.5M parameters at 80 classes"
            }
        }
    }

    fn is_v8(self) -> bool {
        matches!(self, YoloVariant::V8n | YoloVariant::V8s)
    }

    /// `(depth, width, max_channels)` of the YAML's `scales` entry.
    fn scale(self) -> (f64, f64, i64) {
        match self {
            YoloVariant::V8n => (0.33, 0.25, 1024),
            YoloVariant::V8s => (0.33, 0.50, 1024),
            YoloVariant::V11n => (0.50, 0.25, 1024),
            YoloVariant::V11s => (0.50, 0.50, 1024),
        }
    }

    fn layers(self) -> &'static [Row] {
        if self.is_v8() { YOLOV8 } else { YOLO11 }
    }
}

impl fmt::Display for YoloVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for YoloVariant {
    type Err = Error;

    /// Any spelling the catalog ([`vtp_core::find_model`]) accepts, such
    /// as `yolov11n` (Ultralytics dropped the "v" for YOLO11; people still
    /// write it).
    fn from_str(s: &str) -> Result<Self, Error> {
        let name = vtp_core::find_model("config.model", s.trim())?.name;
        YoloVariant::ALL
            .into_iter()
            .find(|v| v.name() == name)
            .ok_or_else(|| {
                let known: Vec<_> = YoloVariant::ALL.iter().map(|v| v.name()).collect();
                Error::invalid(
                    "config.model",
                    format!(
                        "{s:?} is not a YOLO detector; detectors: {}",
                        known.join(", ")
                    ),
                )
            })
    }
}

/// Where a layer's input comes from: the previous layer, or (for `Concat`
/// and `Detect`) earlier layers by index.
#[derive(Debug, Clone, Copy)]
enum Source {
    Previous,
    Layers(&'static [usize]),
}

/// One row of a model YAML, channels before width scaling and repeats
/// before depth scaling.
#[derive(Debug, Clone, Copy)]
enum Module {
    /// `Conv [c2, k, s]`.
    Conv(i64, i64, i64),
    /// `C2f [c2, shortcut]` with `n` repeats.
    C2f(i64, bool),
    /// `C3k2 [c2, c3k, e]`.
    C3k2(i64, bool, f64),
    /// `SPPF [c2, k]`.
    Sppf(i64, i64),
    /// `C2PSA [c2]`.
    C2Psa(i64),
    /// `nn.Upsample [None, 2, "nearest"]`.
    Upsample,
    /// `Concat [1]`.
    Concat,
    /// `Detect [nc]`.
    Detect,
}

#[derive(Debug, Clone, Copy)]
struct Row {
    from: Source,
    repeats: i64,
    module: Module,
}

const fn row(from: Source, repeats: i64, module: Module) -> Row {
    Row {
        from,
        repeats,
        module,
    }
}

/// `yolov8.yaml`.
const YOLOV8: &[Row] = &[
    row(Previous, 1, Module::Conv(64, 3, 2)),
    row(Previous, 1, Module::Conv(128, 3, 2)),
    row(Previous, 3, Module::C2f(128, true)),
    row(Previous, 1, Module::Conv(256, 3, 2)),
    row(Previous, 6, Module::C2f(256, true)),
    row(Previous, 1, Module::Conv(512, 3, 2)),
    row(Previous, 6, Module::C2f(512, true)),
    row(Previous, 1, Module::Conv(1024, 3, 2)),
    row(Previous, 3, Module::C2f(1024, true)),
    row(Previous, 1, Module::Sppf(1024, 5)),
    row(Previous, 1, Upsample),
    row(Layers(&[11 - 1, 6]), 1, Concat),
    row(Previous, 3, Module::C2f(512, false)),
    row(Previous, 1, Upsample),
    row(Layers(&[14 - 1, 4]), 1, Concat),
    row(Previous, 3, Module::C2f(256, false)),
    row(Previous, 1, Module::Conv(256, 3, 2)),
    row(Layers(&[17 - 1, 12]), 1, Concat),
    row(Previous, 3, Module::C2f(512, false)),
    row(Previous, 1, Module::Conv(512, 3, 2)),
    row(Layers(&[20 - 1, 9]), 1, Concat),
    row(Previous, 3, Module::C2f(1024, false)),
    row(Layers(&[15, 18, 21]), 1, Module::Detect),
];

/// `yolo11.yaml`.
const YOLO11: &[Row] = &[
    row(Previous, 1, Module::Conv(64, 3, 2)),
    row(Previous, 1, Module::Conv(128, 3, 2)),
    row(Previous, 2, Module::C3k2(256, false, 0.25)),
    row(Previous, 1, Module::Conv(256, 3, 2)),
    row(Previous, 2, Module::C3k2(512, false, 0.25)),
    row(Previous, 1, Module::Conv(512, 3, 2)),
    row(Previous, 2, Module::C3k2(512, true, 0.5)),
    row(Previous, 1, Module::Conv(1024, 3, 2)),
    row(Previous, 2, Module::C3k2(1024, true, 0.5)),
    row(Previous, 1, Module::Sppf(1024, 5)),
    row(Previous, 2, Module::C2Psa(1024)),
    row(Previous, 1, Upsample),
    row(Layers(&[12 - 1, 6]), 1, Concat),
    row(Previous, 2, Module::C3k2(512, false, 0.5)),
    row(Previous, 1, Upsample),
    row(Layers(&[15 - 1, 4]), 1, Concat),
    row(Previous, 2, Module::C3k2(256, false, 0.5)),
    row(Previous, 1, Module::Conv(256, 3, 2)),
    row(Layers(&[18 - 1, 13]), 1, Concat),
    row(Previous, 2, Module::C3k2(512, false, 0.5)),
    row(Previous, 1, Module::Conv(512, 3, 2)),
    row(Layers(&[21 - 1, 10]), 1, Concat),
    row(Previous, 2, Module::C3k2(1024, true, 0.5)),
    row(Layers(&[16, 19, 22]), 1, Module::Detect),
];

/// DFL bins per box side.
const REG_MAX: i64 = 16;
/// Downsampling of the P3, P4 and P5 feature maps the head reads.
const STRIDES: [f64; 3] = [8.0, 16.0, 32.0];

/// Channels after width scaling: capped, scaled, rounded up to a multiple
/// of 8.
fn scale_channels(c: i64, width: f64, max_channels: i64) -> i64 {
    ((c.min(max_channels) as f64 * width) / 8.0).ceil() as i64 * 8
}

/// Repeats after depth scaling. Rows with one repeat stay at one; others
/// are rounded half-to-even (Python's `round`) with a floor of one.
fn scale_repeats(n: i64, depth: f64) -> i64 {
    if n > 1 {
        ((n as f64 * depth).round_ties_even() as i64).max(1)
    } else {
        n
    }
}

/// A built layer.
#[derive(Debug)]
enum Layer {
    Conv(Conv),
    C2f(C2f),
    Sppf(Sppf),
    C2Psa(C2Psa),
    Upsample,
    Concat,
    Detect(Detect),
}

/// A YOLO detection network. Its variables live in the `VarStore` it was
/// built on, under Ultralytics' names.
pub struct DetectionModel {
    variant: YoloVariant,
    nc: i64,
    layers: Vec<(Source, Layer)>,
    /// Whether each layer's output is read again later (by a `Concat` or
    /// the head), so `forward_t` keeps only those.
    keep: Vec<bool>,
}

impl fmt::Debug for DetectionModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DetectionModel")
            .field("variant", &self.variant)
            .field("nc", &self.nc)
            .field("layers", &self.layers.len())
            .finish_non_exhaustive()
    }
}

impl DetectionModel {
    /// Builds the network under `p` (the VarStore ROOT: parameter names come
    /// out as `model.0.conv.weight`, ..., `model.23.dfl.conv.weight`), for
    /// `nc` classes, initialised as a fresh Ultralytics model is.
    pub fn new(p: &Path, variant: YoloVariant, nc: i64) -> Self {
        assert!(nc > 0, "a detector needs at least one class");
        let (depth, width, max_channels) = variant.scale();
        let root = p / "model";
        let rows = variant.layers();
        // Output channels of every layer so far; the input has 3.
        let mut channels: Vec<i64> = Vec::with_capacity(rows.len());
        let mut layers = Vec::with_capacity(rows.len());
        let mut keep = vec![false; rows.len()];
        for (i, row) in rows.iter().enumerate() {
            let q = &root / i;
            let c1 = match row.from {
                Source::Previous => channels.last().copied().unwrap_or(3),
                Source::Layers(from) => {
                    for &j in from {
                        keep[j] = true;
                    }
                    channels[from[0]]
                }
            };
            let n = scale_repeats(row.repeats, depth);
            let c = |c2| scale_channels(c2, width, max_channels);
            let (layer, c2) = match row.module {
                Module::Conv(c2, k, s) => (Layer::Conv(Conv::plain(&q, c1, c(c2), k, s)), c(c2)),
                Module::C2f(c2, shortcut) => {
                    (Layer::C2f(C2f::yolov8(&q, c1, c(c2), n, shortcut)), c(c2))
                }
                // Ultralytics forces `c3k` on for the m/l/x scales only; the
                // n and s scales built here take the YAML's value.
                Module::C3k2(c2, c3k, e) => {
                    (Layer::C2f(C2f::c3k2(&q, c1, c(c2), n, c3k, e)), c(c2))
                }
                Module::Sppf(c2, k) => (Layer::Sppf(Sppf::new(&q, c1, c(c2), k)), c(c2)),
                Module::C2Psa(c2) => {
                    assert_eq!(c1, c(c2), "C2PSA keeps its width");
                    (Layer::C2Psa(C2Psa::new(&q, c1, n)), c1)
                }
                Module::Upsample => (Layer::Upsample, c1),
                Module::Concat => {
                    let Source::Layers(from) = row.from else {
                        unreachable!("Concat rows name their inputs")
                    };
                    (Layer::Concat, from.iter().map(|&j| channels[j]).sum())
                }
                Module::Detect => {
                    let Source::Layers(from) = row.from else {
                        unreachable!("the Detect row names its inputs")
                    };
                    let inputs: Vec<i64> = from.iter().map(|&j| channels[j]).collect();
                    let head = Detect::new(&q, nc, REG_MAX, &inputs, &STRIDES, variant.is_v8());
                    (Layer::Detect(head), 0)
                }
            };
            channels.push(c2);
            layers.push((row.from, layer));
        }
        DetectionModel {
            variant,
            nc,
            layers,
            keep,
        }
    }

    /// The architecture.
    pub fn variant(&self) -> YoloVariant {
        self.variant
    }

    /// Number of classes.
    pub fn nc(&self) -> i64 {
        self.nc
    }

    /// DFL bins per box side (16).
    pub fn reg_max(&self) -> i64 {
        REG_MAX
    }

    /// Strides of the three output levels (P3, P4, P5).
    pub fn strides(&self) -> [f64; 3] {
        STRIDES
    }

    fn head(&self) -> &Detect {
        match self.layers.last() {
            Some((_, Layer::Detect(head))) => head,
            _ => unreachable!("every table ends with Detect"),
        }
    }

    /// Raw head outputs per level (P3, P4, P5): `[N, 4*reg_max + nc, H, W]`,
    /// the box DFL logits then the class logits, each level as Ultralytics'
    /// `Detect` branches produce them before it flattens and concatenates
    /// them. `train` selects BatchNorm batch statistics (and updates the
    /// running ones) vs running statistics.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Vec<Tensor> {
        let mut saved: Vec<Option<Tensor>> = Vec::with_capacity(self.layers.len());
        let mut x = xs.shallow_clone();
        for (i, (from, layer)) in self.layers.iter().enumerate() {
            let inputs = |from: &[usize]| -> Vec<Tensor> {
                from.iter()
                    .map(|&j| {
                        if j + 1 == i {
                            x.shallow_clone()
                        } else {
                            saved[j]
                                .as_ref()
                                .expect("inputs of later layers are kept")
                                .shallow_clone()
                        }
                    })
                    .collect()
            };
            let y = match (layer, from) {
                (Layer::Conv(m), _) => m.forward_t(&x, train),
                (Layer::C2f(m), _) => m.forward_t(&x, train),
                (Layer::Sppf(m), _) => m.forward_t(&x, train),
                (Layer::C2Psa(m), _) => m.forward_t(&x, train),
                (Layer::Upsample, _) => {
                    let (_, _, h, w) = x.size4().expect("NCHW");
                    x.upsample_nearest2d([2 * h, 2 * w], Some(2.0), Some(2.0))
                }
                (Layer::Concat, Source::Layers(from)) => Tensor::cat(&inputs(from), 1),
                (Layer::Detect(head), Source::Layers(from)) => {
                    return head.forward_t(&inputs(from), train);
                }
                (Layer::Concat | Layer::Detect(_), Source::Previous) => {
                    unreachable!("Concat and Detect rows name their inputs")
                }
            };
            saved.push(self.keep[i].then(|| y.shallow_clone()));
            x = y;
        }
        unreachable!("every table ends with Detect")
    }

    /// Ultralytics' eval-mode output from the raw outputs of
    /// [`forward_t`](Self::forward_t): `[N, 4 + nc, A]` over all anchors of
    /// all levels, boxes as `xywh` (centre, size) in input pixels, then
    /// sigmoid class scores. Boxes are the DFL expectation (through the
    /// model's own `dfl.conv` weight) turned into distances from each cell
    /// centre, times the level's stride.
    pub fn decode(&self, raw: &[Tensor]) -> Tensor {
        let (n, no, _, _) = raw[0].size4().expect("NCHW head output");
        assert_eq!(no, 4 * REG_MAX + self.nc, "head output channels");
        let sizes: Vec<(i64, i64)> = raw
            .iter()
            .map(|r| {
                let (_, _, h, w) = r.size4().expect("NCHW head output");
                (h, w)
            })
            .collect();
        let flat: Vec<Tensor> = raw.iter().map(|r| r.view([n, no, -1])).collect();
        let all = Tensor::cat(&flat, 2);
        let parts = all.split_with_sizes([4 * REG_MAX, self.nc], 1);
        let distances = self.head().dfl(&parts[0]);
        let (points, strides) =
            make_anchors(&sizes, &STRIDES[..raw.len()], 0.5, all.kind(), all.device());
        // anchors.rs lays points out [A, 2]; the head works channel-first.
        let points = points.transpose(0, 1).unsqueeze(0);
        let strides = strides.transpose(0, 1);
        let boxes = dist2bbox(&distances, &points, true, 1) * strides;
        Tensor::cat(&[boxes, parts[1].sigmoid()], 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::VarStore;
    use tch::{Device, Kind};

    fn build(variant: YoloVariant, nc: i64) -> (VarStore, DetectionModel) {
        let vs = VarStore::new(Device::Cpu);
        let model = DetectionModel::new(&vs.root(), variant, nc);
        (vs, model)
    }

    /// What Ultralytics' summary counts: parameters (trainable or not, so
    /// the fixed DFL weight too), not BatchNorm buffers.
    fn parameters(vs: &VarStore) -> i64 {
        vs.variables()
            .iter()
            .filter(|(name, _)| {
                !name.ends_with(".running_mean")
                    && !name.ends_with(".running_var")
                    && !name.ends_with(".num_batches_tracked")
            })
            .map(|(_, t)| t.numel() as i64)
            .sum()
    }

    #[test]
    fn names_parse_and_print() {
        for v in YoloVariant::ALL {
            assert_eq!(v.name().parse::<YoloVariant>().unwrap(), v);
            assert_eq!(v.to_string(), v.name());
            assert!(!v.description().is_empty());
        }
        assert_eq!(
            "YOLOv11N".parse::<YoloVariant>().unwrap(),
            YoloVariant::V11n
        );
        assert_eq!("YOLOv8s".parse::<YoloVariant>().unwrap(), YoloVariant::V8s);
        let err = "yolov5n".parse::<YoloVariant>().unwrap_err();
        assert!(err.to_string().contains("yolov5n"), "{err}");
    }

    #[test]
    fn scaling_rounds_like_python() {
        assert_eq!(scale_channels(64, 0.25, 1024), 16);
        assert_eq!(scale_channels(1024, 0.5, 1024), 512);
        assert_eq!(scale_repeats(3, 0.33), 1);
        assert_eq!(scale_repeats(6, 0.33), 2);
        assert_eq!(scale_repeats(2, 0.5), 1);
        assert_eq!(scale_repeats(1, 0.33), 1);
        // Python rounds 2.5 to 2.
        assert_eq!(scale_repeats(5, 0.5), 2);
    }

    /// Ultralytics' `DetectionModel(...)` parameter counts (its YAMLs quote
    /// the 80-class ones; the 3-class ones were read from the package).
    #[test]
    fn parameter_counts_match_ultralytics() {
        for (variant, nc, expected) in [
            (YoloVariant::V11n, 80, 2_624_080),
            (YoloVariant::V11n, 3, 2_590_425),
            (YoloVariant::V8n, 80, 3_157_200),
            (YoloVariant::V8n, 3, 3_011_433),
        ] {
            let (vs, _model) = build(variant, nc);
            assert_eq!(parameters(&vs), expected, "{variant} nc={nc}");
            // Everything but the fixed DFL weight trains.
            let trainable: i64 = vs
                .trainable_variables()
                .iter()
                .map(|t| t.numel() as i64)
                .sum();
            assert_eq!(trainable, expected - REG_MAX, "{variant} nc={nc}");
        }
    }

    #[test]
    fn small_scales_have_the_ultralytics_sizes() {
        for (variant, expected) in [
            (YoloVariant::V11s, 9_458_752),
            (YoloVariant::V8s, 11_166_560),
        ] {
            let (vs, _model) = build(variant, 80);
            assert_eq!(parameters(&vs), expected, "{variant}");
        }
    }

    #[test]
    fn variables_carry_the_state_dict_names() {
        let (vs, _model) = build(YoloVariant::V11n, 3);
        let vars = vs.variables();
        // 499 state_dict entries in Ultralytics' yolo11n.
        assert_eq!(vars.len(), 499);
        for (name, shape) in [
            ("model.0.conv.weight", vec![16, 3, 3, 3]),
            ("model.0.bn.running_var", vec![16]),
            ("model.2.m.0.cv1.conv.weight", vec![8, 16, 3, 3]),
            ("model.10.m.0.attn.qkv.conv.weight", vec![256, 128, 1, 1]),
            ("model.10.m.0.ffn.1.bn.bias", vec![128]),
            ("model.23.cv3.0.0.0.conv.weight", vec![64, 1, 3, 3]),
            ("model.23.cv3.2.2.bias", vec![3]),
            ("model.23.cv2.1.2.weight", vec![64, 64, 1, 1]),
            ("model.23.dfl.conv.weight", vec![1, 16, 1, 1]),
        ] {
            let t = vars.get(name).unwrap_or_else(|| panic!("missing {name}"));
            assert_eq!(t.size(), shape, "{name}");
        }
        let counter = &vars["model.22.m.0.m.1.cv2.bn.num_batches_tracked"];
        assert_eq!(counter.kind(), Kind::Int64);
        assert_eq!(counter.size(), Vec::<i64>::new());
        assert!(!vars.contains_key("model.23.stride"));

        let (vs, _model) = build(YoloVariant::V8n, 3);
        let vars = vs.variables();
        assert_eq!(vars.len(), 355);
        assert_eq!(vars["model.22.cv3.0.0.conv.weight"].size(), [64, 64, 3, 3]);
        assert_eq!(vars["model.2.m.0.cv1.conv.weight"].size(), [16, 16, 3, 3]);
    }

    #[test]
    fn head_biases_start_at_the_ultralytics_prior() {
        let (vs, _model) = build(YoloVariant::V11n, 3);
        let vars = vs.variables();
        let b: Vec<f32> = (&vars["model.23.cv2.0.2.bias"]).try_into().unwrap();
        assert!(b.iter().all(|&x| x == 2.0));
        let c: Vec<f32> = (&vars["model.23.cv3.0.2.bias"]).try_into().unwrap();
        let prior = (5.0f64 / 3.0 / 6400.0).ln() as f32;
        assert!(c.iter().all(|&x| (x - prior).abs() < 1e-6), "{c:?}");
        let dfl: Vec<f32> = vars["model.23.dfl.conv.weight"]
            .view([-1])
            .try_into()
            .unwrap();
        assert_eq!(dfl, (0..16).map(|i| i as f32).collect::<Vec<_>>());
    }

    #[test]
    fn outputs_have_the_head_shapes() {
        for variant in YoloVariant::ALL {
            let (_vs, model) = build(variant, 3);
            for (train, (h, w)) in [(true, (64, 64)), (false, (96, 128))] {
                let x = Tensor::rand([2, 3, h, w], (Kind::Float, Device::Cpu));
                let raw = tch::no_grad(|| model.forward_t(&x, train));
                let shapes: Vec<Vec<i64>> = raw.iter().map(Tensor::size).collect();
                let expected: Vec<Vec<i64>> = [8, 16, 32]
                    .iter()
                    .map(|s| vec![2, 67, h / s, w / s])
                    .collect();
                assert_eq!(shapes, expected, "{variant} {h}x{w}");

                let decoded = model.decode(&raw);
                let anchors: i64 = expected.iter().map(|s| s[2] * s[3]).sum();
                assert_eq!(decoded.size(), [2, 7, anchors]);
                assert!(bool::try_from(decoded.isfinite().all()).unwrap());
                // Scores are probabilities, box sizes non-negative.
                let scores = decoded.narrow(1, 4, 3);
                assert!(bool::try_from(scores.ge(0.0).all()).unwrap());
                assert!(bool::try_from(scores.le(1.0).all()).unwrap());
                assert!(bool::try_from(decoded.narrow(1, 2, 2).ge(0.0).all()).unwrap());
            }
        }
    }

    #[test]
    fn training_forward_counts_batches_and_moves_running_stats() {
        let (vs, model) = build(YoloVariant::V11n, 3);
        let x = Tensor::rand([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let _ = tch::no_grad(|| model.forward_t(&x, true));
        let vars = vs.variables();
        assert_eq!(
            i64::try_from(&vars["model.0.bn.num_batches_tracked"]).unwrap(),
            1
        );
        let mean = f64::try_from(vars["model.0.bn.running_mean"].abs().sum(Kind::Float)).unwrap();
        assert!(mean > 0.0);
        let _ = tch::no_grad(|| model.forward_t(&x, false));
        assert_eq!(
            i64::try_from(&vars["model.0.bn.num_batches_tracked"]).unwrap(),
            1
        );
    }

    #[test]
    fn gradients_reach_the_first_layer() {
        let (vs, model) = build(YoloVariant::V8n, 3);
        let x = Tensor::rand([2, 3, 64, 64], (Kind::Float, Device::Cpu));
        let raw = model.forward_t(&x, true);
        let loss = raw
            .iter()
            .map(|r| r.square().mean(Kind::Float))
            .sum::<Tensor>();
        loss.backward();
        let grad = vs.variables()["model.0.conv.weight"].grad();
        assert!(grad.defined());
        assert!(f64::try_from(grad.abs().sum(Kind::Float)).unwrap() > 0.0);
    }
}
