//! The ImageFolder layout: one folder per class, holding JPEG and PNG files;
//! either `train/` and `val/` splits of that, or one set that is split by a
//! seeded ratio.

use std::path::{Path, PathBuf};

use rand::SeedableRng;
use rand::seq::SliceRandom;
use vtp_core::{Error, Result};

/// One labelled image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The image file.
    pub path: PathBuf,
    /// Index into [`ImageFolder::classes`].
    pub label: usize,
}

/// A dataset split into training and validation samples.
#[derive(Debug, Clone)]
pub struct ImageFolder {
    /// Class names, sorted; labels index into this.
    pub classes: Vec<String>,
    /// Training samples.
    pub train: Vec<Sample>,
    /// Validation samples.
    pub val: Vec<Sample>,
}

const TRAIN_DIRS: [&str; 1] = ["train"];
const VAL_DIRS: [&str; 4] = ["val", "valid", "validation", "test"];

fn invalid(message: impl Into<String>) -> Error {
    Error::invalid("dataset", message)
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| invalid(format!("cannot read {}: {e}", dir.display())))?
        .filter_map(std::result::Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            !p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'))
        })
        .collect();
    entries.sort();
    Ok(entries)
}

/// Class folders of `dir` and their images (recursively).
fn scan(dir: &Path) -> Result<Vec<(String, Vec<PathBuf>)>> {
    let mut classes = Vec::new();
    for entry in sorted_entries(dir)? {
        if !entry.is_dir() {
            continue;
        }
        let name = entry
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let mut images = Vec::new();
        let mut stack = vec![entry];
        while let Some(d) = stack.pop() {
            for p in sorted_entries(&d)? {
                if p.is_dir() {
                    stack.push(p);
                } else if is_image(&p) {
                    images.push(p);
                }
            }
        }
        images.sort();
        classes.push((name, images));
    }
    Ok(classes)
}

fn samples(scanned: Vec<(String, Vec<PathBuf>)>, classes: &[String]) -> Result<Vec<Sample>> {
    let mut out = Vec::new();
    for (name, images) in scanned {
        let label = classes.iter().position(|c| *c == name).ok_or_else(|| {
            invalid(format!(
                "class {name:?} of the validation split is not in the training split"
            ))
        })?;
        out.extend(images.into_iter().map(|path| Sample { path, label }));
    }
    Ok(out)
}

impl ImageFolder {
    /// Scans `root`. With `train/` and a `val/` (or `valid/`, `validation/`,
    /// `test/`) folder those are the splits; otherwise `root` holds the class
    /// folders and `val_split` of each class (at least one image, chosen with
    /// `seed`) is held out for validation.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the problem: a missing directory, no
    /// class folders, fewer than two classes, a class without images.
    pub fn open(root: &Path, val_split: f64, seed: u64) -> Result<Self> {
        if !root.is_dir() {
            return Err(invalid(format!("{} is not a directory", root.display())));
        }
        let train_dir = TRAIN_DIRS.iter().map(|d| root.join(d)).find(|p| p.is_dir());
        let val_dir = VAL_DIRS.iter().map(|d| root.join(d)).find(|p| p.is_dir());
        let dataset = match (train_dir, val_dir) {
            (Some(train_dir), Some(val_dir)) => {
                let train = scan(&train_dir)?;
                check_classes(&train, &train_dir)?;
                let classes: Vec<String> = train.iter().map(|(n, _)| n.clone()).collect();
                let val = samples(scan(&val_dir)?, &classes)?;
                ImageFolder {
                    train: samples(train, &classes)?,
                    val,
                    classes,
                }
            }
            (Some(train_dir), None) => Self::split(&train_dir, val_split, seed)?,
            _ => Self::split(root, val_split, seed)?,
        };
        if dataset.val.is_empty() {
            return Err(invalid("the validation split holds no images"));
        }
        Ok(dataset)
    }

