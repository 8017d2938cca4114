//! The detection input pipeline, after Ultralytics' training recipe: worker
//! threads decode images (long side resized to the input size, cached in
//! memory when they fit), and for training build each input from a mosaic
//! of four images around a random centre, scale and translate it into the
//! square input (boxes transformed with the pixels, clipped, and dropped
//! when they shrank too much), jitter hue, saturation and value, and flip
//! it. Validation letterboxes each image (centred, grey padding) unchanged.
//!
//! Batches come out in a fixed order for a given seed and epoch, whatever
//! the number of workers: each batch draws its augmentation from its own
//! seeded generator.

use std::path::Path;
use std::sync::Arc;

use image::ImageDecoder;
use image::imageops::FilterType;
use rand::RngExt;
use vtp_core::{Error, Result};

use super::image_set::{ImageSet, ImageSetConfig, batch_rng};
use super::prefetch::Batches;
use super::yolo::YoloSample;

/// The padding grey Ultralytics uses (mosaic canvas, letterbox, warp border).
pub const PAD_GREY: u8 = 114;

/// How detection batches are made; the defaults are Ultralytics'.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectLoaderConfig {
    /// Side of the square input, a multiple of 32 (the model's largest stride).
    pub image_size: u32,
    /// Images per batch.
    pub batch_size: usize,
    /// Worker threads.
    pub workers: usize,
    /// Probability that a training input is a 4-image mosaic.
    pub mosaic: f64,
    /// Largest random shift, as a fraction of the input size.
    pub translate: f64,
    /// Random zoom in `1 ± scale`.
    pub scale: f64,
    /// Probability of a horizontal flip.
    pub fliplr: f64,
    /// Largest hue shift, as a fraction of the colour wheel.
    pub hsv_h: f64,
    /// Largest relative saturation change.
    pub hsv_s: f64,
    /// Largest relative value (brightness) change.
    pub hsv_v: f64,
    /// Largest decoded cache; beyond it images are decoded every epoch.
    pub cache_bytes: u64,
    /// Corrupt images tolerated (skipped and counted) before the dataset is refused.
    pub max_corrupt: usize,
}

impl Default for DetectLoaderConfig {
    fn default() -> Self {
        DetectLoaderConfig {
            image_size: 640,
            batch_size: 16,
            workers: 2,
            mosaic: 1.0,
            translate: 0.1,
            scale: 0.5,
            fliplr: 0.5,
            hsv_h: 0.015,
            hsv_s: 0.7,
            hsv_v: 0.4,
            cache_bytes: 2 * 1024 * 1024 * 1024,
            max_corrupt: 1,
        }
    }
}

/// How an image was fitted into the square input, to map predictions back
/// to its pixels: `original = (input - pad) / ratio`, per axis.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ImageShape {
    /// The image's size as stored, `(height, width)`, after EXIF orientation.
    pub original: (u32, u32),
    /// Input pixels per original pixel, `(x, y)`.
    pub ratio: (f32, f32),
    /// Padding before the image in the input, `(x, y)` pixels.
    pub pad: (f32, f32),
}

impl ImageShape {
    /// The letterbox of an `original` `(height, width)` image resized to
    /// `resized` `(height, width)` and centred in a `size` square.
    fn letterbox(original: (u32, u32), resized: (u32, u32), size: u32) -> Self {
        ImageShape {
            original,
            ratio: (
                resized.1 as f32 / original.1.max(1) as f32,
                resized.0 as f32 / original.0.max(1) as f32,
            ),
            pad: (
                ((size - resized.1) / 2) as f32,
                ((size - resized.0) / 2) as f32,
            ),
        }
    }

    /// Maps an `[x1, y1, x2, y2]` box in input pixels to original pixels,
    /// clipped to the image.
    pub fn to_original(&self, xyxy: [f32; 4]) -> [f32; 4] {
        let (h, w) = (self.original.0 as f32, self.original.1 as f32);
        [
            ((xyxy[0] - self.pad.0) / self.ratio.0).clamp(0.0, w),
            ((xyxy[1] - self.pad.1) / self.ratio.1).clamp(0.0, h),
            ((xyxy[2] - self.pad.0) / self.ratio.0).clamp(0.0, w),
            ((xyxy[3] - self.pad.1) / self.ratio.1).clamp(0.0, h),
        ]
    }
}

/// One batch in NCHW layout.
#[derive(Debug, Clone, PartialEq)]
pub struct DetectBatch {
    /// `len * 3 * S * S` RGB values scaled to `0..1` (no mean or std).
    pub images: Vec<f32>,
    /// `(batch_index, class, cx, cy, w, h)` per object, normalised to the
    /// `S`×`S` input.
    pub targets: Vec<[f32; 6]>,
    /// Per image: its original size and letterbox, to map boxes back.
    /// For augmented (training) inputs this is the first image's plain
    /// letterbox, not the augmentation's mapping.
    pub shapes: Vec<ImageShape>,
}

impl DetectBatch {
    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.shapes.len()
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.shapes.is_empty()
    }
}

/// A decoded image, long side resized to the input size.
#[derive(Debug)]
struct Decoded {
    /// Stored size `(height, width)`.
    original: (u32, u32),
    width: usize,
    height: usize,
    /// RGB bytes, row-major.
    rgb: Vec<u8>,
}

