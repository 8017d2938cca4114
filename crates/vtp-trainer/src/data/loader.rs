//! The input pipeline: worker threads decode, resize, augment (random crop,
//! horizontal flip) and normalise images into batches, and prefetch them
//! while the training step runs. Decoded images are cached in memory (when
//! they fit), so only the first epoch pays for decoding.
//!
//! Batches come out in a fixed order for a given seed and epoch, whatever
//! the number of workers: each batch draws its augmentation from its own
//! seeded generator.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

use image::imageops::FilterType;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use vtp_core::{Error, Result};

use super::Sample;
use super::prefetch::Batches;

/// ImageNet channel means, the normalisation every model here expects.
pub const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations.
pub const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// How batches are made.
#[derive(Debug, Clone, PartialEq)]
pub struct LoaderConfig {
    /// Images are resized (shorter side, then centre crop) to this square.
    pub image_size: u32,
    /// Images per batch.
    pub batch_size: usize,
    /// Worker threads.
    pub workers: usize,
    /// Random crop after padding by `image_size / 8` (training only).
    pub random_crop: bool,
    /// Random horizontal flip (training only).
    pub hflip: bool,
    /// Largest decoded cache; beyond it images are decoded every epoch.
    pub cache_bytes: u64,
    /// Corrupt images tolerated (skipped and counted) before the dataset is refused.
    pub max_corrupt: usize,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            image_size: 32,
            batch_size: 32,
            workers: 2,
            random_crop: true,
            hflip: true,
            cache_bytes: 2 * 1024 * 1024 * 1024,
            max_corrupt: 1,
        }
    }
}

/// One batch in NCHW layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `len * 3 * image_size * image_size` normalised values.
    pub images: Vec<f32>,
    /// Class indices.
    pub labels: Vec<i64>,
}

impl Batch {
    /// Images in the batch.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch holds no image.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

type Pixels = Arc<[u8]>;

/// Decodes `path` and resizes it to an RGB `size`×`size` square.
///
/// # Errors
/// [`Error::InvalidInput`] naming the file when it cannot be decoded.
pub fn decode(path: &Path, size: u32) -> Result<Vec<u8>> {
    Ok(resize(&open_image(path)?, size))
}

/// Decodes the image at `path`, whatever its extension says.
///
/// # Errors
/// [`Error::InvalidInput`] naming the file when it cannot be read or decoded.
pub fn open_image(path: &Path) -> Result<image::DynamicImage> {
    image::ImageReader::open(path)
        .and_then(image::ImageReader::with_guessed_format)
        .map_err(|e| Error::invalid("dataset", format!("cannot read {}: {e}", path.display())))?
        .decode()
        .map_err(|e| Error::invalid("dataset", format!("corrupt image {}: {e}", path.display())))
}

/// Resizes to an RGB `size`×`size` square (shorter side, then centre crop).
pub fn resize(image: &image::DynamicImage, size: u32) -> Vec<u8> {
    image
        .resize_to_fill(size, size, FilterType::Triangle)
        .to_rgb8()
        .into_raw()
}

/// Writes the normalised CHW floats of an RGB square into `out`, applying
/// the crop offset `(dy, dx)` (pixels outside are black) and a mirror.
fn write_normalised(pixels: &[u8], size: usize, dy: isize, dx: isize, flip: bool, out: &mut [f32]) {
    let plane = size * size;
    let black: [f32; 3] = std::array::from_fn(|c| -MEAN[c] / STD[c]);
    let scale: [f32; 3] = std::array::from_fn(|c| 1.0 / (255.0 * STD[c]));
    let offset: [f32; 3] = std::array::from_fn(|c| -MEAN[c] / STD[c]);
    for y in 0..size {
        let sy = y as isize + dy;
        for x in 0..size {
            let xx = if flip { size - 1 - x } else { x };
            let sx = xx as isize + dx;
            let i = y * size + x;
            if sy < 0 || sx < 0 || sy >= size as isize || sx >= size as isize {
                for c in 0..3 {
                    out[c * plane + i] = black[c];
                }
            } else {
                let src = (sy as usize * size + sx as usize) * 3;
                for c in 0..3 {
                    out[c * plane + i] = f32::from(pixels[src + c]) * scale[c] + offset[c];
                }
            }
        }
    }
}

/// Normalised CHW floats of an RGB square, without augmentation.
pub fn normalise(pixels: &[u8], size: u32) -> Vec<f32> {
    let size = size as usize;
    let mut out = vec![0.0; 3 * size * size];
    write_normalised(pixels, size, 0, 0, false, &mut out);
    out
}

#[derive(Debug)]
struct Shared {
    samples: Vec<Sample>,
    config: LoaderConfig,
    cache: Option<Vec<OnceLock<Option<Pixels>>>>,
    skipped: AtomicUsize,
}

impl Shared {
    /// The decoded pixels of sample `i`, or `None` when it is corrupt.
    fn pixels(&self, i: usize) -> Option<Pixels> {
        let load = || match decode(&self.samples[i].path, self.config.image_size) {
            Ok(pixels) => Some(Pixels::from(pixels)),
            Err(e) => {
                tracing::warn!(error = %e, "skipping image");
                None
            }
        };
        match &self.cache {
            Some(cache) => cache[i].get_or_init(load).clone(),
            None => {
                let pixels = load();
                if pixels.is_none() {
                    self.skipped.fetch_add(1, Ordering::Relaxed);
                }
                pixels
            }
        }
    }
}

/// Makes batches of a fixed set of samples.
#[derive(Debug, Clone)]
pub struct Loader {
    shared: Arc<Shared>,
}

impl Loader {
    /// A loader over `samples`; nothing is decoded yet.
    pub fn new(samples: Vec<Sample>, config: LoaderConfig) -> Self {
        let bytes = samples.len() as u64 * 3 * u64::from(config.image_size).pow(2);
        let cache = (bytes <= config.cache_bytes)
            .then(|| (0..samples.len()).map(|_| OnceLock::new()).collect());
        Loader {
            shared: Arc::new(Shared {
                samples,
                config,
                cache,
                skipped: AtomicUsize::new(0),
            }),
        }
    }

