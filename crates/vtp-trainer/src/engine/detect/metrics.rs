//! Detection scores: COCO mAP exactly as pycocotools' `COCOeval` computes it
//! for boxes (area range "all", 100 detections per image and class), and
//! precision and recall as Ultralytics reports them (IoU 0.5, at the
//! confidence that maximises the mean F1 over classes).
//!
//! [`MapEvaluator::add_image`] does the per-image matching as each batch is
//! validated, so [`MapEvaluator::finish`] only sorts and sums.

pub use super::nms::{Detection, NmsConfig, non_max_suppression};

/// IoU thresholds 0.50:0.05:0.95.
const IOU_THRESHOLDS: usize = 10;
/// Recall points 0:0.01:1 at which precision is sampled.
const RECALL_POINTS: usize = 101;
/// COCO's `maxDets` for the headline numbers: detections per image and class.
const MAX_DETS: usize = 100;
/// Points of Ultralytics' confidence grid for the precision / recall curves.
const CONF_POINTS: usize = 1000;

/// `np.linspace(start, stop, num)` value `i`: `i * step + start`, the last one
/// exactly `stop`. Replicated bit for bit because the thresholds decide
/// matches at their edges (0.9 is `0.8999999999999999` there).
fn linspace(start: f64, stop: f64, num: usize, i: usize) -> f64 {
    if i + 1 == num {
        return stop;
    }
    let step = (stop - start) / (num - 1) as f64;
    i as f64 * step + start
}

/// Ground truth of one image.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GroundTruth {
    /// Box corners `x1, y1, x2, y2` in the same pixels as the detections.
    pub bbox: [f32; 4],
    /// Class index.
    pub class: usize,
}

/// One detection after matching: its score, and per IoU threshold (bit `t`)
/// whether it matched a ground truth.
#[derive(Debug, Clone, Copy)]
struct Scored {
    score: f32,
    matched: u16,
    /// Among the image's top [`MAX_DETS`] of its class, which COCO scores;
    /// the rest count only for precision / recall.
    coco: bool,
}

/// Accumulates images, then scores them the COCO way.
#[derive(Debug, Clone)]
pub struct MapEvaluator {
    /// Per class, its detections in image order, each image's best first.
    dets: Vec<Vec<Scored>>,
    /// Per class, ground truths seen.
    gts: Vec<usize>,
    images: usize,
    iou_thresholds: [f64; IOU_THRESHOLDS],
}

impl MapEvaluator {
    /// An evaluator for `nc` classes.
    pub fn new(nc: usize) -> Self {
        Self {
            dets: vec![Vec::new(); nc],
            gts: vec![0; nc],
            images: 0,
            iou_thresholds: std::array::from_fn(|i| linspace(0.5, 0.95, IOU_THRESHOLDS, i)),
        }
    }

    /// Matches one image's detections to its ground truth. Classes at or
    /// beyond `nc` are ignored.
    pub fn add_image(&mut self, gts: &[GroundTruth], dets: &[Detection]) {
        self.images += 1;
        let nc = self.gts.len();
        // Group by class, keeping the given order (COCO's ties follow it).
        let mut gt_by_class: Vec<Vec<[f64; 4]>> = vec![Vec::new(); nc];
        for g in gts.iter().filter(|g| g.class < nc) {
            gt_by_class[g.class].push(xywh(&g.bbox));
        }
        let mut det_by_class: Vec<Vec<&Detection>> = vec![Vec::new(); nc];
        for d in dets.iter().filter(|d| d.class < nc) {
            det_by_class[d.class].push(d);
        }
        let mut ious = Vec::new();
        let mut gt_taken = Vec::new();
        for (class, (g, mut d)) in gt_by_class.into_iter().zip(det_by_class).enumerate() {
            self.gts[class] += g.len();
            if d.is_empty() {
                continue;
            }
            // Stable, like COCO's mergesort on -score.
            d.sort_by(|a, b| b.score.total_cmp(&a.score));
            ious.clear();
            for det in &d {
                let db = xywh(&det.bbox);
                ious.extend(g.iter().map(|gb| coco_iou(&db, gb)));
            }
            let first = self.dets[class].len();
            self.dets[class].extend(d.iter().enumerate().map(|(rank, det)| Scored {
                score: det.score,
                matched: 0,
                coco: rank < MAX_DETS,
            }));
            let scored = &mut self.dets[class][first..];
            for (t, &threshold) in self.iou_thresholds.iter().enumerate() {
                gt_taken.clear();
                gt_taken.resize(g.len(), false);
                // The greedy matching runs over all detections: COCO's top
                // 100 are a prefix, so their matches are COCO's exactly.
                for (di, s) in scored.iter_mut().enumerate() {
                    let row = &ious[di * g.len()..(di + 1) * g.len()];
                    let mut best = threshold.min(1.0 - 1e-10);
                    let mut m = None;
                    for (gi, &iou) in row.iter().enumerate() {
                        // COCO takes the last of equal IoUs: `<` skips, `>=` wins.
                        if gt_taken[gi] || iou < best {
                            continue;
                        }
                        best = iou;
                        m = Some(gi);
                    }
                    if let Some(gi) = m {
                        gt_taken[gi] = true;
                        s.matched |= 1 << t;
                    }
                }
            }
        }
    }

