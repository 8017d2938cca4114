//! The building blocks of the YOLO networks, laid out so that every tensor
//! lands under the name the Ultralytics `state_dict` gives it (`conv`, `bn`,
//! `cv1`, `m.0`, ...): a checkpoint moves between the two by name alone.
//!
//! Initialisation follows PyTorch's defaults (what an Ultralytics model has
//! before training) with Ultralytics' BatchNorm settings, so that training
//! from scratch starts from the same distribution.

use tch::nn::{Init, Path};
use tch::{Kind, Tensor};

/// Ultralytics sets every BatchNorm to `eps = 1e-3` after building the model.
const BN_EPS: f64 = 1e-3;
/// ... and `momentum = 0.03` (PyTorch's convention: the weight of the new
/// batch statistic, which is also what `Tensor::batch_norm` takes).
const BN_MOMENTUM: f64 = 0.03;

/// A convolution weight (and optional bias) initialised like PyTorch's
/// `nn.Conv2d`: Kaiming-uniform with `a = sqrt(5)`, which works out to
/// `U(-1/sqrt(fan_in), 1/sqrt(fan_in))` for both weight and bias. tch's own
/// default (Kaiming-uniform with the ReLU gain) is `sqrt(6)` times wider.
fn conv_vars(p: &Path, c1: i64, c2: i64, k: i64, g: i64, bias: bool) -> (Tensor, Option<Tensor>) {
    let fan_in = (c1 / g) * k * k;
    let bound = 1.0 / (fan_in as f64).sqrt();
    let init = Init::Uniform {
        lo: -bound,
        up: bound,
    };
    let weight = p.var("weight", &[c2, c1 / g, k, k], init);
    let bias = bias.then(|| p.var("bias", &[c2], init));
    (weight, bias)
}

/// `nn.BatchNorm2d` with its three buffers, `num_batches_tracked` included:
/// tch's own batch norm has no such counter, and a strict `load_state_dict`
/// on the Python side needs every key.
#[derive(Debug)]
pub struct BatchNorm {
    weight: Tensor,
    bias: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    num_batches_tracked: Tensor,
}

impl BatchNorm {
    /// A batch norm of `c` channels under `p`, in PyTorch's initial state.
    pub fn new(p: &Path, c: i64) -> Self {
        let num_batches_tracked = p.add(
            "num_batches_tracked",
            Tensor::zeros([], (Kind::Int64, p.device())),
            false,
        );
        BatchNorm {
            weight: p.var("weight", &[c], Init::Const(1.0)),
            bias: p.var("bias", &[c], Init::Const(0.0)),
            running_mean: p.zeros_no_train("running_mean", &[c]),
            running_var: p.ones_no_train("running_var", &[c]),
            num_batches_tracked,
        }
    }

    /// Normalises with batch statistics (updating the running ones) when
    /// `train`, else with the running statistics.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        if train {
            // Only counted, as in PyTorch: with a fixed momentum the counter
            // does not enter the maths, but checkpoints carry it.
            tch::no_grad(|| {
                let _ = self.num_batches_tracked.shallow_clone().g_add_scalar_(1);
            });
        }
        Tensor::batch_norm(
            xs,
            Some(&self.weight),
            Some(&self.bias),
            Some(&self.running_mean),
            Some(&self.running_var),
            train,
            BN_MOMENTUM,
            BN_EPS,
            true,
        )
    }
}

/// Ultralytics' `Conv`: a bias-free convolution with "same" padding for odd
/// kernels, batch norm, then SiLU (or nothing when `act` is false).
#[derive(Debug)]
pub struct Conv {
    weight: Tensor,
    bn: BatchNorm,
    stride: i64,
    padding: i64,
    groups: i64,
    act: bool,
}

impl Conv {
    /// `c1 -> c2` channels, kernel `k`, stride `s`, groups `g`.
    pub fn new(p: &Path, c1: i64, c2: i64, k: i64, s: i64, g: i64, act: bool) -> Self {
        let (weight, _) = conv_vars(&(p / "conv"), c1, c2, k, g, false);
        Conv {
            weight,
            bn: BatchNorm::new(&(p / "bn"), c2),
            stride: s,
            padding: k / 2,
            groups: g,
            act,
        }
    }

