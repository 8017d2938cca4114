//! Non-maximum suppression of decoded YOLO output, as Ultralytics'
//! `non_max_suppression` does it: confidence filter, optional multi-label,
//! a cap on candidates, class-aware greedy IoU suppression (boxes offset per
//! class), at most `max_det` kept.
//!
//! libtorch has no `nms` op without torchvision, so the cheap filtering of the
//! `[4 + nc, A]` scores runs as tensor ops (on the tensor's device) and only
//! the surviving candidates come to the CPU for the greedy O(k^2) pass.

use tch::{Device, Kind, Tensor};

/// One detected object.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Detection {
    /// Box corners `x1, y1, x2, y2` in input pixels.
    pub bbox: [f32; 4],
    /// Confidence, the class score in `0..1`.
    pub score: f32,
    /// Class index.
    pub class: usize,
}

/// Settings of [`non_max_suppression`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NmsConfig {
    /// Minimum score (exclusive) of a candidate: 0.25 to predict, 0.001 to validate.
    pub conf: f32,
    /// IoU (exclusive) above which a lower-scoring box is suppressed (0.7).
    pub iou: f32,
    /// Detections kept per image (300).
    pub max_det: usize,
    /// Candidates (best scores first) that enter the suppression (30000).
    pub max_candidates: usize,
    /// Suppress across classes too (false).
    pub class_agnostic: bool,
    /// A box once per class above `conf`, instead of once for its best class.
    pub multi_label: bool,
}

impl NmsConfig {
    /// Ultralytics' prediction settings: conf 0.25, IoU 0.7, 300 detections.
    pub fn predict() -> Self {
        Self {
            conf: 0.25,
            iou: 0.7,
            max_det: 300,
            max_candidates: 30_000,
            class_agnostic: false,
            multi_label: false,
        }
    }

    /// Ultralytics' validation settings: conf 0.001, IoU 0.7, 300
    /// detections, multi-label (a low threshold keeps the PR curve complete).
    pub fn val() -> Self {
        Self {
            conf: 0.001,
            multi_label: true,
            ..Self::predict()
        }
    }
}

impl Default for NmsConfig {
    fn default() -> Self {
        Self::predict()
    }
}

/// Per-class box offset for class-aware suppression (Ultralytics' `max_wh`):
/// boxes of different classes are moved apart so that they never overlap.
const CLASS_OFFSET: f32 = 7680.0;

/// A candidate before suppression: corners, score, class.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    bbox: [f32; 4],
    score: f32,
    class: usize,
}

/// `pred`: `[N, 4 + nc, A]` — boxes xywh (centre, size) in input pixels,
/// then class scores in `0..1` (the decoded YOLO output). Returns per image
/// its detections, best first.
///
/// Panics when `pred` is not three-dimensional with more than four channels.
pub fn non_max_suppression(pred: &Tensor, config: &NmsConfig) -> Vec<Vec<Detection>> {
    let (n, channels, _anchors) = pred
        .size3()
        .expect("non_max_suppression: pred must be [N, 4 + nc, A]");
    assert!(
        channels > 4,
        "non_max_suppression: pred has {channels} channels, needs 4 + nc with nc >= 1"
    );
    let nc = (channels - 4) as usize;
    let multi_label = config.multi_label && nc > 1;
    let pred = pred.detach().to_kind(Kind::Float);
    // Candidates: anchors whose best class clears the threshold. Done on the
    // tensor's device so only the survivors travel to the CPU.
    let keep = pred
        .narrow(1, 4, nc as i64)
        .amax([1i64].as_slice(), false)
        .gt(f64::from(config.conf));
    (0..n)
        .map(|i| {
            let idx = keep.get(i).nonzero().view([-1]);
            if idx.size()[0] == 0 {
                return Vec::new();
            }
            let rows = pred
                .get(i)
                .index_select(1, &idx)
                .transpose(0, 1)
                .contiguous()
                .to_device(Device::Cpu);
            let flat = Vec::<f32>::try_from(rows.view([-1]))
                .expect("non_max_suppression: float tensor to Vec<f32>");
            let candidates = candidates(&flat, nc, config.conf, multi_label);
            suppress(candidates, config)
        })
        .collect()
}

