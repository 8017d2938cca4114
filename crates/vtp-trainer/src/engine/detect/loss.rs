//! The YOLOv8/YOLO11 detection loss, numerically the same as Ultralytics'
//! `v8DetectionLoss` (checked against the package by `tests/yolo_loss.rs`):
//!
//! * the head predicts, per anchor point, a distribution over `reg_max` bins
//!   for each of the four distances to the box's sides, and one logit per
//!   class;
//! * [`TaskAlignedAssigner`] picks the positive anchors of each ground truth
//!   and their soft class targets;
//! * the loss is BCE on the class logits against those targets, CIoU on the
//!   decoded boxes of the positives, and the distribution focal loss (DFL) on
//!   their distance bins; box and DFL terms are weighted per anchor by the
//!   anchor's target score, and all three are divided by the sum of target
//!   scores (at least 1).

use serde::{Deserialize, Serialize};
use tch::{Kind, Reduction, Tensor};

use super::anchors::{bbox2dist, dist2bbox, make_anchors};
use super::assigner::TaskAlignedAssigner;
use super::iou::{IOU_EPS, bbox_ciou};

/// Loss gains (Ultralytics defaults: box 7.5, cls 0.5, dfl 1.5).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossGains {
    /// Gain of the CIoU box term (`box` in Ultralytics' hyperparameters).
    pub box_gain: f64,
    /// Gain of the BCE classification term.
    pub cls: f64,
    /// Gain of the distribution focal loss term.
    pub dfl: f64,
}

impl Default for LossGains {
    fn default() -> Self {
        LossGains {
            box_gain: 7.5,
            cls: 0.5,
            dfl: 1.5,
        }
    }
}

/// The three parts, detached, after gains, before batch-size scaling (what
/// Ultralytics logs as box_loss, cls_loss, dfl_loss).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossParts {
    /// CIoU term times its gain.
    pub box_loss: f64,
    /// BCE term times its gain.
    pub cls_loss: f64,
    /// DFL term times its gain.
    pub dfl_loss: f64,
}

/// The detection loss of a YOLOv8/YOLO11 head with `nc` classes, `reg_max`
/// distance bins and three levels of `strides`.
#[derive(Debug)]
pub struct DetectionLoss {
    nc: i64,
    reg_max: i64,
    strides: [f64; 3],
    gains: LossGains,
    assigner: TaskAlignedAssigner,
}

impl DetectionLoss {
    /// The loss for a head with `nc` classes, `reg_max` bins per side (16 for
    /// YOLOv8/YOLO11) and `strides` (8, 16, 32), weighted by `gains`.
    pub fn new(nc: i64, reg_max: i64, strides: [f64; 3], gains: LossGains) -> Self {
        DetectionLoss {
            nc,
            reg_max,
            strides,
            gains,
            assigner: TaskAlignedAssigner::new(nc, &strides),
        }
    }

    /// `raw`: the head's per-level outputs [N, 4*reg_max + nc, H, W] (P3, P4,
    /// P5), as Ultralytics' Detect returns in training mode.
    /// `targets`: [M, 6] float rows (batch_index, class, cx, cy, w, h), box
    /// normalised 0..1 to the input image.
    /// Returns (loss to backpropagate: the sum of the three gained parts times
    /// the batch size, exactly as Ultralytics' `loss.sum() * batch_size`; the
    /// detached parts).
    pub fn compute(&self, raw: &[Tensor], targets: &Tensor) -> (Tensor, LossParts) {
        let no = 4 * self.reg_max + self.nc;
        let bs = raw[0].size()[0];
        let kind = raw[0].kind();
        let device = raw[0].device();

        // All levels' anchors side by side: [bs, no, A] -> boxes and classes,
        // anchor-major ([bs, A, 4*reg_max] and [bs, A, nc]).
        let flat: Vec<Tensor> = raw.iter().map(|r| r.view([bs, no, -1])).collect();
        let flat = Tensor::cat(&flat, 2);
        let parts = flat.split_with_sizes([4 * self.reg_max, self.nc], 1);
        let pred_dist = parts[0].permute([0, 2, 1]).contiguous();
        let pred_scores = parts[1].permute([0, 2, 1]).contiguous();

        let sizes: Vec<(i64, i64)> = raw
            .iter()
            .map(|r| {
                let s = r.size();
                (s[2], s[3])
            })
            .collect();
        let (points, stride_t) =
            make_anchors(&sizes, &self.strides[..raw.len()], 0.5, kind, device);
        // Input size (h, w) in pixels: the first level is stride-8 of it.
        let img_h = sizes[0].0 as f64 * self.strides[0];
        let img_w = sizes[0].1 as f64 * self.strides[0];

        let gt = self.pad_targets(&targets.to_device(device), bs, img_w, img_h, kind); // [bs, n, 5]
        let gt_labels = gt.narrow(2, 0, 1); // [bs, n, 1]
        let gt_bboxes = gt.narrow(2, 1, 4); // [bs, n, 4] pixels xyxy
        let mask_gt = gt_bboxes.sum_dim_intlist(2i64, true, kind).gt(0.0);

        let pred_bboxes = self.decode(&points, &pred_dist); // [bs, A, 4] grid units

        let assigned = self.assigner.assign(
            &pred_scores.detach().sigmoid(),
            &(pred_bboxes.detach() * &stride_t),
            &(&points * &stride_t),
            &gt_labels,
            &gt_bboxes,
            &mask_gt,
        );
        let target_scores = assigned.scores; // [bs, A, nc]
        // Never below 1: an image batch without boxes still divides safely.
        let score_sum = target_scores.sum(kind).clamp_min(1.0);

        let cls = pred_scores.binary_cross_entropy_with_logits::<Tensor>(
            &target_scores,
            None,
            None,
            Reduction::Sum,
        ) / &score_sum;

        let (iou, dfl) = self.box_losses(
            &pred_dist,
            &pred_bboxes,
            &points,
            &(assigned.bboxes / &stride_t),
            &target_scores,
            &score_sum,
            &assigned.fg,
        );

        let box_loss = iou * self.gains.box_gain;
        let cls_loss = cls * self.gains.cls;
        let dfl_loss = dfl * self.gains.dfl;
        let parts = LossParts {
            box_loss: box_loss.double_value(&[]),
            cls_loss: cls_loss.double_value(&[]),
            dfl_loss: dfl_loss.double_value(&[]),
        };
        let total = (box_loss + cls_loss + dfl_loss) * bs as f64;
        (total, parts)
    }