    /// The common case: groups 1, SiLU.
    pub fn plain(p: &Path, c1: i64, c2: i64, k: i64, s: i64) -> Self {
        Conv::new(p, c1, c2, k, s, 1, true)
    }

    /// Ultralytics' `DWConv`: a `Conv` grouped by `gcd(c1, c2)`, depth-wise
    /// when `c1 == c2`.
    pub fn depthwise(p: &Path, c1: i64, c2: i64, k: i64) -> Self {
        Conv::new(p, c1, c2, k, 1, gcd(c1, c2), true)
    }

    /// Applies the block.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let y = xs.conv2d(
            &self.weight,
            None::<&Tensor>,
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            self.groups,
        );
        let y = self.bn.forward_t(&y, train);
        if self.act { y.silu() } else { y }
    }
}

fn gcd(a: i64, b: i64) -> i64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// A plain `nn.Conv2d` with bias and a 1x1 kernel: the last layer of each
/// head branch.
#[derive(Debug)]
pub struct Conv2d {
    weight: Tensor,
    bias: Tensor,
}

impl Conv2d {
    /// `c1 -> c2` channels, 1x1.
    pub fn new(p: &Path, c1: i64, c2: i64) -> Self {
        let (weight, bias) = conv_vars(p, c1, c2, 1, 1, true);
        Conv2d {
            weight,
            bias: bias.expect("created with a bias"),
        }
    }

    /// Sets every bias to `value` (Ultralytics' head bias initialisation).
    pub fn fill_bias(&self, value: f64) {
        tch::no_grad(|| {
            let _ = self.bias.shallow_clone().fill_(value);
        });
    }

    /// Applies the convolution.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        xs.conv2d(&self.weight, Some(&self.bias), [1, 1], [0, 0], [1, 1], 1)
    }
}

/// Two stacked `Conv`s with an optional residual: `c1 -> c2*e -> c2`.
#[derive(Debug)]
pub struct Bottleneck {
    cv1: Conv,
    cv2: Conv,
    add: bool,
}

impl Bottleneck {
    /// Kernels 3x3 both; the residual only when asked and shapes agree.
    pub fn new(p: &Path, c1: i64, c2: i64, shortcut: bool, e: f64) -> Self {
        let hidden = (c2 as f64 * e) as i64;
        Bottleneck {
            cv1: Conv::plain(&(p / "cv1"), c1, hidden, 3, 1),
            cv2: Conv::plain(&(p / "cv2"), hidden, c2, 3, 1),
            add: shortcut && c1 == c2,
        }
    }

    /// Applies the block.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let y = self.cv2.forward_t(&self.cv1.forward_t(xs, train), train);
        if self.add { xs + y } else { y }
    }
}

/// Ultralytics' `C3k` (a `C3` with 3x3 bottlenecks): two 1x1 branches, one
/// through a stack of bottlenecks, concatenated and mixed by a third 1x1.
#[derive(Debug)]
pub struct C3k {
    cv1: Conv,
    cv2: Conv,
    cv3: Conv,
    m: Vec<Bottleneck>,
}

impl C3k {
    /// `n` bottlenecks on `c2 / 2` channels.
    pub fn new(p: &Path, c1: i64, c2: i64, n: i64, shortcut: bool) -> Self {
        let hidden = c2 / 2;
        let m = (0..n)
            .map(|i| Bottleneck::new(&(p / "m" / i), hidden, hidden, shortcut, 1.0))
            .collect();
        C3k {
            cv1: Conv::plain(&(p / "cv1"), c1, hidden, 1, 1),
            cv2: Conv::plain(&(p / "cv2"), c1, hidden, 1, 1),
            cv3: Conv::plain(&(p / "cv3"), 2 * hidden, c2, 1, 1),
            m,
        }
    }

    /// Applies the block.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut a = self.cv1.forward_t(xs, train);
        for b in &self.m {
            a = b.forward_t(&a, train);
        }
        let b = self.cv2.forward_t(xs, train);
        self.cv3.forward_t(&Tensor::cat(&[a, b], 1), train)
    }
}

/// One inner block of a `C2f` / `C3k2`.
#[derive(Debug)]
enum Inner {
    Bottleneck(Bottleneck),
    C3k(C3k),
}

impl Inner {
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        match self {
            Inner::Bottleneck(b) => b.forward_t(xs, train),
            Inner::C3k(c) => c.forward_t(xs, train),
        }
    }
}

