//! What every task's input pipeline shares: a fixed set of samples whose
//! images are decoded on worker threads and cached in memory when they fit,
//! corrupt files skipped and counted against the dataset's policy, and the
//! seeded order of each pass. The classifier's [`Loader`](super::Loader)
//! and the detector's [`DetectLoader`](super::DetectLoader) differ only in
//! how one image is decoded and how a batch is made of decoded images; a
//! new task's loader is those two functions over an [`ImageSet`].

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use vtp_core::{Error, Result};

/// A sample with an image file.
pub trait HasImage {
    /// The image file.
    fn image_path(&self) -> &Path;
}

impl HasImage for super::Sample {
    fn image_path(&self) -> &Path {
        &self.path
    }
}

impl HasImage for super::YoloSample {
    fn image_path(&self) -> &Path {
        &self.image
    }
}

/// How one image file becomes what a task's batches are made of (`size`:
/// the task's input size).
pub type DecodeFn<I> = fn(&Path, u32) -> Result<I>;

/// How an [`ImageSet`] decodes and keeps its images.
#[derive(Debug, Clone, Copy)]
pub struct ImageSetConfig {
    /// The task's input size, handed to the decoder.
    pub image_size: u32,
    /// Threads decoding in [`ImageSet::prepare`].
    pub workers: usize,
    /// Largest decoded cache (at 3 bytes a pixel of an `image_size`
    /// square); beyond it images are decoded every epoch.
    pub cache_bytes: u64,
    /// Corrupt images tolerated (skipped and counted) before the set is refused.
    pub max_corrupt: usize,
}

/// A fixed set of samples and their decoded images.
pub struct ImageSet<S, I> {
    samples: Vec<S>,
    decode: DecodeFn<I>,
    config: ImageSetConfig,
    cache: Option<Vec<OnceLock<Option<I>>>>,
    /// Indices of the samples found corrupt so far.
    corrupt: Mutex<BTreeSet<usize>>,
}

impl<S, I> std::fmt::Debug for ImageSet<S, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageSet")
            .field("samples", &self.samples.len())
            .field("config", &self.config)
            .field("cached", &self.cache.is_some())
            .field("corrupt", &self.corrupt.lock().map_or(0, |c| c.len()))
            .finish()
    }
}

impl<S: HasImage + Sync, I: Clone + Send + Sync> ImageSet<S, I> {
    /// A set over `samples`, decoded by `decode`; nothing is decoded yet.
    pub fn new(samples: Vec<S>, decode: DecodeFn<I>, config: ImageSetConfig) -> Self {
        let bytes = samples.len() as u64 * 3 * u64::from(config.image_size).pow(2);
        let cache = (bytes <= config.cache_bytes)
            .then(|| (0..samples.len()).map(|_| OnceLock::new()).collect());
        ImageSet {
            samples,
            decode,
            config,
            cache,
            corrupt: Mutex::new(BTreeSet::new()),
        }
    }

    /// The samples, in the set's order.
    pub fn samples(&self) -> &[S] {
        &self.samples
    }

    /// Samples in the set.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Whether decoded images are kept in memory.
    pub fn is_cached(&self) -> bool {
        self.cache.is_some()
    }

    /// The decoded image of sample `i`, or `None` when it is corrupt
    /// (logged once, and counted).
    pub fn image(&self, i: usize) -> Option<I> {
        let load = || match (self.decode)(self.samples[i].image_path(), self.config.image_size) {
            Ok(image) => Some(image),
            Err(e) => {
                if self.corrupt.lock().expect("corrupt set").insert(i) {
                    tracing::warn!(error = %e, "skipping image");
                }
                None
            }
        };
        match &self.cache {
            Some(cache) => cache[i].get_or_init(load).clone(),
            None => load(),
        }
    }

    /// Corrupt images found so far (they are skipped).
    pub fn skipped(&self) -> usize {
        self.corrupt.lock().expect("corrupt set").len()
    }

    /// The files found corrupt so far, in the set's order.
    pub fn corrupt_paths(&self) -> Vec<PathBuf> {
        self.corrupt
            .lock()
            .expect("corrupt set")
            .iter()
            .map(|&i| self.samples[i].image_path().to_path_buf())
            .collect()
    }