/// Decodes `path` (applying its EXIF orientation, as OpenCV does) and
/// resizes its long side to `size`.
fn decode(path: &Path, size: u32) -> Result<Decoded> {
    let corrupt = |e: image::ImageError| {
        Error::invalid("dataset", format!("corrupt image {}: {e}", path.display()))
    };
    let mut decoder = image::ImageReader::open(path)
        .and_then(image::ImageReader::with_guessed_format)
        .map_err(|e| Error::invalid("dataset", format!("cannot read {}: {e}", path.display())))?
        .into_decoder()
        .map_err(corrupt)?;
    let orientation = decoder.orientation().map_err(corrupt)?;
    let mut image = image::DynamicImage::from_decoder(decoder).map_err(corrupt)?;
    image.apply_orientation(orientation);
    if image.width() == 0 || image.height() == 0 {
        return Err(Error::invalid(
            "dataset",
            format!("corrupt image {}: it has no pixels", path.display()),
        ));
    }
    Ok(fit(&image, size))
}

/// `image` with its long side resized to `size`.
fn fit(image: &image::DynamicImage, size: u32) -> Decoded {
    let (w0, h0) = (image.width().max(1), image.height().max(1));
    let r = f64::from(size) / f64::from(w0.max(h0));
    let w = ((f64::from(w0) * r).round() as u32).clamp(1, size);
    let h = ((f64::from(h0) * r).round() as u32).clamp(1, size);
    let rgb = image.to_rgb8();
    let rgb = if (w, h) == (w0, h0) {
        rgb
    } else {
        image::imageops::resize(&rgb, w, h, FilterType::Triangle)
    };
    Decoded {
        original: (h0, w0),
        width: w as usize,
        height: h as usize,
        rgb: rgb.into_raw(),
    }
}

/// A decoded image as a detector sees it at validation and prediction:
/// long side resized to `size`, centred in the `size` square on grey,
/// CHW RGB scaled to `0..1`; with the shape that maps boxes back.
pub fn letterbox_image(image: &image::DynamicImage, size: u32) -> (Vec<f32>, ImageShape) {
    let decoded = fit(image, size);
    let side = size as usize;
    let mut out = vec![0.0; 3 * side * side];
    centre(&decoded, side, &mut Scratch::default(), &mut out);
    let shape = ImageShape::letterbox(
        decoded.original,
        (decoded.height as u32, decoded.width as u32),
        size,
    );
    (out, shape)
}

/// A decoded image, shared.
type Image = Arc<Decoded>;

impl super::Prepare for DetectLoader {
    fn len(&self) -> usize {
        DetectLoader::len(self)
    }
    fn prepare(&self) -> Result<usize> {
        DetectLoader::prepare(self)
    }
    fn corrupt_paths(&self) -> Vec<std::path::PathBuf> {
        DetectLoader::corrupt_paths(self)
    }
}

/// [`decode`], shared.
fn decode_image(path: &Path, size: u32) -> Result<Image> {
    decode(path, size).map(Image::new)
}

#[derive(Debug)]
struct Shared {
    images: ImageSet<YoloSample, Image>,
    config: DetectLoaderConfig,
}

/// Makes detection batches of a fixed set of samples.
#[derive(Debug, Clone)]
pub struct DetectLoader {
    shared: Arc<Shared>,
}

impl DetectLoader {
    /// A loader over `samples`; nothing is decoded yet.
    pub fn new(samples: Vec<YoloSample>, config: DetectLoaderConfig) -> Self {
        let images = ImageSet::new(
            samples,
            decode_image,
            ImageSetConfig {
                image_size: config.image_size,
                workers: config.workers,
                cache_bytes: config.cache_bytes,
                max_corrupt: config.max_corrupt,
            },
        );
        DetectLoader {
            shared: Arc::new(Shared { images, config }),
        }
    }

    /// Samples in the set.
    pub fn len(&self) -> usize {
        self.shared.images.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.shared.images.is_empty()
    }

    /// Batches per pass.
    pub fn batches(&self) -> usize {
        self.len().div_ceil(self.shared.config.batch_size.max(1))
    }

    /// Whether decoded images are kept in memory.
    pub fn is_cached(&self) -> bool {
        self.shared.images.is_cached()
    }

    /// Corrupt images found so far (they are skipped).
    pub fn skipped(&self) -> usize {
        self.shared.images.skipped()
    }

    /// The files found corrupt so far.
    pub fn corrupt_paths(&self) -> Vec<std::path::PathBuf> {
        self.shared.images.corrupt_paths()
    }

    /// Decodes every image now, on the worker threads, so that a corrupt
    /// dataset fails before training starts; when the set is cached this
    /// also fills the cache. Returns the number of corrupt images skipped.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] for an input size that is not a positive
    /// multiple of 32 or a zero batch size, and naming a corrupt image when
    /// more than `max_corrupt` are corrupt.
    pub fn prepare(&self) -> Result<usize> {
        let config = &self.shared.config;
        if config.image_size == 0 || !config.image_size.is_multiple_of(32) {
            return Err(Error::invalid(
                "image_size",
                format!(
                    "detection needs a multiple of 32, got {}",
                    config.image_size
                ),
            ));
        }
        if config.batch_size == 0 {
            return Err(Error::invalid("batch_size", "must be at least 1"));
        }
        self.shared.images.prepare()
    }