/// Ultralytics' `C2f` and its YOLO11 form `C3k2`: a 1x1 conv split in two
/// halves, the second run through `n` blocks whose every output is kept, all
/// concatenated and mixed by a 1x1 conv.
#[derive(Debug)]
pub struct C2f {
    cv1: Conv,
    cv2: Conv,
    m: Vec<Inner>,
}

impl C2f {
    /// YOLOv8's `C2f`: hidden `c = c2 / 2`, bottlenecks without expansion.
    pub fn yolov8(p: &Path, c1: i64, c2: i64, n: i64, shortcut: bool) -> Self {
        let c = c2 / 2;
        let m = (0..n)
            .map(|i| Inner::Bottleneck(Bottleneck::new(&(p / "m" / i), c, c, shortcut, 1.0)))
            .collect();
        C2f::with_inner(p, c1, c2, c, m)
    }

    /// YOLO11's `C3k2`: hidden `c = c2 * e`, and each block either a `C3k`
    /// of two bottlenecks or a bottleneck that halves its width inside.
    /// The residual is always on (`C3k2`'s default; the YAMLs never change
    /// it).
    pub fn c3k2(p: &Path, c1: i64, c2: i64, n: i64, c3k: bool, e: f64) -> Self {
        let c = (c2 as f64 * e) as i64;
        let m = (0..n)
            .map(|i| {
                let q = p / "m" / i;
                if c3k {
                    Inner::C3k(C3k::new(&q, c, c, 2, true))
                } else {
                    Inner::Bottleneck(Bottleneck::new(&q, c, c, true, 0.5))
                }
            })
            .collect();
        C2f::with_inner(p, c1, c2, c, m)
    }

    fn with_inner(p: &Path, c1: i64, c2: i64, c: i64, m: Vec<Inner>) -> Self {
        let n = m.len() as i64;
        C2f {
            cv1: Conv::plain(&(p / "cv1"), c1, 2 * c, 1, 1),
            cv2: Conv::plain(&(p / "cv2"), (2 + n) * c, c2, 1, 1),
            m,
        }
    }

    /// Applies the block.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut ys = self.cv1.forward_t(xs, train).chunk(2, 1);
        for block in &self.m {
            let next = block.forward_t(ys.last().expect("two halves"), train);
            ys.push(next);
        }
        self.cv2.forward_t(&Tensor::cat(&ys, 1), train)
    }
}

/// Spatial pyramid pooling, fast: a 1x1 conv, then three chained `k x k`
/// max-pools (stride 1), all four concatenated and mixed by a 1x1 conv.
#[derive(Debug)]
pub struct Sppf {
    cv1: Conv,
    cv2: Conv,
    k: i64,
}

impl Sppf {
    /// `c1 -> c2` with pool size `k`. The first conv is activated: the class
    /// defaults to no activation there now (for YOLO26), but the model
    /// builder turns SiLU back on for the v8/11 YAML rows, so their
    /// checkpoints keep their meaning.
    pub fn new(p: &Path, c1: i64, c2: i64, k: i64) -> Self {
        let hidden = c1 / 2;
        Sppf {
            cv1: Conv::plain(&(p / "cv1"), c1, hidden, 1, 1),
            cv2: Conv::plain(&(p / "cv2"), hidden * 4, c2, 1, 1),
            k,
        }
    }

    /// Applies the block.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut ys = vec![self.cv1.forward_t(xs, train)];
        for _ in 0..3 {
            let pooled = ys.last().expect("one at least").max_pool2d(
                [self.k, self.k],
                [1, 1],
                [self.k / 2, self.k / 2],
                [1, 1],
                false,
            );
            ys.push(pooled);
        }
        self.cv2.forward_t(&Tensor::cat(&ys, 1), train)
    }
}

/// Multi-head self-attention over the pixels of a feature map, with a
/// depth-wise 3x3 conv on the values as positional encoding.
#[derive(Debug)]
pub struct Attention {
    qkv: Conv,
    proj: Conv,
    pe: Conv,
    num_heads: i64,
    key_dim: i64,
    head_dim: i64,
    scale: f64,
}

