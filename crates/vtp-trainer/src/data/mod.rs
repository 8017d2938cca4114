//! Datasets: archives unpacked safely, ImageFolder and YOLO layouts scanned,
//! and the input pipelines (classification and detection) that turn images
//! into batches on worker threads.

//!
//! Unpacking archives ([`archive`]) needs no libtorch and comes with the
//! `service` feature too; the rest is the `torch` feature's.

pub mod archive;
#[cfg(feature = "torch")]
pub mod detect_loader;
#[cfg(feature = "torch")]
pub mod image_folder;
#[cfg(feature = "torch")]
pub mod image_set;
#[cfg(feature = "torch")]
pub mod loader;
#[cfg(feature = "torch")]
pub mod prefetch;
#[cfg(feature = "torch")]
pub mod yolo;

pub use archive::{extract_archive, is_archive, pack_dir};
#[cfg(feature = "torch")]
pub use detect_loader::{DetectBatch, DetectEpoch, DetectLoader, DetectLoaderConfig, ImageShape};
#[cfg(feature = "torch")]
pub use image_folder::{ImageFolder, Sample};
#[cfg(feature = "torch")]
pub use image_set::{HasImage, ImageSet, ImageSetConfig, Prepare, max_corrupt, prepare_split};
#[cfg(feature = "torch")]
pub use loader::{Batch, Loader, LoaderConfig};
#[cfg(feature = "torch")]
pub use yolo::{YoloBox, YoloDataset, YoloSample};