    /// Samples in the set.
    pub fn len(&self) -> usize {
        self.shared.samples.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.shared.samples.is_empty()
    }

    /// Batches per pass.
    pub fn batches(&self) -> usize {
        self.len().div_ceil(self.shared.config.batch_size)
    }

    /// Whether decoded images are kept in memory.
    pub fn is_cached(&self) -> bool {
        self.shared.cache.is_some()
    }

    /// Corrupt images skipped so far.
    pub fn skipped(&self) -> usize {
        match &self.shared.cache {
            Some(cache) => cache
                .iter()
                .filter(|c| matches!(c.get(), Some(None)))
                .count(),
            None => self.shared.skipped.load(Ordering::Relaxed),
        }
    }

    /// The files found corrupt so far (cached loaders only).
    pub fn corrupt_paths(&self) -> Vec<std::path::PathBuf> {
        let Some(cache) = &self.shared.cache else {
            return Vec::new();
        };
        (0..cache.len())
            .filter(|&i| matches!(cache[i].get(), Some(None)))
            .map(|i| self.shared.samples[i].path.clone())
            .collect()
    }

    /// Decodes every image now, on the worker threads (when caching), so a
    /// dataset of corrupt files fails before training starts. Returns the
    /// number of corrupt images skipped.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming a corrupt image when more than
    /// `max_corrupt` are corrupt.
    pub fn prepare(&self) -> Result<usize> {
        let Some(cache) = &self.shared.cache else {
            return Ok(0);
        };
        let next = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..self.shared.config.workers.max(1) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= cache.len() {
                            break;
                        }
                        self.shared.pixels(i);
                    }
                });
            }
        });
        let skipped = self.skipped();
        if skipped > self.shared.config.max_corrupt {
            let first = (0..cache.len())
                .find(|&i| matches!(cache[i].get(), Some(None)))
                .unwrap_or(0);
            let err = decode(
                &self.shared.samples[first].path,
                self.shared.config.image_size,
            )
            .err()
            .map_or_else(|| "unreadable".to_owned(), |e| e.to_string());
            return Err(Error::invalid(
                "dataset",
                format!(
                    "{skipped} corrupt images (at most {} tolerated); first: {err}",
                    self.shared.config.max_corrupt
                ),
            ));
        }
        Ok(skipped)
    }

    /// One pass over the set: shuffled and augmented when `train`, in order
    /// and plain otherwise. Workers start at once and stop when the
    /// iterator is dropped.
    pub fn epoch(&self, seed: u64, epoch: u32, train: bool) -> Epoch {
        let n = self.len();
        let mut order: Vec<usize> = (0..n).collect();
        let batch_seed = seed ^ (u64::from(epoch) << 32) ^ 0x9E37_79B9_7F4A_7C15;
        if train {
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(batch_seed));
        }
        let order = Arc::new(order);
        Batches::spawn(
            "vtp-loader",
            self.batches(),
            self.shared.config.workers,
            Batch::is_empty,
            || {
                let (shared, order) = (self.shared.clone(), order.clone());
                move |b| make_batch(&shared, &order, b, train, batch_seed)
            },
        )
    }
}