    /// One pass over the set: shuffled and augmented when `train` (with
    /// mosaics unless `mosaic` is false, as for the last epochs), in order
    /// and letterboxed otherwise. Deterministic for `(seed, epoch)`
    /// whatever the number of workers. Workers start at once and stop when
    /// the iterator is dropped.
    pub fn epoch(&self, seed: u64, epoch: u32, train: bool, mosaic: bool) -> DetectEpoch {
        let (order, batch_seed) = self.shared.images.order(seed, epoch, train);
        let mode = Mode {
            train,
            mosaic: mosaic && train,
        };
        Batches::spawn(
            "vtp-detect-loader",
            self.batches(),
            self.shared.config.workers,
            DetectBatch::is_empty,
            || {
                let (shared, order) = (self.shared.clone(), order.clone());
                let mut scratch = Scratch::default();
                move |b| make_batch(&shared, &order, b, mode, batch_seed, &mut scratch)
            },
        )
    }
}

#[derive(Debug, Clone, Copy)]
struct Mode {
    train: bool,
    mosaic: bool,
}

/// Per-worker buffers reused across images, so the hot path allocates
/// little beyond the batch itself.
#[derive(Debug, Default)]
struct Scratch {
    /// The 2S×2S mosaic canvas.
    canvas: Vec<u8>,
    /// Per output column and row: first source index and blend weight.
    cols: Vec<(isize, f32)>,
    rows: Vec<(isize, f32)>,
    /// Two source rows resampled along x, and one output row, RGB.
    lines: [Vec<f32>; 2],
    rgb: Vec<f32>,
    /// `(class, [x1, y1, x2, y2])` in source pixels.
    boxes: Vec<(usize, [f32; 4])>,
}

