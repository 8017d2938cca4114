//! Task-aligned assignment (TOOD, Feng et al. 2021, arXiv:2108.07755) as the
//! YOLOv8/YOLO11 loss uses it: which anchors learn which ground-truth box,
//! and with what soft classification target.
//!
//! For every ground truth the candidates are the anchor points inside it;
//! each candidate scores `s^alpha * u^beta` (`s`: the predicted probability
//! of the box's class, `u`: the CIoU of the predicted box with the ground
//! truth, floored at 0); the `topk` best become positives. An anchor that is
//! positive for several ground truths keeps the one it overlaps most. The
//! classification target of a positive is its metric rescaled so that each
//! ground truth's best anchor gets that ground truth's best IoU.

use tch::{Kind, Tensor};

use super::iou::{IOU_EPS, bbox_ciou};

/// The assigner's settings (the YOLO loss uses `topk` 10, `alpha` 0.5,
/// `beta` 6.0, `eps` 1e-9, and the model's strides).
#[derive(Debug, Clone, PartialEq)]
pub struct TaskAlignedAssigner {
    /// Positives kept per ground truth.
    pub topk: i64,
    /// A second cap on positives per ground truth, applied after the
    /// highest-overlap resolution; `topk` (the default) makes it a no-op.
    pub topk2: i64,
    /// Number of classes.
    pub num_classes: i64,
    /// Exponent of the classification score in the alignment metric.
    pub alpha: f64,
    /// Exponent of the IoU in the alignment metric.
    pub beta: f64,
    /// Ground-truth sides shorter than this (pixels) are widened to it, about
    /// the box's centre, when choosing the candidate anchors: a tiny box
    /// would otherwise contain no anchor point at all. It is the second
    /// level's stride (16 for YOLOv8/YOLO11).
    pub min_side: f64,
    /// Guards the divisions and the "inside the box" comparisons.
    pub eps: f64,
}

/// The assignment for a batch: `b` images, `A` anchors, `nc` classes.
#[derive(Debug)]
pub struct Assignment {
    /// Class index per anchor `[b, A]` (int64; meaningless where not `fg`).
    pub labels: Tensor,
    /// Assigned ground-truth box (pixels, `xyxy`) per anchor `[b, A, 4]`.
    pub bboxes: Tensor,
    /// Soft one-hot classification targets `[b, A, nc]` (zero for background).
    pub scores: Tensor,
    /// Foreground anchors `[b, A]` (bool).
    pub fg: Tensor,
    /// Index of the assigned ground truth within its image `[b, A]` (int64).
    pub gt_index: Tensor,
}

impl TaskAlignedAssigner {
    /// The YOLOv8/YOLO11 loss's assigner for `num_classes` classes and a head
    /// with `strides` (the candidate floor is the second stride).
    pub fn new(num_classes: i64, strides: &[f64]) -> Self {
        let min_side = strides.get(1).or(strides.first()).copied().unwrap_or(16.0);
        TaskAlignedAssigner {
            topk: 10,
            topk2: 10,
            num_classes,
            alpha: 0.5,
            beta: 6.0,
            min_side,
            eps: 1e-9,
        }
    }

    /// Assigns ground truths to anchors. Inputs, all without gradient:
    /// `pd_scores [b, A, nc]` (probabilities), `pd_bboxes [b, A, 4]` (pixels,
    /// `xyxy`), `anchors [A, 2]` (pixels), `gt_labels [b, n, 1]`,
    /// `gt_bboxes [b, n, 4]` (pixels, `xyxy`), `mask_gt [b, n, 1]` (bool: the
    /// row is a real box, not padding).
    pub fn assign(
        &self,
        pd_scores: &Tensor,
        pd_bboxes: &Tensor,
        anchors: &Tensor,
        gt_labels: &Tensor,
        gt_bboxes: &Tensor,
        mask_gt: &Tensor,
    ) -> Assignment {
        tch::no_grad(|| {
            self.assign_inner(pd_scores, pd_bboxes, anchors, gt_labels, gt_bboxes, mask_gt)
        })
    }

