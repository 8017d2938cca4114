//! Datasets: archives unpacked safely, ImageFolder and YOLO layouts scanned,
//! and the input pipelines (classification and detection) that turn images
//! into batches on worker threads.

pub mod archive;
pub mod detect_loader;
pub mod image_folder;
pub mod loader;
pub mod prefetch;
pub mod yolo;

pub use archive::{extract_archive, is_archive, pack_dir};
pub use detect_loader::{DetectBatch, DetectEpoch, DetectLoader, DetectLoaderConfig, ImageShape};
pub use image_folder::{ImageFolder, Sample};
pub use loader::{Batch, Loader, LoaderConfig};
pub use yolo::{YoloBox, YoloDataset, YoloSample};
