//! Box overlap measures for the detection loss and the assigner: plain IoU
//! and Complete IoU (CIoU, Zheng et al. 2020, arXiv:1911.08287), on boxes in
//! `xyxy` corner form.

use tch::Tensor;

/// The `eps` the YOLO loss uses in its IoU: it keeps the divisions finite for
/// degenerate (zero-area) boxes.
pub const IOU_EPS: f64 = 1e-7;

/// The four corners of `xyxy` boxes `[..., 4]`, each `[..., 1]`.
fn corners(boxes: &Tensor) -> (Tensor, Tensor, Tensor, Tensor) {
    let c = boxes.chunk(4, -1);
    (
        c[0].shallow_clone(),
        c[1].shallow_clone(),
        c[2].shallow_clone(),
        c[3].shallow_clone(),
    )
}

/// What IoU and CIoU share: `(iou, w1, h1, w2, h2)`, all `[..., 1]`.
/// The heights carry `eps` so the aspect-ratio term of CIoU never divides
/// by zero; the widths do not (the term only divides by heights).
fn iou_parts(box1: &Tensor, box2: &Tensor, eps: f64) -> [Tensor; 5] {
    let (ax1, ay1, ax2, ay2) = corners(box1);
    let (bx1, by1, bx2, by2) = corners(box2);
    let w1 = &ax2 - &ax1;
    let h1 = &ay2 - &ay1 + eps;
    let w2 = &bx2 - &bx1;
    let h2 = &by2 - &by1 + eps;
    let inter = (ax2.minimum(&bx2) - ax1.maximum(&bx1)).clamp_min(0.0)
        * (ay2.minimum(&by2) - ay1.maximum(&by1)).clamp_min(0.0);
    let union = &w1 * &h1 + &w2 * &h2 - &inter + eps;
    [inter / union, w1, h1, w2, h2]
}

/// Intersection over union of `xyxy` boxes, broadcast over the leading
/// dimensions: `[..., 4]` and `[..., 4]` give `[..., 1]`.
pub fn bbox_iou(box1: &Tensor, box2: &Tensor, eps: f64) -> Tensor {
    let [iou, ..] = iou_parts(box1, box2, eps);
    iou
}

/// Complete IoU of `xyxy` boxes, broadcast over the leading dimensions:
/// `[..., 4]` and `[..., 4]` give `[..., 1]`. It is IoU minus the squared
/// centre distance over the squared diagonal of the enclosing box, minus an
/// aspect-ratio consistency term `v * alpha`; `alpha` is treated as a
/// constant (no gradient through it), as the CIoU paper prescribes, so the
/// gradient of `v` alone steers the aspect ratio.
pub fn bbox_ciou(box1: &Tensor, box2: &Tensor, eps: f64) -> Tensor {
    let [iou, w1, h1, w2, h2] = iou_parts(box1, box2, eps);
    let (ax1, ay1, ax2, ay2) = corners(box1);
    let (bx1, by1, bx2, by2) = corners(box2);
    // Enclosing box's width and height, and its squared diagonal.
    let cw = ax2.maximum(&bx2) - ax1.minimum(&bx1);
    let ch = ay2.maximum(&by2) - ay1.minimum(&by1);
    let c2 = cw.square() + ch.square() + eps;
    // Squared distance of the centres (sums of corners are twice the centre).
    let rho2 = ((&bx1 + &bx2 - &ax1 - &ax2).square() + (&by1 + &by2 - &ay1 - &ay2).square()) / 4.0;
    let v = (4.0 / (std::f64::consts::PI * std::f64::consts::PI))
        * ((&w2 / &h2).atan() - (&w1 / &h1).atan()).square();
    let alpha = tch::no_grad(|| &v / (1.0 - &iou + &v + eps));
    iou - (rho2 / c2 + v * alpha)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxes(values: &[f32]) -> Tensor {
        Tensor::from_slice(values).view([-1, 4])
    }

    #[test]
    fn identical_boxes_have_ciou_one() {
        let b = boxes(&[1.0, 2.0, 5.0, 9.0, 0.0, 0.0, 3.0, 3.0]);
        let ciou: Vec<f32> = bbox_ciou(&b, &b, IOU_EPS).view([-1]).try_into().unwrap();
        for c in ciou {
            assert!((c - 1.0).abs() < 1e-6, "{c}");
        }
    }

    #[test]
    fn ciou_of_known_boxes_matches_a_hand_computation() {
        // a = (0,0)-(2,2), b = (1,0)-(4,2): intersection 1x2 = 2, union
        // 4 + 6 - 2 = 8, IoU 0.25. Enclosing box 4x2: c2 = 20. Centres
        // (1,1) and (2.5,1): rho2 = 2.25. Aspect: atan(3/2) - atan(1).
        let a = boxes(&[0.0, 0.0, 2.0, 2.0]);
        let b = boxes(&[1.0, 0.0, 4.0, 2.0]);
        let iou = 0.25f64;
        let v = 4.0 / std::f64::consts::PI.powi(2) * (1.5f64.atan() - 1.0f64.atan()).powi(2);
        let alpha = v / (1.0 - iou + v);
        let expected = iou - (2.25 / 20.0 + v * alpha);
        let got = bbox_ciou(&a, &b, IOU_EPS).double_value(&[0, 0]);
        assert!((got - expected).abs() < 1e-5, "{got} vs {expected}");
        let plain = bbox_iou(&a, &b, IOU_EPS).double_value(&[0, 0]);
        assert!((plain - iou).abs() < 1e-6, "{plain}");
    }

    #[test]
    fn disjoint_far_boxes_have_negative_ciou() {
        let a = boxes(&[0.0, 0.0, 1.0, 1.0]);
        let b = boxes(&[10.0, 10.0, 11.0, 11.0]);
        assert!(bbox_ciou(&a, &b, IOU_EPS).double_value(&[0, 0]) < 0.0);
    }

    #[test]
    fn ciou_broadcasts_pairs() {
        let gt = boxes(&[0.0, 0.0, 2.0, 2.0, 1.0, 1.0, 3.0, 3.0]).view([2, 1, 4]);
        let pd =
            boxes(&[0.0, 0.0, 2.0, 2.0, 1.0, 1.0, 3.0, 3.0, 5.0, 5.0, 6.0, 6.0]).view([1, 3, 4]);
        assert_eq!(bbox_ciou(&gt, &pd, IOU_EPS).size(), [2, 3, 1]);
    }
}