    fn assign_inner(
        &self,
        pd_scores: &Tensor,
        pd_bboxes: &Tensor,
        anchors: &Tensor,
        gt_labels: &Tensor,
        gt_bboxes: &Tensor,
        mask_gt: &Tensor,
    ) -> Assignment {
        let (b, na, nc) = pd_scores.size3().unwrap();
        let n = gt_bboxes.size()[1];
        let device = pd_scores.device();
        if n == 0 {
            // No ground truth anywhere in the batch: all background.
            return Assignment {
                labels: Tensor::full([b, na], nc, (Kind::Int64, device)),
                bboxes: pd_bboxes.zeros_like(),
                scores: pd_scores.zeros_like(),
                fg: Tensor::zeros([b, na], (Kind::Bool, device)),
                gt_index: Tensor::zeros([b, na], (Kind::Int64, device)),
            };
        }
        let mask_gt = mask_gt.to_kind(Kind::Bool);

        // Candidates: anchors inside the (floored) box, [b, n, A].
        let in_gts = self.anchors_in_boxes(anchors, gt_bboxes, &mask_gt);
        let candidates = in_gts.logical_and(&mask_gt);
        let (align, overlaps) = self.metrics(
            pd_scores,
            pd_bboxes,
            gt_labels,
            gt_bboxes,
            &candidates,
            [b, n, na],
        );

        // The topk per ground truth, [b, n, A], restricted to candidates.
        let topk = self.topk_mask(&align, &mask_gt);
        let mask_pos = topk.logical_and(&in_gts).logical_and(&mask_gt);

        let (gt_index, fg, mask_pos) = self.resolve_multiple(&mask_pos, &overlaps, &align, n);

        // Targets gathered from each anchor's ground truth.
        let flat = &gt_index + Tensor::arange(b, (Kind::Int64, device)).unsqueeze(-1) * n; // [b, A]
        let labels = gt_labels
            .to_kind(Kind::Int64)
            .flatten(0, -1)
            .index_select(0, &flat.flatten(0, -1))
            .view([b, na]);
        let bboxes = gt_bboxes
            .view([-1, 4])
            .index_select(0, &flat.flatten(0, -1))
            .view([b, na, 4]);
        let labels = labels.clamp_min(0);
        let one_hot = Tensor::zeros([b, na, self.num_classes], (pd_scores.kind(), device))
            .scatter_value(2, &labels.unsqueeze(-1), 1.0)
            * fg.unsqueeze(-1).to_kind(pd_scores.kind());

        // Normalised alignment: per ground truth, metric * (best IoU / best
        // metric) over its positives, then per anchor the largest over gts.
        let pos = mask_pos.to_kind(align.kind());
        let align = align * &pos;
        let best_align = align.amax([-1], true); // [b, n, 1]
        let overlaps = overlaps * &pos;
        let best_overlap = overlaps.amax([-1], true); // [b, n, 1]
        let norm = (align * best_overlap / (best_align + self.eps))
            .amax([-2], false)
            .unsqueeze(-1); // [b, A, 1]
        let scores = one_hot * norm;

        Assignment {
            labels,
            bboxes,
            scores,
            fg,
            gt_index,
        }
    }

    /// `[b, n, A]` bool: the anchor point lies strictly inside the ground
    /// truth, whose sides shorter than `min_side` are first widened to it.
    fn anchors_in_boxes(&self, anchors: &Tensor, gt_bboxes: &Tensor, mask_gt: &Tensor) -> Tensor {
        let xy = gt_bboxes.chunk(2, -1);
        let centre = (&xy[0] + &xy[1]) / 2.0;
        let size = &xy[1] - &xy[0];
        // Padding rows (mask_gt false) stay as they are: zero boxes.
        let small = size.lt(self.min_side).logical_and(mask_gt);
        let size = size.masked_fill(&small, self.min_side);
        let lt = (&centre - &size / 2.0).unsqueeze(2); // [b, n, 1, 2]
        let rb = (&centre + &size / 2.0).unsqueeze(2);
        let d_lt = anchors - lt; // [b, n, A, 2]
        let d_rb = rb - anchors;
        Tensor::cat(&[d_lt, d_rb], -1)
            .gt(self.eps)
            .all_dim(-1, false)
    }

