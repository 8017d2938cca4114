//! Anchor points and the distance <-> box conversions that the YOLO head,
//! its loss and its decoder share. A YOLOv8-style head is anchor-free: every
//! cell of every feature map is one "anchor point" at the cell's centre, and
//! the head predicts the distances from that point to the box's four sides.

use tch::{Device, Kind, Tensor};

/// Anchor points of feature maps of `sizes` (height, width) with `strides`,
/// in grid units (cell centres, `+ offset`), all levels concatenated:
/// returns `(points [A, 2] as (x, y), strides [A, 1])`, where
/// `A = sum(h * w)`.
pub fn make_anchors(
    sizes: &[(i64, i64)],
    strides: &[f64],
    offset: f64,
    kind: Kind,
    device: Device,
) -> (Tensor, Tensor) {
    let mut points = Vec::with_capacity(sizes.len());
    let mut stride_tensor = Vec::with_capacity(sizes.len());
    for (&(h, w), &stride) in sizes.iter().zip(strides) {
        let sx = Tensor::arange(w, (kind, device)) + offset;
        let sy = Tensor::arange(h, (kind, device)) + offset;
        // Row-major over (y, x), matching the head's flattened H*W layout.
        let grid = Tensor::meshgrid_indexing(&[&sy, &sx], "ij");
        let xy = Tensor::stack(&[&grid[1], &grid[0]], -1).view([-1, 2]);
        points.push(xy);
        stride_tensor.push(Tensor::full([h * w, 1], stride, (kind, device)));
    }
    (Tensor::cat(&points, 0), Tensor::cat(&stride_tensor, 0))
}

/// Distances `(left, top, right, bottom)` from `points` to boxes, as boxes:
/// `xywh` (centre, size) or else `xyxy`. `dim` is the axis of the four values.
pub fn dist2bbox(distance: &Tensor, points: &Tensor, xywh: bool, dim: i64) -> Tensor {
    let parts = distance.chunk(2, dim);
    let (lt, rb) = (&parts[0], &parts[1]);
    let x1y1 = points - lt;
    let x2y2 = points + rb;
    if xywh {
        let centre = (&x1y1 + &x2y2) / 2.0;
        let size = x2y2 - x1y1;
        Tensor::cat(&[centre, size], dim)
    } else {
        Tensor::cat(&[x1y1, x2y2], dim)
    }
}

/// Boxes `xyxy` as distances from `points` to their sides, clamped to
/// `[0, reg_max - 0.01]` (the range the DFL bins can express).
pub fn bbox2dist(points: &Tensor, bbox: &Tensor, reg_max: i64) -> Tensor {
    let parts = bbox.chunk(2, -1);
    let lt = points - &parts[0];
    let rb = &parts[1] - points;
    Tensor::cat(&[lt, rb], -1).clamp(0.0, reg_max as f64 - 0.01)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anchors_are_cell_centres_in_row_major_order() {
        let (points, strides) = make_anchors(
            &[(2, 3), (1, 1)],
            &[8.0, 16.0],
            0.5,
            Kind::Float,
            Device::Cpu,
        );
        assert_eq!(points.size(), [7, 2]);
        let p: Vec<f32> = points.view([-1]).try_into().unwrap();
        assert_eq!(
            p,
            [
                0.5, 0.5, 1.5, 0.5, 2.5, 0.5, 0.5, 1.5, 1.5, 1.5, 2.5, 1.5, 0.5, 0.5
            ]
        );
        let s: Vec<f32> = strides.view([-1]).try_into().unwrap();
        assert_eq!(s, [8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 16.0]);
    }

    #[test]
    fn distances_and_boxes_round_trip() {
        let points = Tensor::from_slice(&[4.0f32, 5.0]).view([1, 2]);
        let boxes = Tensor::from_slice(&[2.0f32, 1.0, 7.0, 6.0]).view([1, 4]);
        let dist = bbox2dist(&points, &boxes, 16);
        let d: Vec<f32> = dist.view([-1]).try_into().unwrap();
        assert_eq!(d, [2.0, 4.0, 3.0, 1.0]);
        let back: Vec<f32> = dist2bbox(&dist, &points, false, -1)
            .view([-1])
            .try_into()
            .unwrap();
        assert_eq!(back, [2.0, 1.0, 7.0, 6.0]);
        let xywh: Vec<f32> = dist2bbox(&dist, &points, true, -1)
            .view([-1])
            .try_into()
            .unwrap();
        assert_eq!(xywh, [4.5, 3.5, 5.0, 5.0]);
    }
}