    /// Decodes every image now, on the worker threads, so that a corrupt
    /// dataset fails before training starts; when the set is cached this
    /// also fills the cache. Returns the number of corrupt images skipped.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the first corrupt image when more
    /// than `max_corrupt` are corrupt.
    pub fn prepare(&self) -> Result<usize> {
        let next = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..self.config.workers.max(1) {
                scope.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= self.len() {
                            break;
                        }
                        self.image(i);
                    }
                });
            }
        });
        let skipped = self.skipped();
        if skipped > self.config.max_corrupt {
            let first = self
                .corrupt
                .lock()
                .expect("corrupt set")
                .first()
                .copied()
                .unwrap_or(0);
            let err = (self.decode)(self.samples[first].image_path(), self.config.image_size)
                .err()
                .map_or_else(|| "unreadable".to_owned(), |e| e.to_string());
            return Err(Error::invalid(
                "dataset",
                format!(
                    "{skipped} corrupt images (at most {} tolerated); first: {err}",
                    self.config.max_corrupt
                ),
            ));
        }
        Ok(skipped)
    }

    /// The sample order of one pass and the seed its batches draw their
    /// augmentation from: shuffled when `train`, the set's order otherwise;
    /// the same for the same `(seed, epoch)`.
    pub fn order(&self, seed: u64, epoch: u32, train: bool) -> (Arc<Vec<usize>>, u64) {
        let mut order: Vec<usize> = (0..self.len()).collect();
        let batch_seed = seed ^ (u64::from(epoch) << 32) ^ 0x9E37_79B9_7F4A_7C15;
        if train {
            order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(batch_seed));
        }
        (Arc::new(order), batch_seed)
    }
}

/// The seeded generator of batch `b` of a pass whose seed is `seed`: each
/// batch draws from its own, so batches are the same whatever the number of
/// workers.
pub fn batch_rng(seed: u64, b: usize) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(
        seed.wrapping_add((b as u64 + 1).wrapping_mul(0xD1B5_4A32_D192_ED03)),
    )
}

/// The corrupt images a dataset of `total` images may hold, skipped and
/// counted, before it is refused: 1%, at least one (every task's policy).
pub fn max_corrupt(total: usize) -> usize {
    (total / 100).max(1)
}

/// A set of images a task trains or validates on: an [`ImageSet`], or a
/// task's loader over one.
pub trait Prepare {
    /// Images in the set.
    fn len(&self) -> usize;
    /// Whether the set holds no image.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Decodes every image now; the corrupt ones skipped.
    ///
    /// # Errors
    /// The set's own refusal (too many corrupt images, a setting the
    /// task cannot use).
    fn prepare(&self) -> Result<usize>;
    /// The files found corrupt so far.
    fn corrupt_paths(&self) -> Vec<PathBuf>;
}

impl<S: HasImage + Sync, I: Clone + Send + Sync> Prepare for ImageSet<S, I> {
    fn len(&self) -> usize {
        ImageSet::len(self)
    }
    fn prepare(&self) -> Result<usize> {
        ImageSet::prepare(self)
    }
    fn corrupt_paths(&self) -> Vec<PathBuf> {
        ImageSet::corrupt_paths(self)
    }
}