    /// `[M, 6]` normalised `xywh` rows to `[bs, n, 5]` (class, pixel `xyxy`)
    /// per image, `n` the most boxes in any image, padded with zero rows.
    fn pad_targets(&self, targets: &Tensor, bs: i64, img_w: f64, img_h: f64, kind: Kind) -> Tensor {
        let device = targets.device();
        let m = targets.size()[0];
        if m == 0 {
            return Tensor::zeros([bs, 0, 5], (kind, device));
        }
        let targets = targets.to_kind(kind);
        let image = targets.select(1, 0).to_kind(Kind::Int64); // [M]
        // Each row's rank among its image's rows, in the order given: the
        // running count of its image's one-hot column.
        let one_hot = image
            .unsqueeze(1)
            .eq_tensor(&Tensor::arange(bs, (Kind::Int64, device)).unsqueeze(0)); // [M, bs]
        let running = one_hot.cumsum(0, Kind::Int64);
        let rank = running.gather(1, &image.unsqueeze(1), false).squeeze_dim(1) - 1;
        let n = running.get(m - 1).max().int64_value(&[]);

        let scale = Tensor::from_slice(&[img_w, img_h, img_w, img_h])
            .to_kind(kind)
            .to_device(device);
        let xywh = targets.narrow(1, 2, 4) * scale;
        let half = xywh.narrow(1, 2, 2) / 2.0;
        let centre = xywh.narrow(1, 0, 2);
        let rows = Tensor::cat(
            &[targets.narrow(1, 1, 1), &centre - &half, &centre + &half],
            1,
        );
        Tensor::zeros([bs, n, 5], (kind, device)).index_put(
            &[Some(image), Some(rank)],
            &rows,
            false,
        )
    }

    /// Expected distance per side (softmax over the bins, weighted by the
    /// bin index) turned into `xyxy` boxes around the anchor points: grid
    /// units, `[bs, A, 4]`.
    fn decode(&self, points: &Tensor, pred_dist: &Tensor) -> Tensor {
        let (b, a, _) = pred_dist.size3().unwrap();
        let bins = Tensor::arange(self.reg_max, (pred_dist.kind(), pred_dist.device()));
        let dist = pred_dist
            .view([b, a, 4, self.reg_max])
            .softmax(3, pred_dist.kind())
            .matmul(&bins);
        dist2bbox(&dist, points, false, -1)
    }