    /// The scores over all images added so far.
    pub fn finish(&self) -> DetectionMetrics {
        let mut per_class_map = vec![None; self.gts.len()];
        let mut ap_sum = [0.0f64; IOU_THRESHOLDS];
        let mut with_gt = 0usize;
        let recall_thresholds: Vec<f64> = (0..RECALL_POINTS)
            .map(|i| linspace(0.0, 1.0, RECALL_POINTS, i))
            .collect();
        let mut sorted = Vec::new();
        let mut pr = Vec::new();
        for ((class_map, &npig), dets) in per_class_map.iter_mut().zip(&self.gts).zip(&self.dets) {
            // COCO marks classes without ground truth -1 and leaves them out.
            if npig == 0 {
                continue;
            }
            with_gt += 1;
            sorted.clear();
            sorted.extend(dets.iter().filter(|s| s.coco).copied());
            sorted.sort_by(|a, b| b.score.total_cmp(&a.score));
            let mut class_sum = 0.0;
            for (t, ap) in ap_sum.iter_mut().enumerate() {
                let a = coco_ap(&sorted, t, npig, &recall_thresholds, &mut pr);
                *ap += a;
                class_sum += a;
            }
            *class_map = Some(class_sum / IOU_THRESHOLDS as f64);
        }
        let (map50, map) = if with_gt == 0 {
            (0.0, 0.0)
        } else {
            let n = with_gt as f64;
            (
                ap_sum[0] / n,
                ap_sum.iter().sum::<f64>() / (n * IOU_THRESHOLDS as f64),
            )
        };
        let (precision, recall) = self.max_f1_precision_recall();
        DetectionMetrics {
            precision,
            recall,
            map50,
            map,
            per_class_map,
            images: self.images,
            instances: self.gts.iter().sum(),
        }
    }

