//! The input pipeline: worker threads decode, resize, augment (random crop,
//! horizontal flip) and normalise images into batches, and prefetch them
//! while the training step runs. Decoded images are cached in memory (when
//! they fit), so only the first epoch pays for decoding.
//!
//! Batches come out in a fixed order for a given seed and epoch, whatever
//! the number of workers: each batch draws its augmentation from its own
//! seeded generator. The set, its cache and its corrupt images are the
//! shared [`ImageSet`]'s; this module decodes and batches.

use std::path::Path;
use std::sync::Arc;

use image::imageops::FilterType;
use rand::RngExt;
use vtp_core::{Error, Result};

use super::Sample;
use super::image_set::{ImageSet, ImageSetConfig, batch_rng};
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

/// A decoded image: an RGB `image_size` square.
pub type Pixels = Arc<[u8]>;

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
    images: ImageSet<Sample, Pixels>,
    config: LoaderConfig,
}

impl super::Prepare for Loader {
    fn len(&self) -> usize {
        Loader::len(self)
    }
    fn prepare(&self) -> Result<usize> {
        Loader::prepare(self)
    }
    fn corrupt_paths(&self) -> Vec<std::path::PathBuf> {
        Loader::corrupt_paths(self)
    }
}

/// [`decode`], shared.
fn decode_pixels(path: &Path, size: u32) -> Result<Pixels> {
    decode(path, size).map(Pixels::from)
}

/// Makes batches of a fixed set of samples.
#[derive(Debug, Clone)]
pub struct Loader {
    shared: Arc<Shared>,
}

impl Loader {
    /// A loader over `samples`; nothing is decoded yet.
    pub fn new(samples: Vec<Sample>, config: LoaderConfig) -> Self {
        let images = ImageSet::new(
            samples,
            decode_pixels,
            ImageSetConfig {
                image_size: config.image_size,
                workers: config.workers,
                cache_bytes: config.cache_bytes,
                max_corrupt: config.max_corrupt,
            },
        );
        Loader {
            shared: Arc::new(Shared { images, config }),
        }
    }

    /// The samples and their decoded images.
    pub fn images(&self) -> &ImageSet<Sample, Pixels> {
        &self.shared.images
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

    /// Decodes every image now, on the worker threads (filling the cache
    /// when there is one), so a dataset of corrupt files fails before
    /// training starts. Returns the number of corrupt images skipped.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming a corrupt image when more than
    /// `max_corrupt` are corrupt.
    pub fn prepare(&self) -> Result<usize> {
        self.shared.images.prepare()
    }

    /// One pass over the set: shuffled and augmented when `train`, in order
    /// and plain otherwise. Workers start at once and stop when the
    /// iterator is dropped.
    pub fn epoch(&self, seed: u64, epoch: u32, train: bool) -> Epoch {
        let (order, batch_seed) = self.shared.images.order(seed, epoch, train);
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
    let mut rng = batch_rng(seed, b);
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
        let Some(pixels) = shared.images.image(i) else {
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
        labels.push(shared.images.samples()[i].label as i64);
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
            loader.images().samples().to_vec(),
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