    fn split(dir: &Path, val_split: f64, seed: u64) -> Result<Self> {
        let scanned = scan(dir)?;
        check_classes(&scanned, dir)?;
        let classes: Vec<String> = scanned.iter().map(|(n, _)| n.clone()).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (label, (name, mut images)) in scanned.into_iter().enumerate() {
            if images.len() < 2 {
                return Err(invalid(format!(
                    "class {name:?} needs at least 2 images to split, has {}",
                    images.len()
                )));
            }
            images.shuffle(&mut rng);
            let held_out =
                ((images.len() as f64 * val_split).round() as usize).clamp(1, images.len() - 1);
            for (i, path) in images.into_iter().enumerate() {
                let sample = Sample { path, label };
                if i < held_out {
                    val.push(sample)
                } else {
                    train.push(sample)
                }
            }
        }
        Ok(ImageFolder {
            classes,
            train,
            val,
        })
    }
}

fn check_classes(scanned: &[(String, Vec<PathBuf>)], dir: &Path) -> Result<()> {
    if scanned.is_empty() {
        return Err(invalid(format!(
            "{} is not an ImageFolder: expected one folder per class (or train/ and val/ folders of them)",
            dir.display()
        )));
    }
    if scanned.len() < 2 {
        return Err(invalid(format!(
            "{} holds a single class {:?}; classification needs two or more",
            dir.display(),
            scanned[0].0
        )));
    }
    if let Some((name, _)) = scanned.iter().find(|(_, images)| images.is_empty()) {
        return Err(invalid(format!(
            "class {name:?} in {} holds no .jpg, .jpeg or .png images",
            dir.display()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    #[test]
    fn explicit_splits_share_class_indices() {
        let dir = tempfile::tempdir().unwrap();
        for (split, class, n) in [
            ("train", "cat", 3),
            ("train", "dog", 2),
            ("val", "dog", 1),
            ("val", "cat", 1),
        ] {
            for i in 0..n {
                touch(&dir.path().join(format!("{split}/{class}/{i}.jpg")));
            }
        }
        let ds = ImageFolder::open(dir.path(), 0.2, 1).unwrap();
        assert_eq!(ds.classes, ["cat", "dog"]);
        assert_eq!(ds.train.len(), 5);
        assert_eq!(ds.val.len(), 2);
        assert!(
            ds.val
                .iter()
                .any(|s| s.label == 1 && s.path.ends_with("val/dog/0.jpg"))
        );
    }

    #[test]
    fn a_single_set_is_split_by_seed() {
        let dir = tempfile::tempdir().unwrap();
        for class in ["a", "b"] {
            for i in 0..10 {
                touch(&dir.path().join(format!("{class}/{i}.png")));
            }
        }
        touch(&dir.path().join("a/notes.txt"));
        let one = ImageFolder::open(dir.path(), 0.2, 7).unwrap();
        let again = ImageFolder::open(dir.path(), 0.2, 7).unwrap();
        let other = ImageFolder::open(dir.path(), 0.2, 8).unwrap();
        assert_eq!((one.train.len(), one.val.len()), (16, 4));
        assert_eq!(one.val, again.val, "the same seed gives the same split");
        assert_ne!(one.val, other.val);
    }

    #[test]
    fn bad_layouts_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let err = ImageFolder::open(&dir.path().join("missing"), 0.2, 1).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
        let err = ImageFolder::open(dir.path(), 0.2, 1).unwrap_err();
        assert!(err.to_string().contains("not an ImageFolder"), "{err}");
        touch(&dir.path().join("a/1.png"));
        touch(&dir.path().join("a/2.png"));
        let err = ImageFolder::open(dir.path(), 0.2, 1).unwrap_err();
        assert!(err.to_string().contains("single class"), "{err}");
        std::fs::create_dir_all(dir.path().join("b")).unwrap();
        let err = ImageFolder::open(dir.path(), 0.2, 1).unwrap_err();
        assert!(err.to_string().contains("holds no"), "{err}");
    }
}