    /// Alignment metric and CIoU `[b, n, A]`, computed only on the
    /// `candidates` pairs (zero elsewhere): a dense `[b, n, A]` CIoU would
    /// cost far more than the few anchors inside each box.
    fn metrics(
        &self,
        pd_scores: &Tensor,
        pd_bboxes: &Tensor,
        gt_labels: &Tensor,
        gt_bboxes: &Tensor,
        candidates: &Tensor,
        shape: [i64; 3],
    ) -> (Tensor, Tensor) {
        let idx = candidates.nonzero(); // [K, 3]: (image, gt, anchor)
        let (bi, gi, ai) = (idx.select(1, 0), idx.select(1, 1), idx.select(1, 2));
        let class = gt_labels
            .index(&[Some(&bi), Some(&gi)])
            .select(-1, 0)
            .to_kind(Kind::Int64);
        let score = pd_scores.index(&[Some(&bi), Some(&ai), Some(&class)]); // [K]
        let gt = gt_bboxes.index(&[Some(&bi), Some(&gi)]); // [K, 4]
        let pd = pd_bboxes.index(&[Some(&bi), Some(&ai)]); // [K, 4]
        let overlap = bbox_ciou(&gt, &pd, IOU_EPS).squeeze_dim(-1).clamp_min(0.0);
        let align = score.pow_tensor_scalar(self.alpha) * overlap.pow_tensor_scalar(self.beta);
        let indices = [Some(bi), Some(gi), Some(ai)];
        let device = pd_scores.device();
        let overlaps =
            Tensor::zeros(shape, (pd_bboxes.kind(), device)).index_put(&indices, &overlap, false);
        let align = Tensor::zeros(shape, (align.kind(), device)).index_put(&indices, &align, false);
        (align, overlaps)
    }

    /// `[b, n, A]` bool: the `topk` anchors of highest metric per real
    /// ground truth. Padding rows pick nothing: their indices are all sent to
    /// anchor 0, and an anchor picked more than once is dropped.
    fn topk_mask(&self, align: &Tensor, mask_gt: &Tensor) -> Tensor {
        let na = align.size()[2];
        let k = self.topk.min(na);
        let (_, idx) = align.topk(k, -1, true, true); // [b, n, k]
        let idx = idx.masked_fill(&mask_gt.logical_not(), 0);
        let count = align
            .zeros_like()
            .to_kind(Kind::Int64)
            .scatter_add(-1, &idx, &idx.ones_like());
        count.eq(1)
    }