    /// CIoU and DFL terms over the foreground anchors, each weighted by the
    /// anchor's target score and divided by `score_sum`. Boxes in grid units.
    #[allow(clippy::too_many_arguments)]
    fn box_losses(
        &self,
        pred_dist: &Tensor,
        pred_bboxes: &Tensor,
        points: &Tensor,
        target_bboxes: &Tensor,
        target_scores: &Tensor,
        score_sum: &Tensor,
        fg: &Tensor,
    ) -> (Tensor, Tensor) {
        let fg_idx = fg.nonzero(); // [P, 2]: (image, anchor)
        let index = [Some(fg_idx.select(1, 0)), Some(fg_idx.select(1, 1))];
        let weight = target_scores
            .index(&index)
            .sum_dim_intlist(-1i64, true, target_scores.kind()); // [P, 1]
        let iou = bbox_ciou(
            &pred_bboxes.index(&index),
            &target_bboxes.index(&index),
            IOU_EPS,
        ); // [P, 1]
        let miss: Tensor = 1.0 - iou;
        let loss_iou = (miss * &weight).sum(weight.kind()) / score_sum;

        // DFL: cross entropy of each side's bins against the two bins that
        // bracket the target distance, weighted by closeness.
        let target = bbox2dist(points, target_bboxes, self.reg_max - 1).index(&index); // [P, 4]
        let target = target.clamp(0.0, (self.reg_max - 1) as f64 - 0.01);
        let left = target.to_kind(Kind::Int64); // floor: distances are >= 0
        let right = &left + 1;
        let w_left = right.to_kind(target.kind()) - &target;
        let w_right = 1.0 - &w_left;
        let logp = pred_dist
            .index(&index)
            .view([-1, self.reg_max])
            .log_softmax(1, pred_dist.kind()); // [4P, reg_max]
        let pick = |bins: &Tensor| logp.gather(1, &bins.view([-1, 1]), false).view_as(bins);
        let per_side = -(pick(&left) * &w_left + pick(&right) * &w_right); // [P, 4]
        let loss_dfl = (per_side.mean_dim(-1i64, true, per_side.kind()) * &weight)
            .sum(weight.kind())
            / score_sum;
        (loss_iou, loss_dfl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    const NC: i64 = 3;

    fn raw_outputs(bs: i64, seed: i64) -> Vec<Tensor> {
        tch::manual_seed(seed);
        [(8, 8), (4, 4), (2, 2)]
            .iter()
            .map(|&(h, w)| {
                Tensor::randn([bs, 64 + NC, h, w], (Kind::Float, Device::Cpu))
                    .set_requires_grad(true)
            })
            .collect()
    }

    fn loss() -> DetectionLoss {
        DetectionLoss::new(NC, 16, [8.0, 16.0, 32.0], LossGains::default())
    }

    #[test]
    fn loss_is_finite_positive_and_differentiable() {
        let raw = raw_outputs(2, 1);
        let targets = Tensor::from_slice(&[
            0.0f32, 0.0, 0.5, 0.5, 0.4, 0.3, //
            0.0, 2.0, 0.2, 0.7, 0.1, 0.2, //
            1.0, 1.0, 0.6, 0.4, 0.5, 0.5,
        ])
        .view([3, 6]);
        let (total, parts) = loss().compute(&raw, &targets);
        let value = total.double_value(&[]);
        assert!(value.is_finite() && value > 0.0, "{value}");
        for part in [parts.box_loss, parts.cls_loss, parts.dfl_loss] {
            assert!(part.is_finite() && part > 0.0, "{parts:?}");
        }
        let sum = parts.box_loss + parts.cls_loss + parts.dfl_loss;
        assert!(
            (value - 2.0 * sum).abs() < 1e-4 * value,
            "{value} vs {parts:?}"
        );
        total.backward();
        for r in &raw {
            let g = r.grad();
            assert!(g.defined());
            assert!(g.isfinite().all().int64_value(&[]) == 1);
            assert!(g.abs().sum(Kind::Float).double_value(&[]) > 0.0);
        }
    }

    #[test]
    fn no_boxes_leaves_only_the_class_loss() {
        let raw = raw_outputs(2, 2);
        let (total, parts) =
            loss().compute(&raw, &Tensor::zeros([0, 6], (Kind::Float, Device::Cpu)));
        assert_eq!(parts.box_loss, 0.0);
        assert_eq!(parts.dfl_loss, 0.0);
        assert!(parts.cls_loss > 0.0 && parts.cls_loss.is_finite());
        total.backward();
        // Only the class channels learn (to predict background).
        let g = raw[0].grad();
        assert!(g.narrow(1, 0, 64).abs().sum(Kind::Float).double_value(&[]) == 0.0);
        assert!(g.narrow(1, 64, NC).abs().sum(Kind::Float).double_value(&[]) > 0.0);
    }

    #[test]
    fn an_image_without_boxes_beside_one_with_boxes_is_fine() {
        let raw = raw_outputs(2, 3);
        let targets = Tensor::from_slice(&[1.0f32, 0.0, 0.5, 0.5, 0.6, 0.6]).view([1, 6]);
        let (total, parts) = loss().compute(&raw, &targets);
        assert!(total.double_value(&[]).is_finite());
        assert!(parts.box_loss > 0.0 && parts.dfl_loss > 0.0, "{parts:?}");
    }

    #[test]
    fn targets_need_not_be_sorted_by_image() {
        let raw = raw_outputs(2, 4);
        let rows = [
            [1.0f32, 1.0, 0.6, 0.4, 0.5, 0.5],
            [0.0, 0.0, 0.5, 0.5, 0.4, 0.3],
            [1.0, 2.0, 0.2, 0.7, 0.1, 0.2],
        ];
        let sorted = Tensor::from_slice(&[rows[1], rows[0], rows[2]].concat()).view([3, 6]);
        let shuffled = Tensor::from_slice(&rows.concat()).view([3, 6]);
        let (a, _) = loss().compute(&raw, &sorted);
        let (b, _) = loss().compute(&raw, &shuffled);
        assert!((a.double_value(&[]) - b.double_value(&[])).abs() < 1e-6);
    }

    #[test]
    fn default_gains_are_ultralytics() {
        let g = LossGains::default();
        assert_eq!((g.box_gain, g.cls, g.dfl), (7.5, 0.5, 1.5));
    }
}