    /// Ultralytics' precision and recall: per class (with ground truth) the
    /// precision and recall at IoU 0.5 as functions of the confidence,
    /// interpolated on a 1000-point grid; the grid point that maximises the
    /// smoothed mean F1 picks the reported mean precision and recall.
    fn max_f1_precision_recall(&self) -> (f64, f64) {
        const EPS: f64 = 1e-16;
        let grid: Vec<f64> = (0..CONF_POINTS)
            .map(|i| -linspace(0.0, 1.0, CONF_POINTS, i))
            .collect();
        let classes: Vec<usize> = (0..self.gts.len()).filter(|&c| self.gts[c] > 0).collect();
        if classes.is_empty() {
            return (0.0, 0.0);
        }
        let mut p_curves = Vec::with_capacity(classes.len());
        let mut r_curves = Vec::with_capacity(classes.len());
        let mut sorted = Vec::new();
        for &class in &classes {
            sorted.clear();
            sorted.extend_from_slice(&self.dets[class]);
            if sorted.is_empty() {
                p_curves.push(vec![0.0; CONF_POINTS]);
                r_curves.push(vec![0.0; CONF_POINTS]);
                continue;
            }
            sorted.sort_by(|a, b| b.score.total_cmp(&a.score));
            let n_l = self.gts[class] as f64;
            let neg_conf: Vec<f64> = sorted.iter().map(|s| -f64::from(s.score)).collect();
            let (mut tp, mut fp) = (0.0, 0.0);
            let mut recall = Vec::with_capacity(sorted.len());
            let mut precision = Vec::with_capacity(sorted.len());
            for s in &sorted {
                if s.matched & 1 != 0 {
                    tp += 1.0;
                } else {
                    fp += 1.0;
                }
                recall.push(tp / (n_l + EPS));
                precision.push(tp / (tp + fp));
            }
            r_curves.push(
                grid.iter()
                    .map(|&x| interp(x, &neg_conf, &recall, 0.0))
                    .collect(),
            );
            p_curves.push(
                grid.iter()
                    .map(|&x| interp(x, &neg_conf, &precision, 1.0))
                    .collect(),
            );
        }
        let nc = classes.len() as f64;
        let mean_f1: Vec<f64> = (0..CONF_POINTS)
            .map(|i| {
                p_curves
                    .iter()
                    .zip(&r_curves)
                    .map(|(p, r)| 2.0 * p[i] * r[i] / (p[i] + r[i] + EPS))
                    .sum::<f64>()
                    / nc
            })
            .collect();
        let smoothed = smooth(&mean_f1, 0.1);
        // First maximum, as `argmax`.
        let best = smoothed
            .iter()
            .enumerate()
            .fold(
                (0, f64::NEG_INFINITY),
                |b, (i, &v)| if v > b.1 { (i, v) } else { b },
            )
            .0;
        let p = p_curves.iter().map(|c| c[best]).sum::<f64>() / nc;
        let r = r_curves.iter().map(|c| c[best]).sum::<f64>() / nc;
        (p, r)
    }
}

/// Corners as COCO's `x, y, w, h`, in f64 as pycocotools reads them.
fn xywh(b: &[f32; 4]) -> [f64; 4] {
    let [x1, y1, x2, y2] = b.map(f64::from);
    [x1, y1, x2 - x1, y2 - y1]
}