impl Attention {
    /// `dim` channels in `num_heads` heads; keys and queries are
    /// `attn_ratio` as wide as a head.
    pub fn new(p: &Path, dim: i64, num_heads: i64, attn_ratio: f64) -> Self {
        let head_dim = dim / num_heads;
        let key_dim = (head_dim as f64 * attn_ratio) as i64;
        let qkv_channels = dim + 2 * key_dim * num_heads;
        Attention {
            qkv: Conv::new(&(p / "qkv"), dim, qkv_channels, 1, 1, 1, false),
            proj: Conv::new(&(p / "proj"), dim, dim, 1, 1, 1, false),
            pe: Conv::new(&(p / "pe"), dim, dim, 3, 1, dim, false),
            num_heads,
            key_dim,
            head_dim,
            scale: (key_dim as f64).powf(-0.5),
        }
    }

    /// Applies the block.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let (b, c, h, w) = xs.size4().expect("NCHW");
        let n = h * w;
        // Per head, the channels are laid out [q | k | v].
        let qkv = self.qkv.forward_t(xs, train).view([
            b,
            self.num_heads,
            2 * self.key_dim + self.head_dim,
            n,
        ]);
        let parts = qkv.split_with_sizes([self.key_dim, self.key_dim, self.head_dim], 2);
        let (q, k, v) = (&parts[0], &parts[1], &parts[2]);
        let attn = (q * self.scale)
            .transpose(-2, -1)
            .matmul(k)
            .softmax(-1, q.kind());
        let attended = v.matmul(&attn.transpose(-2, -1)).view([b, c, h, w]);
        let y = attended + self.pe.forward_t(&v.reshape([b, c, h, w]), train);
        self.proj.forward_t(&y, train)
    }
}

/// Attention then a two-layer 1x1 feed-forward, each with a residual.
#[derive(Debug)]
pub struct PsaBlock {
    attn: Attention,
    ffn0: Conv,
    ffn1: Conv,
}

impl PsaBlock {
    /// `c` channels; the feed-forward widens to `2c`.
    pub fn new(p: &Path, c: i64, num_heads: i64) -> Self {
        let ffn = p / "ffn";
        PsaBlock {
            attn: Attention::new(&(p / "attn"), c, num_heads, 0.5),
            ffn0: Conv::plain(&(&ffn / 0), c, 2 * c, 1, 1),
            ffn1: Conv::new(&(&ffn / 1), 2 * c, c, 1, 1, 1, false),
        }
    }

    /// Applies the block.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let x = xs + self.attn.forward_t(xs, train);
        let f = self.ffn1.forward_t(&self.ffn0.forward_t(&x, train), train);
        x + f
    }
}

/// Ultralytics' `C2PSA`: a 1x1 conv split in two, attention blocks on the
/// second half, concatenated back and mixed by a 1x1 conv.
#[derive(Debug)]
pub struct C2Psa {
    cv1: Conv,
    cv2: Conv,
    m: Vec<PsaBlock>,
    c: i64,
}

impl C2Psa {
    /// `c1` channels in and out, `n` attention blocks on `c1 / 2`, one head
    /// per 64 channels.
    pub fn new(p: &Path, c1: i64, n: i64) -> Self {
        let c = c1 / 2;
        let heads = (c / 64).max(1);
        C2Psa {
            cv1: Conv::plain(&(p / "cv1"), c1, 2 * c, 1, 1),
            cv2: Conv::plain(&(p / "cv2"), 2 * c, c1, 1, 1),
            m: (0..n)
                .map(|i| PsaBlock::new(&(p / "m" / i), c, heads))
                .collect(),
            c,
        }
    }

    /// Applies the block.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let halves = self.cv1.forward_t(xs, train).split(self.c, 1);
        let mut b = halves[1].shallow_clone();
        for block in &self.m {
            b = block.forward_t(&b, train);
        }
        self.cv2
            .forward_t(&Tensor::cat(&[&halves[0], &b], 1), train)
    }
}

/// The class branch of one level of the detection head.
#[derive(Debug)]
enum ClassBranch {
    /// YOLOv8: two 3x3 convs.
    Legacy(Conv, Conv),
    /// YOLO11: two (depth-wise 3x3, pointwise 1x1) pairs.
    DepthWise([Conv; 4]),
}

/// Ultralytics' `Detect` (training form): per level a box branch giving
/// `4 * reg_max` DFL logits and a class branch giving `nc` logits.
#[derive(Debug)]
pub struct Detect {
    box_branch: Vec<(Conv, Conv, Conv2d)>,
    cls_branch: Vec<(ClassBranch, Conv2d)>,
    dfl_weight: Tensor,
    reg_max: i64,
}

