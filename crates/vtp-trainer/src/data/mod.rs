//! Datasets: archives unpacked safely, ImageFolder layouts scanned, and the
//! input pipeline that turns images into normalised batches on worker threads.

pub mod archive;
pub mod detect_loader;
pub mod image_folder;
pub mod loader;
pub mod yolo;

pub use archive::{extract_archive, is_archive, pack_dir};
pub use image_folder::{ImageFolder, Sample};
pub use loader::{Batch, Loader, LoaderConfig};