/// Rows `[x, y, w, h, scores...]` (row-major) as candidates over `conf`, in
/// anchor order (then class order when multi-label).
fn candidates(rows: &[f32], nc: usize, conf: f32, multi_label: bool) -> Vec<Candidate> {
    let width = 4 + nc;
    let mut out = Vec::with_capacity(rows.len() / width);
    for row in rows.chunks_exact(width) {
        let (x, y, w, h) = (row[0], row[1], row[2], row[3]);
        let bbox = [x - w / 2.0, y - h / 2.0, x + w / 2.0, y + h / 2.0];
        let scores = &row[4..];
        if multi_label {
            for (class, &score) in scores.iter().enumerate() {
                if score > conf {
                    out.push(Candidate { bbox, score, class });
                }
            }
        } else {
            // First maximum on ties, as torch's `max` picks.
            let (class, score) =
                scores
                    .iter()
                    .copied()
                    .enumerate()
                    .fold((0, f32::NEG_INFINITY), |best, (c, s)| {
                        if s > best.1 { (c, s) } else { best }
                    });
            if score > conf {
                out.push(Candidate { bbox, score, class });
            }
        }
    }
    out
}

/// Greedy suppression of `candidates`: best score first (ties keep the
/// candidate order, so results are deterministic), a box is dropped when its
/// IoU with a kept box exceeds `config.iou`.
fn suppress(mut candidates: Vec<Candidate>, config: &NmsConfig) -> Vec<Detection> {
    // Stable: equal scores stay in anchor order.
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    candidates.truncate(config.max_candidates);
    // Offset boxes per class so one IoU pass handles every class at once
    // (what Ultralytics does; boxes wider than the offset may still meet).
    let boxes: Vec<[f32; 4]> = candidates
        .iter()
        .map(|c| {
            let off = if config.class_agnostic {
                0.0
            } else {
                c.class as f32 * CLASS_OFFSET
            };
            c.bbox.map(|v| v + off)
        })
        .collect();
    let areas: Vec<f32> = boxes
        .iter()
        .map(|b| (b[2] - b[0]) * (b[3] - b[1]))
        .collect();
    let mut suppressed = vec![false; candidates.len()];
    let mut kept = Vec::with_capacity(config.max_det.min(candidates.len()));
    for i in 0..candidates.len() {
        if kept.len() >= config.max_det {
            // Greedy order means later keeps could only come after these.
            break;
        }
        if suppressed[i] {
            continue;
        }
        kept.push(Detection {
            bbox: candidates[i].bbox,
            score: candidates[i].score,
            class: candidates[i].class,
        });
        let bi = boxes[i];
        for j in i + 1..candidates.len() {
            if suppressed[j] {
                continue;
            }
            let bj = boxes[j];
            let w = (bi[2].min(bj[2]) - bi[0].max(bj[0])).max(0.0);
            let h = (bi[3].min(bj[3]) - bi[1].max(bj[1])).max(0.0);
            let inter = w * h;
            // As torchvision: suppress on IoU strictly above the threshold.
            if inter / (areas[i] + areas[j] - inter) > config.iou {
                suppressed[j] = true;
            }
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `[1, 4 + nc, A]` from boxes `(x1, y1, x2, y2)` and per-box scores.
    fn pred(boxes: &[[f32; 4]], scores: &[Vec<f32>]) -> Tensor {
        let nc = scores[0].len();
        let mut rows = Vec::new();
        for (b, s) in boxes.iter().zip(scores) {
            rows.extend_from_slice(&[
                (b[0] + b[2]) / 2.0,
                (b[1] + b[3]) / 2.0,
                b[2] - b[0],
                b[3] - b[1],
            ]);
            rows.extend_from_slice(s);
        }
        Tensor::from_slice(&rows)
            .view([boxes.len() as i64, 4 + nc as i64])
            .transpose(0, 1)
            .unsqueeze(0)
    }

    fn config() -> NmsConfig {
        NmsConfig {
            conf: 0.25,
            iou: 0.5,
            max_det: 300,
            max_candidates: 30_000,
            class_agnostic: false,
            multi_label: false,
        }
    }

    const A: [f32; 4] = [0.0, 0.0, 10.0, 10.0];
    const B: [f32; 4] = [1.0, 1.0, 11.0, 11.0]; // IoU with A: 81/119
    const FAR: [f32; 4] = [50.0, 50.0, 60.0, 60.0];

    #[test]
    fn suppresses_an_overlapping_lower_score_of_the_same_class() {
        let p = pred(
            &[B, A, FAR],
            &[vec![0.8, 0.0], vec![0.9, 0.0], vec![0.3, 0.0]],
        );
        let out = non_max_suppression(&p, &config());
        assert_eq!(out.len(), 1);
        let got: Vec<_> = out[0].iter().map(|d| (d.bbox, d.score, d.class)).collect();
        assert_eq!(got, vec![(A, 0.9, 0), (FAR, 0.3, 0)]);
    }

    #[test]
    fn keeps_an_overlapping_box_of_another_class_unless_agnostic() {
        let p = pred(&[A, B], &[vec![0.9, 0.1], vec![0.1, 0.8]]);
        let out = non_max_suppression(&p, &config());
        let classes: Vec<_> = out[0].iter().map(|d| d.class).collect();
        assert_eq!(classes, vec![0, 1]);
        let agnostic = NmsConfig {
            class_agnostic: true,
            ..config()
        };
        let out = non_max_suppression(&p, &agnostic);
        assert_eq!(out[0].len(), 1);
        assert_eq!(out[0][0].class, 0);
    }

    #[test]
    fn respects_conf_and_max_det() {
        let boxes: Vec<[f32; 4]> = (0..10)
            .map(|i| {
                let x = i as f32 * 20.0;
                [x, 0.0, x + 10.0, 10.0]
            })
            .collect();
        let scores: Vec<Vec<f32>> = (0..10).map(|i| vec![i as f32 / 10.0]).collect();
        let p = pred(&boxes, &scores);
        let out = non_max_suppression(&p, &config());
        // Scores 0.3..0.9 clear 0.25; best first.
        let got: Vec<_> = out[0].iter().map(|d| d.score).collect();
        assert_eq!(got, vec![0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]);
        let few = NmsConfig {
            max_det: 2,
            ..config()
        };
        let got: Vec<_> = non_max_suppression(&p, &few)[0]
            .iter()
            .map(|d| d.score)
            .collect();
        assert_eq!(got, vec![0.9, 0.8]);
        let capped = NmsConfig {
            max_candidates: 3,
            ..config()
        };
        assert_eq!(non_max_suppression(&p, &capped)[0].len(), 3);
    }

    #[test]
    fn multi_label_lists_a_box_once_per_class_over_conf() {
        let p = pred(&[A], &[vec![0.6, 0.5, 0.1]]);
        let single = non_max_suppression(&p, &config());
        assert_eq!(single[0].len(), 1);
        let multi = NmsConfig {
            multi_label: true,
            ..config()
        };
        let got: Vec<_> = non_max_suppression(&p, &multi)[0]
            .iter()
            .map(|d| (d.class, d.score))
            .collect();
        assert_eq!(got, vec![(0, 0.6), (1, 0.5)]);
    }

    #[test]
    fn batches_are_independent_and_ties_keep_anchor_order() {
        let one = pred(&[FAR, A], &[vec![0.5], vec![0.5]]);
        let none = pred(&[FAR, A], &[vec![0.1], vec![0.2]]);
        let p = Tensor::cat(&[one, none], 0);
        let out = non_max_suppression(&p, &config());
        assert_eq!(out.len(), 2);
        let got: Vec<_> = out[0].iter().map(|d| d.bbox).collect();
        assert_eq!(got, vec![FAR, A]);
        assert!(out[1].is_empty());
    }
}