/// IoU of two `xywh` boxes the way pycocotools' `bbIou` computes it (no +1,
/// zero without overlap).
fn coco_iou(d: &[f64; 4], g: &[f64; 4]) -> f64 {
    let w = (d[2] + d[0]).min(g[2] + g[0]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[3] + d[1]).min(g[3] + g[1]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let i = w * h;
    i / (d[2] * d[3] + g[2] * g[3] - i)
}

/// COCO's AP of one class at threshold `t` from its detections sorted best
/// first: the precision envelope sampled at the recall thresholds (the first
/// detection reaching each, `searchsorted` 'left'; 0 past the last), averaged.
fn coco_ap(sorted: &[Scored], t: usize, npig: usize, rec_thrs: &[f64], pr: &mut Vec<f64>) -> f64 {
    let npig = npig as f64;
    pr.clear();
    let mut rc = Vec::with_capacity(sorted.len());
    let (mut tp, mut fp) = (0.0, 0.0);
    for s in sorted {
        if s.matched & (1 << t) != 0 {
            tp += 1.0;
        } else {
            fp += 1.0;
        }
        rc.push(tp / npig);
        pr.push(tp / (fp + tp + f64::EPSILON));
    }
    for i in (1..pr.len()).rev() {
        if pr[i] > pr[i - 1] {
            pr[i - 1] = pr[i];
        }
    }
    let mut sum = 0.0;
    let mut idx = 0;
    for &thr in rec_thrs {
        // rc is non-decreasing and so are the thresholds: walk forward.
        while idx < rc.len() && rc[idx] < thr {
            idx += 1;
        }
        if idx == rc.len() {
            break;
        }
        sum += pr[idx];
    }
    sum / rec_thrs.len() as f64
}

/// `np.interp(x, xp, fp, left=left)` for increasing (not strictly) `xp`.
fn interp(x: f64, xp: &[f64], fp: &[f64], left: f64) -> f64 {
    let last = xp.len() - 1;
    if x < xp[0] {
        return left;
    }
    if x >= xp[last] {
        return fp[last];
    }
    // The last j with xp[j] <= x; then xp[j + 1] > x.
    let j = xp.partition_point(|&v| v <= x) - 1;
    if xp[j] == x {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / (xp[j + 1] - xp[j]);
    slope * (x - xp[j]) + fp[j]
}

/// Box filter over a fraction `f` of `y`'s length, edges padded with the end
/// values (Ultralytics smooths the F1 curve so one noisy point cannot win).
fn smooth(y: &[f64], f: f64) -> Vec<f64> {
    let nf = ((y.len() as f64 * f * 2.0).round() as usize) / 2 + 1;
    let pad = nf / 2;
    let at = |i: usize| -> f64 {
        if i < pad {
            y[0]
        } else if i - pad >= y.len() {
            y[y.len() - 1]
        } else {
            y[i - pad]
        }
    };
    (0..y.len())
        .map(|i| (i..i + nf).map(|k| at(k) / nf as f64).sum())
        .collect()
}

/// Scores of a validation run.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct DetectionMetrics {
    /// Mean precision over classes with ground truth at IoU 0.5, at the
    /// confidence that maximises the mean F1 (as Ultralytics reports it).
    pub precision: f64,
    /// Mean recall, at the same IoU and confidence as `precision`.
    pub recall: f64,
    /// COCO AP at IoU 0.5, averaged over classes with ground truth.
    pub map50: f64,
    /// COCO AP over IoU 0.5:0.05:0.95 (mAP50-95).
    pub map: f64,
    /// Per class its mAP50-95; `None` for classes without ground truth.
    pub per_class_map: Vec<Option<f64>>,
    /// Images evaluated.
    pub images: usize,
    /// Ground-truth boxes over all images.
    pub instances: usize,
}

impl DetectionMetrics {
    /// The fitness that picks the best epoch, as Ultralytics 8.4 weighs
    /// `[P, R, mAP50, mAP50-95]`: `[0, 0, 0, 1]`, so mAP50-95 alone (its
    /// releases before 8.4 weighed 0.1 mAP50 + 0.9 mAP50-95).
    pub fn fitness(&self) -> f64 {
        self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gt(bbox: [f32; 4], class: usize) -> GroundTruth {
        GroundTruth { bbox, class }
    }

    fn det(bbox: [f32; 4], score: f32, class: usize) -> Detection {
        Detection { bbox, score, class }
    }

    #[test]
    fn thresholds_match_numpy_linspace() {
        let e = MapEvaluator::new(1);
        assert_eq!(e.iou_thresholds[0], 0.5);
        assert_eq!(e.iou_thresholds[8], 0.8999999999999999);
        assert_eq!(e.iou_thresholds[9], 0.95);
        assert_eq!(linspace(0.0, 1.0, 101, 35), 0.35000000000000003);
        assert_eq!(linspace(0.0, 1.0, 101, 100), 1.0);
    }

    #[test]
    fn perfect_detections_score_one() {
        let mut e = MapEvaluator::new(3);
        for i in 0..5 {
            let o = i as f32 * 7.0;
            let gts = [
                gt([o, o, o + 20.0, o + 30.0], 0),
                gt([50.0, o, 90.0, o + 10.0], 2),
            ];
            let dets: Vec<_> = gts.iter().map(|g| det(g.bbox, 0.9, g.class)).collect();
            e.add_image(&gts, &dets);
        }
        let m = e.finish();
        assert_eq!(m.map, 1.0);
        assert_eq!(m.map50, 1.0);
        assert_eq!(m.per_class_map, vec![Some(1.0), None, Some(1.0)]);
        assert_eq!((m.images, m.instances), (5, 10));
        assert!(
            (m.precision - 1.0).abs() < 1e-9 && (m.recall - 1.0).abs() < 1e-9,
            "{m:?}"
        );
        assert_eq!(m.fitness(), 1.0);
    }

    #[test]
    fn no_detections_score_zero() {
        let mut e = MapEvaluator::new(2);
        e.add_image(&[gt([0.0, 0.0, 10.0, 10.0], 1)], &[]);
        e.add_image(&[], &[]);
        let m = e.finish();
        assert_eq!(
            (m.map, m.map50, m.precision, m.recall),
            (0.0, 0.0, 0.0, 0.0)
        );
        assert_eq!(m.per_class_map, vec![None, Some(0.0)]);
        // Nothing at all: zeros, not NaN.
        let m = MapEvaluator::new(2).finish();
        assert_eq!(
            (m.map, m.map50, m.precision, m.recall),
            (0.0, 0.0, 0.0, 0.0)
        );
    }

    /// Two ground truths, three detections: a hit (IoU 1), a false positive,
    /// and a hit at IoU 0.62 (a match only at thresholds 0.50..0.60).
    #[test]
    fn hand_computed_case() {
        let mut e = MapEvaluator::new(1);
        e.add_image(
            &[
                gt([0.0, 0.0, 10.0, 10.0], 0),
                gt([100.0, 0.0, 110.0, 10.0], 0),
            ],
            &[
                det([100.0, 0.0, 110.0, 6.2], 0.7, 0),
                det([0.0, 0.0, 10.0, 10.0], 0.9, 0),
                det([50.0, 50.0, 60.0, 60.0], 0.8, 0),
            ],
        );
        let m = e.finish();
        // Matched: recall [.5, .5, 1], precision [1, .5, 2/3] -> envelope
        // [1, 2/3, 2/3]: 51 recall points at 1, 50 at 2/3.
        let hit = (51.0 + 50.0 * 2.0 / 3.0) / 101.0;
        // Unmatched third: recall [.5, .5, .5]: 51 points at 1, the rest 0.
        let miss = 51.0 / 101.0;
        assert!((m.map50 - hit).abs() < 1e-12, "{m:?}");
        assert!(
            (m.map - (3.0 * hit + 7.0 * miss) / 10.0).abs() < 1e-12,
            "{m:?}"
        );
        // F1 peaks (0.8) on the plateau of confidences <= 0.7, where both
        // hits count: p = 2/3, r = 1.
        assert!((m.recall - 1.0).abs() < 1e-9, "{m:?}");
        assert!((m.precision - 2.0 / 3.0).abs() < 1e-9, "{m:?}");
    }

    #[test]
    fn coco_counts_only_the_top_hundred_per_image_and_class() {
        let mut e = MapEvaluator::new(1);
        let g = [0.0, 0.0, 10.0, 10.0];
        // 100 far-off false positives outscore the one hit: COCO drops it.
        let mut dets: Vec<_> = (0..100)
            .map(|i| det([200.0 + i as f32, 0.0, 205.0 + i as f32, 5.0], 0.9, 0))
            .collect();
        dets.push(det(g, 0.5, 0));
        e.add_image(&[gt(g, 0)], &dets);
        let m = e.finish();
        assert_eq!(m.map50, 0.0);
        // Ultralytics' recall sees every detection.
        assert!(m.recall > 0.99, "{m:?}");
    }

    #[test]
    fn interp_and_smooth_follow_numpy() {
        let xp = [-0.9, -0.5, -0.5, -0.1];
        let fp = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(interp(-1.0, &xp, &fp, 7.0), 7.0);
        assert_eq!(interp(-0.5, &xp, &fp, 7.0), 3.0);
        assert!((interp(-0.3, &xp, &fp, 7.0) - 3.5).abs() < 1e-12);
        assert_eq!(interp(0.0, &xp, &fp, 7.0), 4.0);
        // nf = round(4) / 2 + 1 = 3: a width-3 box, padded by one.
        let s = smooth(&[0.0, 0.0, 9.0, 0.0, 0.0], 0.4);
        let want = [0.0, 3.0, 3.0, 3.0, 0.0];
        assert!(
            s.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12),
            "{s:?}"
        );
    }
}