/// Prepares a task's training and validation sets ([`Prepare::prepare`])
/// and applies the policy of [`max_corrupt`] to both together: the
/// corrupt images skipped.
///
/// # Errors
/// [`Error::InvalidInput`] naming the first corrupt file when the two sets
/// hold more than the policy tolerates; either set's own refusal.
pub fn prepare_split(train: &impl Prepare, val: &impl Prepare) -> Result<usize> {
    let total = train.len() + val.len();
    let max = max_corrupt(total);
    let skipped = train.prepare()? + val.prepare()?;
    if skipped > max {
        let mut corrupt = train.corrupt_paths();
        corrupt.extend(val.corrupt_paths());
        let first = corrupt
            .first()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        return Err(Error::invalid(
            "dataset",
            format!(
                "{skipped} corrupt images of {total} (at most {max} tolerated); first: {first}"
            ),
        ));
    }
    Ok(skipped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Sample;

    /// "Decodes" a file into its length; an empty file is corrupt.
    fn length(path: &Path, _size: u32) -> Result<usize> {
        match std::fs::metadata(path).map(|m| m.len()) {
            Ok(0) | Err(_) => Err(Error::invalid(
                "dataset",
                format!("corrupt image {}", path.display()),
            )),
            Ok(n) => Ok(n as usize),
        }
    }

    fn set(
        dir: &Path,
        sizes: &[usize],
        cache_bytes: u64,
        max_corrupt: usize,
    ) -> ImageSet<Sample, usize> {
        let samples = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                let path = dir.join(format!("{i}.img"));
                std::fs::write(&path, vec![1u8; n]).unwrap();
                Sample { path, label: 0 }
            })
            .collect();
        let config = ImageSetConfig {
            image_size: 4,
            workers: 3,
            cache_bytes,
            max_corrupt,
        };
        ImageSet::new(samples, length, config)
    }

    #[test]
    fn images_are_decoded_once_when_cached_and_corrupt_ones_counted_once() {
        let dir = tempfile::tempdir().unwrap();
        let cached = set(dir.path(), &[3, 0, 5, 7], u64::MAX, 1);
        assert!(cached.is_cached());
        assert_eq!(cached.prepare().unwrap(), 1);
        // The file changes on disk: the cache still answers what was decoded.
        std::fs::write(&cached.samples()[0].path, b"longer now").unwrap();
        assert_eq!(cached.image(0), Some(3));
        assert_eq!(cached.image(1), None);
        assert_eq!(cached.skipped(), 1, "a corrupt image counts once");
        assert_eq!(cached.corrupt_paths(), [cached.samples()[1].path.clone()]);

        let dir = tempfile::tempdir().unwrap();
        let uncached = set(dir.path(), &[3, 0, 5, 7], 0, 1);
        assert!(!uncached.is_cached());
        assert_eq!(
            uncached.prepare().unwrap(),
            1,
            "an uncached set is checked too"
        );
        std::fs::write(&uncached.samples()[0].path, b"longer now").unwrap();
        assert_eq!(uncached.image(0), Some(10), "decoded again");
        for _ in 0..3 {
            assert_eq!(uncached.image(1), None);
        }
        assert_eq!(uncached.skipped(), 1, "a corrupt image counts once");
    }

    #[test]
    fn the_policy_refuses_a_set_naming_its_first_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let one = set(dir.path(), &[3, 0, 0, 7], u64::MAX, 1);
        let err = one.prepare().unwrap_err();
        assert!(err.to_string().contains("2 corrupt images"), "{err}");
        assert!(err.to_string().contains("1.img"), "{err}");

        assert_eq!(max_corrupt(10), 1);
        assert_eq!(max_corrupt(1000), 10);
        let train_dir = tempfile::tempdir().unwrap();
        let val_dir = tempfile::tempdir().unwrap();
        let train = set(train_dir.path(), &[1, 0, 1], u64::MAX, 1);
        let val = set(val_dir.path(), &[1, 1, 0], u64::MAX, 1);
        let err = prepare_split(&train, &val).unwrap_err();
        assert!(err.to_string().contains("2 corrupt images of 6"), "{err}");
        let train = set(train_dir.path(), &[1, 0, 1], u64::MAX, 1);
        let val = set(val_dir.path(), &[1, 1, 1], u64::MAX, 1);
        assert_eq!(prepare_split(&train, &val).unwrap(), 1);
    }

    #[test]
    fn a_pass_is_seeded_and_evaluation_keeps_the_order() {
        let dir = tempfile::tempdir().unwrap();
        let images = set(dir.path(), &[1; 20], u64::MAX, 1);
        let (plain, _) = images.order(7, 1, false);
        assert_eq!(*plain, (0..20).collect::<Vec<_>>());
        let (one, seed) = images.order(7, 1, true);
        assert_eq!(images.order(7, 1, true), (one.clone(), seed));
        assert_ne!(images.order(7, 2, true).0, one, "another epoch reshuffles");
        let mut sorted = (*one).clone();
        sorted.sort_unstable();
        assert_eq!(sorted, *plain);
    }
}