    /// Resolves anchors positive for several ground truths to the one of
    /// highest IoU, then applies `topk2`. Returns the ground-truth index per
    /// anchor `[b, A]`, the foreground `[b, A]` and the final positive mask
    /// `[b, n, A]` (bool).
    fn resolve_multiple(
        &self,
        mask_pos: &Tensor,
        overlaps: &Tensor,
        align: &Tensor,
        n: i64,
    ) -> (Tensor, Tensor, Tensor) {
        let per_anchor = mask_pos.sum_dim_intlist(-2i64, true, Kind::Int64); // [b, 1, A]
        let multi = per_anchor.gt(1).expand([-1, n, -1], false);
        let (_, best) = overlaps.max_dim(1, true); // [b, 1, A]
        let is_best = mask_pos
            .zeros_like()
            .scatter_value(1, &best, 1)
            .to_kind(Kind::Bool);
        let mut mask_pos = is_best.where_self(&multi, mask_pos);
        if self.topk2 != self.topk {
            let k = self.topk2.min(align.size()[2]);
            let kept = align * mask_pos.to_kind(align.kind());
            let (_, idx) = kept.topk(k, -1, true, true);
            let top = mask_pos
                .zeros_like()
                .scatter_value(-1, &idx, 1)
                .to_kind(Kind::Bool);
            mask_pos = mask_pos.logical_and(&top);
        }
        // Column max: whether any gt claims the anchor, and which.
        let (fg, gt_index) = mask_pos.to_kind(Kind::Uint8).max_dim(-2, false);
        (gt_index, fg.to_kind(Kind::Bool), mask_pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::detect::anchors::make_anchors;
    use tch::Device;

    /// One image with one box, scores and predictions uniform: the box's
    /// positives are anchors inside it, and only those.
    #[test]
    fn positives_lie_inside_their_box() {
        let (points, strides) = make_anchors(
            &[(8, 8), (4, 4), (2, 2)],
            &[8.0, 16.0, 32.0],
            0.5,
            Kind::Float,
            Device::Cpu,
        );
        let anchors = &points * &strides; // [84, 2] pixels
        let na = anchors.size()[0];
        let nc = 2;
        let pd_scores = Tensor::full([1, na, nc], 0.5, (Kind::Float, Device::Cpu));
        // Every prediction is a 20x20 box around its own anchor.
        let pd_bboxes = Tensor::cat(&[&anchors - 10.0, &anchors + 10.0], -1).unsqueeze(0);
        let gt = Tensor::from_slice(&[8.0f32, 8.0, 40.0, 36.0]).view([1, 1, 4]);
        let labels = Tensor::from_slice(&[1.0f32]).view([1, 1, 1]);
        let mask = Tensor::from_slice(&[true]).view([1, 1, 1]);
        let assigner = TaskAlignedAssigner::new(nc, &[8.0, 16.0, 32.0]);
        let a = assigner.assign(&pd_scores, &pd_bboxes, &anchors, &labels, &gt, &mask);

        let fg: Vec<bool> = a.fg.view([-1]).try_into().unwrap();
        let xy: Vec<f32> = anchors.view([-1]).try_into().unwrap();
        let positives = fg.iter().filter(|&&f| f).count();
        assert!(positives > 0 && positives <= 10, "{positives} positives");
        for (i, &f) in fg.iter().enumerate() {
            let (x, y) = (xy[2 * i], xy[2 * i + 1]);
            let inside = x > 8.0 && x < 40.0 && y > 8.0 && y < 36.0;
            assert!(
                !f || inside,
                "anchor {i} at ({x}, {y}) assigned but outside"
            );
        }
        // Positives get the box's class with a positive soft score; the rest
        // get nothing.
        let scores = a.scores.view([-1, nc]);
        let fg_t = a.fg.view([-1]);
        assert!(scores.select(1, 0).abs().sum(Kind::Float).double_value(&[]) == 0.0);
        let on = scores.select(1, 1).masked_select(&fg_t);
        assert!(on.min().double_value(&[]) > 0.0);
        assert!(
            scores
                .select(1, 1)
                .masked_select(&fg_t.logical_not())
                .abs()
                .sum(Kind::Float)
                .double_value(&[])
                == 0.0
        );
        let boxes = a
            .bboxes
            .view([-1, 4])
            .index(&[Some(fg_t.nonzero().squeeze_dim(-1))]);
        assert!(boxes.eq_tensor(&gt.view([1, 4])).all().int64_value(&[]) == 1);
    }

    /// Padding rows and an empty batch assign nothing.
    #[test]
    fn padding_and_empty_batches_assign_nothing() {
        let (points, strides) = make_anchors(&[(4, 4)], &[8.0], 0.5, Kind::Float, Device::Cpu);
        let anchors = &points * &strides;
        let pd_scores = Tensor::full([2, 16, 3], 0.5, (Kind::Float, Device::Cpu));
        let pd_bboxes = Tensor::cat(&[&anchors - 4.0, &anchors + 4.0], -1)
            .unsqueeze(0)
            .repeat([2, 1, 1]);
        let assigner = TaskAlignedAssigner::new(3, &[8.0]);
        // Image 0 has one box; image 1 only a padding row.
        let gt = Tensor::from_slice(&[0.0f32, 0.0, 16.0, 16.0, 0.0, 0.0, 0.0, 0.0]).view([2, 1, 4]);
        let labels = Tensor::zeros([2, 1, 1], (Kind::Float, Device::Cpu));
        let mask = Tensor::from_slice(&[true, false]).view([2, 1, 1]);
        let a = assigner.assign(&pd_scores, &pd_bboxes, &anchors, &labels, &gt, &mask);
        assert!(a.fg.get(0).any().int64_value(&[]) == 1);
        assert!(a.fg.get(1).any().int64_value(&[]) == 0);

        let empty = Tensor::zeros([2, 0, 4], (Kind::Float, Device::Cpu));
        let a = assigner.assign(
            &pd_scores,
            &pd_bboxes,
            &anchors,
            &Tensor::zeros([2, 0, 1], (Kind::Float, Device::Cpu)),
            &empty,
            &Tensor::zeros([2, 0, 1], (Kind::Bool, Device::Cpu)),
        );
        assert!(a.fg.any().int64_value(&[]) == 0);
        assert_eq!(a.scores.size(), [2, 16, 3]);
    }
}