/// `lo + (hi - lo) * U[0, 1)`; unlike `random_range`, fine with `lo == hi`.
fn uniform(rng: &mut impl RngExt, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// The random choices for one training input, drawn up front in a fixed
/// order so that the stream does not depend on the images' contents.
#[derive(Debug, Clone, Copy)]
struct Draw {
    mosaic: Option<([usize; 3], (usize, usize))>,
    scale: f32,
    translate: (f32, f32),
    hsv: Option<[f32; 3]>,
    flip: bool,
}

impl Draw {
    fn new(rng: &mut impl RngExt, config: &DetectLoaderConfig, n: usize, mosaic: bool) -> Self {
        let s = config.image_size as usize;
        let mosaic = (mosaic && rng.random_bool(config.mosaic.clamp(0.0, 1.0))).then(|| {
            let others = [(); 3].map(|_| rng.random_range(0..n));
            // The mosaic centre: anywhere in the middle half of the canvas.
            let xc = uniform(rng, s as f64 / 2.0, 1.5 * s as f64) as usize;
            let yc = uniform(rng, s as f64 / 2.0, 1.5 * s as f64) as usize;
            (others, (xc, yc))
        });
        let scale = uniform(rng, 1.0 - config.scale, 1.0 + config.scale).max(0.01) as f32;
        let t = config.translate;
        let translate = (
            (uniform(rng, 0.5 - t, 0.5 + t) * s as f64) as f32,
            (uniform(rng, 0.5 - t, 0.5 + t) * s as f64) as f32,
        );
        let gains = [
            uniform(rng, -1.0, 1.0) * config.hsv_h,
            uniform(rng, -1.0, 1.0) * config.hsv_s,
            uniform(rng, -1.0, 1.0) * config.hsv_v,
        ]
        .map(|g| g as f32);
        let hsv = (config.hsv_h > 0.0 || config.hsv_s > 0.0 || config.hsv_v > 0.0).then_some(gains);
        let flip = rng.random_bool(config.fliplr.clamp(0.0, 1.0));
        Draw {
            mosaic,
            scale,
            translate,
            hsv,
            flip,
        }
    }
}

fn make_batch(
    shared: &Shared,
    order: &[usize],
    b: usize,
    mode: Mode,
    seed: u64,
    scratch: &mut Scratch,
) -> DetectBatch {
    let config = &shared.config;
    let size = config.image_size as usize;
    let plane = 3 * size * size;
    let start = b * config.batch_size;
    let end = (start + config.batch_size).min(order.len());
    let mut rng = batch_rng(seed, b);
    let mut images = vec![0.0f32; (end - start) * plane];
    let mut targets = Vec::new();
    let mut shapes = Vec::with_capacity(end - start);
    for &i in &order[start..end] {
        let draw = mode
            .train
            .then(|| Draw::new(&mut rng, config, shared.images.len(), mode.mosaic));
        let Some(image) = shared.images.image(i) else {
            continue;
        };
        let slot = shapes.len();
        let out = &mut images[slot * plane..(slot + 1) * plane];
        let first = targets.len();
        match draw {
            Some(draw) => augment(shared, i, &image, &draw, scratch, out, &mut targets),
            None => letterbox(shared, i, &image, scratch, out, &mut targets),
        }
        for t in &mut targets[first..] {
            t[0] = slot as f32;
        }
        shapes.push(ImageShape::letterbox(
            image.original,
            (image.height as u32, image.width as u32),
            config.image_size,
        ));
    }
    images.truncate(shapes.len() * plane);
    DetectBatch {
        images,
        targets,
        shapes,
    }
}

/// Boxes of sample `i` in the pixels of its decoded image, offset by `(dx, dy)`.
fn push_boxes(
    sample: &YoloSample,
    image: &Decoded,
    (dx, dy): (f32, f32),
    boxes: &mut Vec<(usize, [f32; 4])>,
) {
    let (w, h) = (image.width as f32, image.height as f32);
    boxes.extend(sample.boxes.iter().map(|b| {
        (
            b.class,
            [
                (b.cx - b.w / 2.0) * w + dx,
                (b.cy - b.h / 2.0) * h + dy,
                (b.cx + b.w / 2.0) * w + dx,
                (b.cy + b.h / 2.0) * h + dy,
            ],
        )
    }));
}

/// Writes `image` centred in the `size` square, grey around it; returns
/// the padding `(x, y)` before it. A scale of 1 and a whole-pixel shift:
/// the warp copies pixels exactly.
fn centre(image: &Decoded, size: usize, scratch: &mut Scratch, out: &mut [f32]) -> (usize, usize) {
    let pad = ((size - image.width) / 2, (size - image.height) / 2);
    let warp = Warp {
        scale: 1.0,
        translate: (
            pad.0 as f32 + image.width as f32 / 2.0,
            pad.1 as f32 + image.height as f32 / 2.0,
        ),
        flip: false,
        hsv: None,
    };
    warp.apply(&image.rgb, image.width, image.height, size, scratch, out);
    pad
}

/// Validation input: the image centred in the square, grey around it.
fn letterbox(
    shared: &Shared,
    i: usize,
    image: &Decoded,
    scratch: &mut Scratch,
    out: &mut [f32],
    targets: &mut Vec<[f32; 6]>,
) {
    let size = shared.config.image_size as usize;
    let pad = centre(image, size, scratch, out);
    scratch.boxes.clear();
    push_boxes(
        &shared.images.samples()[i],
        image,
        (pad.0 as f32, pad.1 as f32),
        &mut scratch.boxes,
    );
    let s = size as f32;
    targets.extend(scratch.boxes.iter().map(|&(class, [x1, y1, x2, y2])| {
        [
            0.0,
            class as f32,
            (x1 + x2) / 2.0 / s,
            (y1 + y2) / 2.0 / s,
            (x2 - x1) / s,
            (y2 - y1) / s,
        ]
    }));
}

/// Training input: optional mosaic, random scale and shift into the
/// square, HSV jitter and flip; boxes follow the pixels.
fn augment(
    shared: &Shared,
    i: usize,
    image: &Decoded,
    draw: &Draw,
    scratch: &mut Scratch,
    out: &mut [f32],
    targets: &mut Vec<[f32; 6]>,
) {
    let size = shared.config.image_size as usize;
    scratch.boxes.clear();
    let canvas = std::mem::take(&mut scratch.canvas);
    let (canvas, source_w, source_h) = match draw.mosaic {
        Some((others, centre)) => {
            let canvas = mosaic(shared, i, image, others, centre, canvas, &mut scratch.boxes);
            (canvas, 2 * size, 2 * size)
        }
        None => {
            push_boxes(
                &shared.images.samples()[i],
                image,
                (0.0, 0.0),
                &mut scratch.boxes,
            );
            (canvas, image.width, image.height)
        }
    };
    let source: &[u8] = if draw.mosaic.is_some() {
        &canvas
    } else {
        &image.rgb
    };
    let warp = Warp {
        scale: draw.scale,
        translate: draw.translate,
        flip: draw.flip,
        hsv: draw.hsv,
    };
    warp.apply(source, source_w, source_h, size, scratch, out);
    scratch.canvas = canvas;

    let s = size as f32;
    let (cx, cy) = (source_w as f32 / 2.0, source_h as f32 / 2.0);
    for &(class, [x1, y1, x2, y2]) in &scratch.boxes {
        let map_x = |x: f32| draw.scale * (x - cx) + draw.translate.0;
        let map_y = |y: f32| draw.scale * (y - cy) + draw.translate.1;
        let (nx1, nx2) = (map_x(x1).clamp(0.0, s), map_x(x2).clamp(0.0, s));
        let (ny1, ny2) = (map_y(y1).clamp(0.0, s), map_y(y2).clamp(0.0, s));
        let scaled = [(x2 - x1) * draw.scale, (y2 - y1) * draw.scale];
        if !box_candidate(scaled, [nx2 - nx1, ny2 - ny1]) {
            continue;
        }
        let (nx1, nx2) = if draw.flip {
            (s - nx2, s - nx1)
        } else {
            (nx1, nx2)
        };
        targets.push([
            0.0,
            class as f32,
            (nx1 + nx2) / 2.0 / s,
            (ny1 + ny2) / 2.0 / s,
            (nx2 - nx1) / s,
            (ny2 - ny1) / s,
        ]);
    }
}

/// Whether a box that was `before` (width, height, scaled like the image)
/// and is `after` once clipped is still worth learning from: more than 2
/// pixels each way, more than a tenth of its area left, aspect below 100.
fn box_candidate(before: [f32; 2], after: [f32; 2]) -> bool {
    let eps = 1e-16;
    let [w1, h1] = before;
    let [w2, h2] = after;
    let aspect = (w2 / (h2 + eps)).max(h2 / (w2 + eps));
    w2 > 2.0 && h2 > 2.0 && w2 * h2 / (w1 * h1 + eps) > 0.1 && aspect < 100.0
}

/// Lays image `i` and three `others` around `centre` on a grey 2S×2S
/// canvas (the first top-left of the centre, then top-right, bottom-left,
/// bottom-right) and collects their boxes in canvas pixels, clipped to it.
fn mosaic(
    shared: &Shared,
    i: usize,
    image: &Decoded,
    others: [usize; 3],
    (xc, yc): (usize, usize),
    mut canvas: Vec<u8>,
    boxes: &mut Vec<(usize, [f32; 4])>,
) -> Vec<u8> {
    let side = 2 * shared.config.image_size as usize;
    canvas.clear();
    canvas.resize(side * side * 3, PAD_GREY);
    let mut tiles: [Option<(usize, Image)>; 4] = [None, None, None, None];
    for (k, &j) in others.iter().enumerate() {
        // A corrupt partner leaves its quarter grey.
        tiles[k + 1] = shared.images.image(j).map(|img| (j, img));
    }
    for (k, tile) in tiles.iter().enumerate() {
        let (j, img): (usize, &Decoded) = match (k, tile) {
            (0, _) => (i, image),
            (_, Some((j, img))) => (*j, img),
            _ => continue,
        };
        let (w, h) = (img.width, img.height);
        // The tile's rectangle on the canvas (a) and in the image (b).
        let (x1a, y1a, x2a, y2a) = match k {
            0 => (xc.saturating_sub(w), yc.saturating_sub(h), xc, yc),
            1 => (xc, yc.saturating_sub(h), (xc + w).min(side), yc),
            2 => (xc.saturating_sub(w), yc, xc, (yc + h).min(side)),
            _ => (xc, yc, (xc + w).min(side), (yc + h).min(side)),
        };
        let (x1b, y1b) = match k {
            0 => (w - (x2a - x1a), h - (y2a - y1a)),
            1 => (0, h - (y2a - y1a)),
            2 => (w - (x2a - x1a), 0),
            _ => (0, 0),
        };
        let row = (x2a - x1a) * 3;
        for y in 0..(y2a - y1a) {
            let src = ((y1b + y) * w + x1b) * 3;
            let dst = ((y1a + y) * side + x1a) * 3;
            canvas[dst..dst + row].copy_from_slice(&img.rgb[src..src + row]);
        }
        let first = boxes.len();
        let offset = (x1a as f32 - x1b as f32, y1a as f32 - y1b as f32);
        push_boxes(&shared.images.samples()[j], img, offset, boxes);
        // Parts of a box outside the canvas were never drawn: clip, and
        // drop what is left with no area.
        let s = side as f32;
        let mut kept = first;
        for n in first..boxes.len() {
            let (class, [x1, y1, x2, y2]) = boxes[n];
            let clipped = [
                x1.clamp(0.0, s),
                y1.clamp(0.0, s),
                x2.clamp(0.0, s),
                y2.clamp(0.0, s),
            ];
            if clipped[2] > clipped[0] && clipped[3] > clipped[1] {
                boxes[kept] = (class, clipped);
                kept += 1;
            }
        }
        boxes.truncate(kept);
    }
    canvas
}

/// A scale about the source centre and a shift to `translate` in the
/// output (`out = scale * (src - centre) + translate`), then an optional
/// HSV jitter and mirror, sampled bilinearly with grey outside the source.
#[derive(Debug, Clone, Copy)]
struct Warp {
    scale: f32,
    translate: (f32, f32),
    flip: bool,
    hsv: Option<[f32; 3]>,
}

impl Warp {
    /// Writes the `size`×`size` CHW output, scaled to `0..1`, into `out`.
    fn apply(
        &self,
        src: &[u8],
        width: usize,
        height: usize,
        size: usize,
        scratch: &mut Scratch,
        out: &mut [f32],
    ) {
        // The map has no rotation, so the source column depends on the
        // output column only, and the row on the row: tabulate both once.
        // Pixel centres sit at +0.5 so that box edges and pixels agree.
        let table = |n: usize, extent: usize, t: f32, table: &mut Vec<(isize, f32)>| {
            table.clear();
            table.extend((0..n).map(|o| {
                let u = (o as f32 + 0.5 - t) / self.scale + extent as f32 / 2.0 - 0.5;
                let f = u.floor();
                (f as isize, u - f)
            }));
        };
        table(size, width, self.translate.0, &mut scratch.cols);
        table(size, height, self.translate.1, &mut scratch.rows);
        // Bilinear sampling done separably: each source row is resampled
        // along x once into a line (two lines are kept, as neighbouring
        // output rows share source rows), then output rows blend two lines.
        let line = |row: isize, cols: &[(isize, f32)], line: &mut Vec<f32>| {
            line.clear();
            let grey = f32::from(PAD_GREY);
            if row < 0 || row >= height as isize {
                line.resize(cols.len() * 3, grey);
                return;
            }
            let pixels = &src[row as usize * width * 3..(row as usize + 1) * width * 3];
            let at = |x: isize, c: usize| {
                if x < 0 || x >= width as isize {
                    grey
                } else {
                    f32::from(pixels[x as usize * 3 + c])
                }
            };
            for &(x0, fx) in cols {
                if x0 >= 0 && (x0 as usize) + 1 < width {
                    let p = &pixels[x0 as usize * 3..x0 as usize * 3 + 6];
                    for c in 0..3 {
                        let (a, b) = (f32::from(p[c]), f32::from(p[c + 3]));
                        line.push(a + (b - a) * fx);
                    }
                } else {
                    for c in 0..3 {
                        let (a, b) = (at(x0, c), at(x0 + 1, c));
                        line.push(a + (b - a) * fx);
                    }
                }
            }
        };
        let plane = size * size;
        let (red, rest) = out.split_at_mut(plane);
        let (green, blue) = rest.split_at_mut(plane);
        let Scratch {
            cols,
            rows,
            lines,
            rgb,
            ..
        } = scratch;
        let mut held: [Option<isize>; 2] = [None, None];
        for (y, &(y0, fy)) in rows.iter().enumerate() {
            // Line 0 holds source row y0, line 1 row y0 + 1.
            if held[0] != Some(y0) {
                if held[1] == Some(y0) {
                    lines.swap(0, 1);
                    held.swap(0, 1);
                } else {
                    line(y0, cols, &mut lines[0]);
                    held[0] = Some(y0);
                }
            }
            if held[1] != Some(y0 + 1) {
                line(y0 + 1, cols, &mut lines[1]);
                held[1] = Some(y0 + 1);
            }
            let (top, bottom) = (&lines[0], &lines[1]);
            rgb.clear();
            rgb.extend(top.iter().zip(bottom).map(|(a, b)| a + (b - a) * fy));
            let row = y * size..(y + 1) * size;
            let (r, g, b) = (
                &mut red[row.clone()],
                &mut green[row.clone()],
                &mut blue[row],
            );
            for (x, p) in rgb.chunks_exact(3).enumerate() {
                let mut v = [p[0], p[1], p[2]];
                if let Some(gains) = self.hsv {
                    v = jitter(v, gains);
                }
                let xo = if self.flip { size - 1 - x } else { x };
                r[xo] = v[0] / 255.0;
                g[xo] = v[1] / 255.0;
                b[xo] = v[2] / 255.0;
            }
        }
    }
}

/// Shifts hue by `gains[0]` turns and scales saturation and value by
/// `1 + gains[1]` and `1 + gains[2]` (clipped), as Ultralytics' RandomHSV.
fn jitter([r, g, b]: [f32; 3], [dh, ds, dv]: [f32; 3]) -> [f32; 3] {
    // Plain RGB -> HSV -> RGB with the hue in sixths of a turn; wrapping by
    // comparison rather than `%` keeps this per-pixel step cheap.
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let delta = max - min;
    let mut hue = if delta <= 0.0 {
        0.0
    } else if max == r {
        let h = (g - b) / delta;
        if h < 0.0 { h + 6.0 } else { h }
    } else if max == g {
        (b - r) / delta + 2.0
    } else {
        (r - g) / delta + 4.0
    };
    hue += dh * 6.0;
    while hue >= 6.0 {
        hue -= 6.0;
    }
    while hue < 0.0 {
        hue += 6.0;
    }
    let sat = if max > 0.0 { delta / max } else { 0.0 };
    let sat = (sat * (1.0 + ds)).clamp(0.0, 1.0);
    let val = (max * (1.0 + dv)).clamp(0.0, 255.0);
    let chroma = val * sat;
    let sector = (hue as u32).min(5);
    let frac = hue - sector as f32;
    let x = chroma
        * if sector.is_multiple_of(2) {
            frac
        } else {
            1.0 - frac
        };
    let m = val - chroma;
    let (r, g, b) = match sector {
        0 => (chroma, x, 0.0),
        1 => (x, chroma, 0.0),
        2 => (0.0, chroma, x),
        3 => (0.0, x, chroma),
        4 => (x, 0.0, chroma),
        _ => (chroma, 0.0, x),
    };
    [r + m, g + m, b + m]
}

/// The batches of one pass, in order.
pub type DetectEpoch = Batches<DetectBatch>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::yolo::{YoloBox, YoloDataset};

    fn plain(image_size: u32, batch_size: usize) -> DetectLoaderConfig {
        DetectLoaderConfig {
            image_size,
            batch_size,
            workers: 2,
            mosaic: 0.0,
            translate: 0.0,
            scale: 0.0,
            fliplr: 0.0,
            hsv_h: 0.0,
            hsv_s: 0.0,
            hsv_v: 0.0,
            ..DetectLoaderConfig::default()
        }
    }

    /// Input pixel `(x, y)` of image `slot` as RGB bytes.
    fn pixel(batch: &DetectBatch, size: usize, slot: usize, x: usize, y: usize) -> [u8; 3] {
        let plane = size * size;
        std::array::from_fn(|c| {
            (batch.images[slot * 3 * plane + c * plane + y * size + x] * 255.0).round() as u8
        })
    }

    fn xyxy(t: &[f32; 6], size: f32) -> [f32; 4] {
        [
            (t[2] - t[4] / 2.0) * size,
            (t[3] - t[5] / 2.0) * size,
            (t[2] + t[4] / 2.0) * size,
            (t[3] + t[5] / 2.0) * size,
        ]
    }

    #[test]
    fn validation_letterboxes_and_boxes_map_back_through_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = crate::testing::yolo_shapes_dataset(dir.path(), 1, 6, 64, 3);
        let ds = YoloDataset::open(&root).unwrap();
        let loader = DetectLoader::new(ds.val.clone(), plain(96, 4));
        assert_eq!(loader.prepare().unwrap(), 0);
        let batches: Vec<DetectBatch> = loader.epoch(1, 0, false, true).collect();
        assert_eq!(
            batches.iter().map(DetectBatch::len).collect::<Vec<_>>(),
            [4, 2]
        );
        let mut checked = 0;
        for (b, batch) in batches.iter().enumerate() {
            for (slot, shape) in batch.shapes.iter().enumerate() {
                let sample = &ds.val[b * 4 + slot];
                let (h, w) = (shape.original.0 as f32, shape.original.1 as f32);
                assert_eq!(w.max(h), 64.0);
                assert!((shape.ratio.0 - 1.5).abs() < 1e-6, "{shape:?}");
                let mine: Vec<&[f32; 6]> = batch
                    .targets
                    .iter()
                    .filter(|t| t[0] == slot as f32)
                    .collect();
                assert_eq!(mine.len(), sample.boxes.len(), "validation drops no box");
                for (t, b) in mine.iter().zip(&sample.boxes) {
                    assert_eq!(t[1], b.class as f32);
                    let back = shape.to_original(xyxy(t, 96.0));
                    let want = [
                        (b.cx - b.w / 2.0) * w,
                        (b.cy - b.h / 2.0) * h,
                        (b.cx + b.w / 2.0) * w,
                        (b.cy + b.h / 2.0) * h,
                    ];
                    for k in 0..4 {
                        assert!((back[k] - want[k]).abs() < 1e-3, "{back:?} vs {want:?}");
                    }
                    checked += 1;
                }
                // Landscape scenes are padded above and below with grey.
                if shape.pad.1 > 0.0 {
                    assert_eq!(shape.pad, (0.0, 12.0));
                    assert_eq!(pixel(batch, 96, slot, 40, 3), [PAD_GREY; 3]);
                    assert_eq!(pixel(batch, 96, slot, 40, 92), [PAD_GREY; 3]);
                }
            }
        }
        assert!(checked >= 6);
    }

    #[test]
    fn unaugmented_training_matches_the_letterbox_and_a_flip_mirrors_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = crate::testing::yolo_shapes_dataset(dir.path(), 1, 1, 64, 5);
        let ds = YoloDataset::open(&root).unwrap();
        let sample = ds.train.clone(); // scene 0: square
        let loader = DetectLoader::new(sample.clone(), plain(64, 1));
        let val = loader.epoch(0, 0, false, false).next().unwrap();
        let train = loader.epoch(0, 0, true, true).next().unwrap();
        assert_eq!(
            train, val,
            "no augmentation: training input is the letterbox"
        );
        let flipped = DetectLoader::new(
            sample,
            DetectLoaderConfig {
                fliplr: 1.0,
                ..plain(64, 1)
            },
        )
        .epoch(0, 0, true, true)
        .next()
        .unwrap();
        assert_eq!(flipped.targets.len(), train.targets.len());
        for (f, t) in flipped.targets.iter().zip(&train.targets) {
            assert!(
                (f[2] - (1.0 - t[2])).abs() < 1e-6,
                "cx mirrored: {f:?} {t:?}"
            );
            for k in [1, 3, 4, 5] {
                assert!((f[k] - t[k]).abs() < 1e-6, "{f:?} {t:?}");
            }
        }
        for y in [0, 17, 63] {
            for x in [0, 5, 40, 63] {
                assert_eq!(
                    pixel(&flipped, 64, 0, x, y),
                    pixel(&train, 64, 0, 63 - x, y)
                );
            }
        }
    }

    /// The class whose colour `[r, g, b]` is, when clearly one of the
    /// generator's red, green and blue.
    fn colour_class([r, g, b]: [u8; 3]) -> Option<usize> {
        let (r, g, b) = (i32::from(r), i32::from(g), i32::from(b));
        if r > g + 60 && r > b + 60 {
            Some(0)
        } else if g > r + 60 && g > b + 60 {
            Some(1)
        } else if b > r + 60 && b > g + 60 {
            Some(2)
        } else {
            None
        }
    }

    #[test]
    fn mosaic_boxes_stay_tight_around_the_drawn_shapes() {
        let dir = tempfile::tempdir().unwrap();
        let root = crate::testing::yolo_shapes_dataset(dir.path(), 12, 1, 64, 11);
        let ds = YoloDataset::open(&root).unwrap();
        let size = 64usize;
        let loader = DetectLoader::new(
            ds.train,
            DetectLoaderConfig {
                image_size: size as u32,
                batch_size: 4,
                workers: 2,
                scale: 0.25,
                hsv_h: 0.0,
                hsv_s: 0.0,
                hsv_v: 0.0,
                ..DetectLoaderConfig::default()
            },
        );
        let (mut boxes, mut total_error) = (0, 0.0f32);
        for epoch in 0..3 {
            for batch in loader.epoch(7, epoch, true, true) {
                for t in &batch.targets {
                    let slot = t[0] as usize;
                    let [x1, y1, x2, y2] = xyxy(t, size as f32);
                    let class = t[1] as usize;
                    // The shape in the box: its colour, connected to the
                    // box's middle, within the box and a margin around it
                    // (so that a neighbour of the same colour is not counted).
                    let (x0, y0) = ((x1 - 3.0).max(0.0) as usize, (y1 - 3.0).max(0.0) as usize);
                    let (xn, yn) = (
                        ((x2 + 3.0) as usize).min(size),
                        ((y2 + 3.0) as usize).min(size),
                    );
                    let ours = |x: usize, y: usize| {
                        colour_class(pixel(&batch, size, slot, x, y)) == Some(class)
                    };
                    let mut seen = vec![false; size * size];
                    let centred = |v: usize, a: f32, b: f32| (a..=b).contains(&(v as f32 + 0.5));
                    let mut stack: Vec<(usize, usize)> = (y0..yn)
                        .flat_map(|y| (x0..xn).map(move |x| (x, y)))
                        .filter(|&(x, y)| centred(x, x1, x2) && centred(y, y1, y2) && ours(x, y))
                        .collect();
                    let (mut lo, mut hi) = ([f32::MAX; 2], [f32::MIN; 2]);
                    while let Some((x, y)) = stack.pop() {
                        if seen[y * size + x] {
                            continue;
                        }
                        seen[y * size + x] = true;
                        lo = [lo[0].min(x as f32), lo[1].min(y as f32)];
                        hi = [hi[0].max(x as f32 + 1.0), hi[1].max(y as f32 + 1.0)];
                        let around = [
                            (x.wrapping_sub(1), y),
                            (x + 1, y),
                            (x, y.wrapping_sub(1)),
                            (x, y + 1),
                        ];
                        for (nx, ny) in around {
                            if (x0..xn).contains(&nx)
                                && (y0..yn).contains(&ny)
                                && !seen[ny * size + nx]
                                && ours(nx, ny)
                            {
                                stack.push((nx, ny));
                            }
                        }
                    }
                    assert!(lo[0] < hi[0], "no {class} pixels in box {t:?}");
                    let s = size as f32;
                    if x1 < 0.5 || y1 < 0.5 || x2 > s - 0.5 || y2 > s - 0.5 {
                        // Cut by the border: the clipped box still holds
                        // the visible part, but a cut circle or triangle is
                        // narrower than the full shape's box.
                        let outside = [x1 - lo[0], y1 - lo[1], hi[0] - x2, hi[1] - y2];
                        assert!(
                            outside.iter().all(|&o| o <= 2.0),
                            "box {:?} vs drawn {lo:?}..{hi:?}",
                            [x1, y1, x2, y2]
                        );
                        continue;
                    }
                    let error = [lo[0] - x1, lo[1] - y1, hi[0] - x2, hi[1] - y2]
                        .map(f32::abs)
                        .into_iter()
                        .fold(0.0, f32::max);
                    assert!(
                        error <= 3.0,
                        "box {:?} vs drawn {lo:?}..{hi:?}",
                        [x1, y1, x2, y2]
                    );
                    total_error += error;
                    boxes += 1;
                }
            }
        }
        assert!(boxes > 30, "{boxes} boxes checked");
        assert!(
            total_error / boxes as f32 <= 1.5,
            "mean edge error {}",
            total_error / boxes as f32
        );
    }

    #[test]
    fn batches_are_the_same_whatever_the_workers_or_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let root = crate::testing::yolo_shapes_dataset(dir.path(), 10, 1, 48, 2);
        let ds = YoloDataset::open(&root).unwrap();
        let config = DetectLoaderConfig {
            image_size: 32,
            batch_size: 3,
            workers: 4,
            ..DetectLoaderConfig::default()
        };
        let loader = DetectLoader::new(ds.train.clone(), config.clone());
        assert!(loader.is_cached());
        assert_eq!(loader.batches(), 4);
        let one: Vec<DetectBatch> = loader.epoch(9, 1, true, true).collect();
        assert_eq!(
            one.iter().map(DetectBatch::len).collect::<Vec<_>>(),
            [3, 3, 3, 1]
        );
        assert_eq!(one[0].images.len(), 3 * 3 * 32 * 32);
        let single = DetectLoader::new(
            ds.train.clone(),
            DetectLoaderConfig {
                workers: 1,
                cache_bytes: 0,
                ..config
            },
        );
        assert!(!single.is_cached());
        let again: Vec<DetectBatch> = single.epoch(9, 1, true, true).collect();
        assert_eq!(one, again, "same seed and epoch: same batches");
        assert_ne!(one, loader.epoch(9, 2, true, true).collect::<Vec<_>>());
        assert_ne!(one, loader.epoch(9, 1, true, false).collect::<Vec<_>>());
        for batch in &one {
            for t in &batch.targets {
                assert!((t[0] as usize) < batch.len());
                assert!(t[2..].iter().all(|v| (0.0..=1.0).contains(v)), "{t:?}");
                assert!(t[4] > 0.0 && t[5] > 0.0);
            }
        }
    }

    #[test]
    fn corrupt_images_fail_prepare_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let root = crate::testing::yolo_shapes_dataset(dir.path(), 5, 1, 32, 1);
        let ds = YoloDataset::open(&root).unwrap();
        std::fs::write(&ds.train[2].image, b"not a png").unwrap();
        let strict = DetectLoader::new(
            ds.train.clone(),
            DetectLoaderConfig {
                max_corrupt: 0,
                ..plain(32, 2)
            },
        );
        let err = strict.prepare().unwrap_err().to_string();
        assert!(err.contains("1 corrupt images"), "{err}");
        assert!(err.contains("train_0002.png"), "names the file: {err}");
        let lenient = DetectLoader::new(ds.train.clone(), plain(32, 2));
        assert_eq!(lenient.prepare().unwrap(), 1);
        let seen: usize = lenient.epoch(0, 0, true, true).map(|b| b.len()).sum();
        assert_eq!(seen, 4);
        let err = DetectLoader::new(ds.train, plain(40, 2))
            .prepare()
            .unwrap_err();
        assert!(err.to_string().contains("multiple of 32"), "{err}");
    }

    #[test]
    fn hsv_jitter_keeps_grey_and_turns_hue() {
        let same = jitter([200.0, 30.0, 30.0], [0.0, 0.0, 0.0]);
        assert!(
            same.iter()
                .zip([200.0, 30.0, 30.0])
                .all(|(a, b)| (a - b).abs() < 1e-3)
        );
        let green = jitter([200.0, 30.0, 30.0], [1.0 / 3.0, 0.0, 0.0]);
        assert!(
            (green[1] - 200.0).abs() < 1e-2 && (green[0] - 30.0).abs() < 1e-2,
            "{green:?}"
        );
        let grey = jitter([100.0, 100.0, 100.0], [0.2, 0.7, 0.0]);
        assert_eq!(grey, [100.0; 3], "no saturation to scale");
        let dark = jitter([100.0, 50.0, 50.0], [0.0, 0.0, -0.5]);
        assert!((dark[0] - 50.0).abs() < 1e-3, "{dark:?}");
        let _ = YoloBox {
            class: 0,
            cx: 0.5,
            cy: 0.5,
            w: 0.1,
            h: 0.1,
        };
    }
}