fn make_batch(shared: &Shared, order: &[usize], b: usize, train: bool, seed: u64) -> Batch {
    let config = &shared.config;
    let size = config.image_size as usize;
    let plane = 3 * size * size;
    let start = b * config.batch_size;
    let end = (start + config.batch_size).min(order.len());
    let mut rng = rand::rngs::StdRng::seed_from_u64(
        seed.wrapping_add((b as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)),
    );
    let mut images = vec![0.0f32; (end - start) * plane];
    let mut labels = Vec::with_capacity(end - start);
    let pad = (size / 8) as i64;
    for &i in &order[start..end] {
        let (dy, dx, flip) = if train {
            let dy = if config.random_crop {
                rng.random_range(-pad..=pad) as isize
            } else {
                0
            };
            let dx = if config.random_crop {
                rng.random_range(-pad..=pad) as isize
            } else {
                0
            };
            (dy, dx, config.hflip && rng.random_bool(0.5))
        } else {
            (0, 0, false)
        };
        let Some(pixels) = shared.pixels(i) else {
            continue;
        };
        let slot = labels.len();
        write_normalised(
            &pixels,
            size,
            dy,
            dx,
            flip,
            &mut images[slot * plane..(slot + 1) * plane],
        );
        labels.push(shared.samples[i].label as i64);
    }
    images.truncate(labels.len() * plane);
    Batch { images, labels }
}

/// The batches of one pass, in order.
pub type Epoch = Batches<Batch>;

#[cfg(test)]
mod tests {
    use super::*;

    fn write_png(path: &Path, shade: u8) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let img = image::RgbImage::from_fn(20, 12, |x, _| {
            image::Rgb([shade, (x * 10) as u8, 255 - shade])
        });
        img.save(path).unwrap();
    }

    fn samples(dir: &Path, n: usize) -> Vec<Sample> {
        (0..n)
            .map(|i| {
                let path = dir.join(format!("{}/{i}.png", i % 2));
                write_png(&path, (i * 20) as u8);
                Sample { path, label: i % 2 }
            })
            .collect()
    }

    #[test]
    fn batches_cover_the_set_in_a_seeded_order() {
        let dir = tempfile::tempdir().unwrap();
        let config = LoaderConfig {
            image_size: 8,
            batch_size: 3,
            workers: 3,
            ..LoaderConfig::default()
        };
        let loader = Loader::new(samples(dir.path(), 10), config.clone());
        assert_eq!(loader.prepare().unwrap(), 0);
        let one: Vec<Batch> = loader.epoch(1, 1, true).collect();
        assert_eq!(one.iter().map(Batch::len).collect::<Vec<_>>(), [3, 3, 3, 1]);
        assert_eq!(one[0].images.len(), 3 * 3 * 8 * 8);
        let again: Vec<Batch> = Loader::new(
            loader.shared.samples.clone(),
            LoaderConfig {
                workers: 1,
                ..config
            },
        )
        .epoch(1, 1, true)
        .collect();
        assert_eq!(
            one, again,
            "same seed and epoch: same batches, whatever the workers"
        );
        let other: Vec<Batch> = loader.epoch(1, 2, true).collect();
        assert_ne!(one, other, "another epoch reshuffles");
        let mut labels: Vec<i64> = one.iter().flat_map(|b| b.labels.clone()).collect();
        labels.sort_unstable();
        assert_eq!(labels, [0, 0, 0, 0, 0, 1, 1, 1, 1, 1]);
    }

    #[test]
    fn evaluation_is_plain_normalisation() {
        let dir = tempfile::tempdir().unwrap();
        let samples = samples(dir.path(), 2);
        let loader = Loader::new(
            samples.clone(),
            LoaderConfig {
                image_size: 8,
                batch_size: 2,
                ..LoaderConfig::default()
            },
        );
        let batch = loader.epoch(0, 0, false).next().unwrap();
        let expected = normalise(&decode(&samples[0].path, 8).unwrap(), 8);
        assert_eq!(&batch.images[..expected.len()], expected.as_slice());
    }

    #[test]
    fn corrupt_images_are_skipped_and_counted_up_to_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = samples(dir.path(), 6);
        std::fs::write(&set[2].path, b"not a png").unwrap();
        let config = LoaderConfig {
            image_size: 8,
            batch_size: 4,
            ..LoaderConfig::default()
        };
        let loader = Loader::new(set.clone(), config.clone());
        assert_eq!(loader.prepare().unwrap(), 1);
        assert_eq!(loader.epoch(0, 0, true).map(|b| b.len()).sum::<usize>(), 5);

        std::fs::write(&set[3].path, b"also broken").unwrap();
        let err = Loader::new(set.clone(), config).prepare().unwrap_err();
        assert!(err.to_string().contains("2 corrupt images"), "{err}");
        assert!(err.to_string().contains(".png"), "names a file: {err}");
        set.clear();
    }
}