impl Detect {
    /// A head over feature maps of `channels`, with `nc` classes. `legacy`
    /// selects YOLOv8's class branch. The final biases are initialised for
    /// `strides` as Ultralytics does (a prior of ~5 objects per 640 image).
    pub fn new(
        p: &Path,
        nc: i64,
        reg_max: i64,
        channels: &[i64],
        strides: &[f64],
        legacy: bool,
    ) -> Self {
        let c2 = 16.max(channels[0] / 4).max(4 * reg_max);
        let c3 = channels[0].max(nc.min(100));
        let mut box_branch = Vec::new();
        let mut cls_branch = Vec::new();
        for (i, (&x, &stride)) in channels.iter().zip(strides).enumerate() {
            let b = p / "cv2" / i;
            let last = Conv2d::new(&(&b / 2), c2, 4 * reg_max);
            // Each level starts by predicting ~2 bins into every side.
            last.fill_bias(2.0);
            box_branch.push((
                Conv::plain(&(&b / 0), x, c2, 3, 1),
                Conv::plain(&(&b / 1), c2, c2, 3, 1),
                last,
            ));

            let c = p / "cv3" / i;
            let branch = if legacy {
                ClassBranch::Legacy(
                    Conv::plain(&(&c / 0), x, c3, 3, 1),
                    Conv::plain(&(&c / 1), c3, c3, 3, 1),
                )
            } else {
                ClassBranch::DepthWise([
                    Conv::depthwise(&(&c / 0 / 0), x, x, 3),
                    Conv::plain(&(&c / 0 / 1), x, c3, 1, 1),
                    Conv::depthwise(&(&c / 1 / 0), c3, c3, 3),
                    Conv::plain(&(&c / 1 / 1), c3, c3, 1, 1),
                ])
            };
            let last = Conv2d::new(&(&c / 2), c3, nc);
            // Prior probability of an object of a class in a cell: 5 objects
            // per 640x640 image spread over nc classes and the level's cells.
            let cells = (640.0 / stride).powi(2);
            last.fill_bias((5.0 / nc as f64 / cells).ln());
            cls_branch.push((branch, last));
        }
        // The DFL expectation as a fixed 1x1 conv with weights 0..reg_max,
        // kept as a (non-trainable) variable because the checkpoint has it.
        let dfl_weight = (p / "dfl" / "conv").add(
            "weight",
            Tensor::arange(reg_max, (Kind::Float, p.device())).view([1, reg_max, 1, 1]),
            false,
        );
        Detect {
            box_branch,
            cls_branch,
            dfl_weight,
            reg_max,
        }
    }

    /// Raw outputs per level: `[N, 4 * reg_max + nc, H, W]`, box logits
    /// first.
    pub fn forward_t(&self, xs: &[Tensor], train: bool) -> Vec<Tensor> {
        xs.iter()
            .zip(self.box_branch.iter().zip(&self.cls_branch))
            .map(|(x, ((b0, b1, b2), (branch, c_last)))| {
                let boxes = b2.forward(&b1.forward_t(&b0.forward_t(x, train), train));
                let hidden = match branch {
                    ClassBranch::Legacy(c0, c1) => c1.forward_t(&c0.forward_t(x, train), train),
                    ClassBranch::DepthWise(convs) => convs
                        .iter()
                        .fold(x.shallow_clone(), |y, conv| conv.forward_t(&y, train)),
                };
                Tensor::cat(&[boxes, c_last.forward(&hidden)], 1)
            })
            .collect()
    }

    /// Distribution focal loss decoding: `[N, 4 * reg_max, A]` logits to
    /// `[N, 4, A]` expected distances (in grid cells), through the
    /// checkpoint's own `dfl.conv` weight.
    pub fn dfl(&self, boxes: &Tensor) -> Tensor {
        let (b, _, a) = boxes.size3().expect("[N, 4 * reg_max, A]");
        boxes
            .view([b, 4, self.reg_max, a])
            .transpose(2, 1)
            .softmax(1, boxes.kind())
            .conv2d(&self.dfl_weight, None::<&Tensor>, [1, 1], [0, 0], [1, 1], 1)
            .view([b, 4, a])
    }
}
