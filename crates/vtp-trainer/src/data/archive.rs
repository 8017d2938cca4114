//! Unpacking dataset archives (zip, tar, tar.gz) without trusting them:
//! entries that would land outside the target directory (`..`, absolute
//! paths), links and special files are refused, and nothing is written
//! outside the target. Bombs are refused too: more than
//! [`ArchiveLimits::max_entries`] entries, more bytes unpacked than
//! [`ArchiveLimits::max_ratio`] times the archive's size (counting what is
//! actually written, whatever the headers claim), an entry whose data does
//! not match its header's size, names with NUL bytes, duplicate names and
//! zip entries whose data overlap (the non-recursive zip bomb). Archives
//! inside the archive are written as files, never unpacked.

use std::fs::{self, File};
use std::io::{self, BufReader};
use std::path::{Component, Path, PathBuf};

use vtp_core::{Error, Result};

/// Largest total of unpacked bytes (guards against zip bombs).
pub const MAX_UNPACKED_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// What an archive may unpack to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArchiveLimits {
    /// Most entries (files and directories). A larger dataset is uploaded
    /// as a folder of files instead.
    pub max_entries: u64,
    /// Most bytes unpacked in all.
    pub max_bytes: u64,
    /// Most bytes unpacked per byte of archive (images barely compress; a
    /// bomb's ratio is in the thousands).
    pub max_ratio: u64,
    /// Bytes always allowed whatever the ratio (a small archive of text labels).
    pub ratio_floor: u64,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        ArchiveLimits {
            max_entries: 500_000,
            max_bytes: MAX_UNPACKED_BYTES,
            max_ratio: 100,
            ratio_floor: 64 * 1024 * 1024,
        }
    }
}

impl ArchiveLimits {
    /// The bytes an archive of `archive_len` bytes may unpack to.
    fn byte_budget(&self, archive_len: u64) -> u64 {
        archive_len
            .saturating_mul(self.max_ratio)
            .saturating_add(self.ratio_floor)
            .min(self.max_bytes)
    }
}

/// Running totals of one extraction against its limits.
struct Budget<'a> {
    archive: &'a Path,
    root: &'a Path,
    limits: ArchiveLimits,
    bytes_left: u64,
    entries: u64,
    names: std::collections::HashSet<PathBuf>,
}

impl Budget<'_> {
    /// Counts one entry that unpacks to `target` (so `a.png` and `./a.png`
    /// are the same name).
    fn entry(&mut self, target: &Path) -> Result<()> {
        let name = target;
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(invalid(
                self.archive,
                format!(
                    "holds more than {} entries; upload a larger dataset as a folder",
                    self.limits.max_entries
                ),
            ));
        }
        if !self.names.insert(name.to_path_buf()) {
            return Err(invalid(
                self.archive,
                format!(
                    "entry {:?} appears twice",
                    name.strip_prefix(self.root).unwrap_or(name).display()
                ),
            ));
        }
        Ok(())
    }
}

/// Whether `path` looks like an archive this module unpacks.
pub fn is_archive(path: &Path) -> bool {
    archive_kind(path).is_some()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Zip,
    Tar,
    TarGz,
}

fn archive_kind(path: &Path) -> Option<Kind> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    if name.ends_with(".zip") {
        Some(Kind::Zip)
    } else if name.ends_with(".tar.gz") || name.ends_with(".tgz") {
        Some(Kind::TarGz)
    } else if name.ends_with(".tar") {
        Some(Kind::Tar)
    } else {
        None
    }
}

fn invalid(archive: &Path, message: impl std::fmt::Display) -> Error {
    Error::invalid(
        "dataset",
        format!("archive {}: {message}", archive.display()),
    )
}

/// The path of an entry below `root`, or an error when it would escape.
fn safe_join(archive: &Path, root: &Path, entry: &Path) -> Result<PathBuf> {
    let mut out = root.to_path_buf();
    let mut depth = 0usize;
    for component in entry.components() {
        match component {
            Component::Normal(part) => {
                out.push(part);
                depth += 1;
            }
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(invalid(
                    archive,
                    format!("entry {:?} escapes the extraction root", entry.display()),
                ));
            }
        }
    }
    if depth == 0 {
        return Err(invalid(
            archive,
            format!("entry {:?} has no name", entry.display()),
        ));
    }
    Ok(out)
}

/// Unpacks `archive` into `dest` (created if missing) and returns the
/// dataset root: `dest`, or its only top-level directory when the archive
/// wraps everything in one folder.
///
/// # Errors
/// [`Error::InvalidInput`] for an unknown format, a corrupt archive or a
/// hostile entry (nothing is written outside `dest`); I/O errors as
/// [`Error::Internal`].
pub fn extract_archive(archive: &Path, dest: &Path) -> Result<PathBuf> {
    extract_archive_with(archive, dest, ArchiveLimits::default())
}

/// [`extract_archive`] under `limits`.
///
/// # Errors
/// As [`extract_archive`].
pub fn extract_archive_with(archive: &Path, dest: &Path, limits: ArchiveLimits) -> Result<PathBuf> {
    let kind = archive_kind(archive)
        .ok_or_else(|| invalid(archive, "not a .zip, .tar, .tar.gz or .tgz file"))?;
    fs::create_dir_all(dest)
        .map_err(|e| Error::internal(format!("creating {}: {e}", dest.display())))?;
    let file = File::open(archive).map_err(|e| invalid(archive, e))?;
    let archive_len = file.metadata().map_err(|e| invalid(archive, e))?.len();
    let mut budget = Budget {
        archive,
        root: dest,
        limits,
        bytes_left: limits.byte_budget(archive_len),
        entries: 0,
        names: std::collections::HashSet::new(),
    };
    match kind {
        Kind::Zip => extract_zip(archive, file, dest, &mut budget)?,
        Kind::Tar => extract_tar(archive, BufReader::new(file), dest, &mut budget)?,
        Kind::TarGz => extract_tar(
            archive,
            flate2::read::GzDecoder::new(BufReader::new(file)),
            dest,
            &mut budget,
        )?,
    }
    single_top_dir(dest)
}

fn io_error(path: &Path, e: io::Error) -> Error {
    Error::internal(format!("writing {}: {e}", path.display()))
}

fn extract_zip(archive: &Path, mut file: File, dest: &Path, budget: &mut Budget<'_>) -> Result<()> {
    let declared = declared_zip_entries(&mut file).map_err(|e| invalid(archive, e))?;
    if declared > budget.limits.max_entries {
        return Err(invalid(
            archive,
            format!(
                "declares {declared} entries, more than {}; upload a larger dataset as a folder",
                budget.limits.max_entries
            ),
        ));
    }
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| invalid(archive, e))?;
    if zip.len() as u64 > budget.limits.max_entries {
        return Err(invalid(
            archive,
            format!(
                "holds {} entries, more than {}; upload a larger dataset as a folder",
                zip.len(),
                budget.limits.max_entries
            ),
        ));
    }
    if zip.has_duplicate_names() {
        return Err(invalid(archive, "two entries have the same name"));
    }
    // Entries sharing compressed data are how a small zip unpacks to
    // terabytes without nesting; no honest tool writes them.
    if zip
        .has_overlapping_entries()
        .map_err(|e| invalid(archive, e))?
    {
        return Err(invalid(archive, "entries overlap (a zip bomb)"));
    }
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| invalid(archive, e))?;
        let raw_name = entry.name().map_err(|e| invalid(archive, e))?.into_owned();
        if raw_name.contains('\0') {
            return Err(invalid(
                archive,
                format!("entry {raw_name:?} has a NUL byte in its name"),
            ));
        }
        let name = PathBuf::from(&raw_name);
        let target = safe_join(archive, dest, &name)?;
        budget.entry(&target)?;
        if entry.is_symlink() {
            return Err(invalid(
                archive,
                format!("entry {raw_name:?} is a symbolic link"),
            ));
        }
        if entry.is_dir() {
            fs::create_dir_all(&target).map_err(|e| io_error(&target, e))?;
            continue;
        }
        let size = entry.size();
        write_entry(archive, &target, &mut entry, size, budget)?;
    }
    Ok(())
}

/// The largest entry count any end-of-central-directory record in the
/// zip's tail declares (and its Zip64 record's, where the classic record
/// has any field at its maximum, as the zip crate then reads only that
/// one), read before the zip crate parses the central directory.
/// That crate keeps every entry of the directory in memory (a few hundred
/// bytes each) and offers no way to read only the count, so a million tiny
/// entries would cost hundreds of megabytes before they could be refused;
/// hence these few lines of the format (APPNOTE 4.3.14 to 4.3.16). The
/// largest count of every candidate record bounds whichever the crate
/// picks, over a tail at least as long as the one it searches. A Zip64
/// locator that points at no Zip64 record is refused (the crate would
/// search for one elsewhere). No record found: 0, and the zip crate reports
/// the archive.
fn declared_zip_entries(file: &mut File) -> io::Result<u64> {
    use std::io::{Read, Seek, SeekFrom};
    const EOCD: [u8; 4] = 0x0605_4b50u32.to_le_bytes();
    const LOCATOR: [u8; 4] = 0x0706_4b50u32.to_le_bytes();
    const ZIP64_EOCD: [u8; 4] = 0x0606_4b50u32.to_le_bytes();
    fn read_at(file: &mut File, at: u64, buf: &mut [u8]) -> io::Result<bool> {
        let len = file.metadata()?.len();
        if at.checked_add(buf.len() as u64).is_none_or(|end| end > len) {
            return Ok(false);
        }
        file.seek(SeekFrom::Start(at))?;
        file.read_exact(buf)?;
        Ok(true)
    }
    let u64_at = |bytes: &[u8], at: usize| {
        let mut word = [0; 8];
        word.copy_from_slice(&bytes[at..at + 8]);
        u64::from_le_bytes(word)
    };
    let len = file.metadata()?.len();
    // The 22-byte record, a comment of at most 64 KiB, and whatever junk
    // the zip crate tolerates after it (its search starts 65,572 bytes
    // before the end; a margin on top).
    let tail_len = len.min(65_536 + 36 + 1024);
    let tail_start = len - tail_len;
    let mut tail = vec![0; usize::try_from(tail_len).unwrap_or_default()];
    read_at(file, tail_start, &mut tail)?;
    let mut most = 0;
    for at in (0..tail.len().saturating_sub(21)).filter(|&at| tail[at..at + 4] == EOCD) {
        let count = u16::from_le_bytes([tail[at + 10], tail[at + 11]]);
        most = most.max(u64::from(count));
        let size = u32::from_le_bytes([tail[at + 12], tail[at + 13], tail[at + 14], tail[at + 15]]);
        let offset =
            u32::from_le_bytes([tail[at + 16], tail[at + 17], tail[at + 18], tail[at + 19]]);
        if count != u16::MAX && size != u32::MAX && offset != u32::MAX {
            continue;
        }
        // Zip64: the 20-byte locator just before the record points at the
        // Zip64 record, whose total count is at byte 32.
        let mut locator = [0; 20];
        let Some(locator_at) = (tail_start + at as u64).checked_sub(20) else {
            continue;
        };
        if !read_at(file, locator_at, &mut locator)? || locator[..4] != LOCATOR {
            continue;
        }
        let mut record = [0; 56];
        if !read_at(file, u64_at(&locator, 8), &mut record)? || record[..4] != ZIP64_EOCD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "its Zip64 locator points at no Zip64 record",
            ));
        }
        most = most.max(u64_at(&record, 32));
    }
    file.seek(SeekFrom::Start(0))?;
    Ok(most)
}

/// Writes one file entry whose header says `size` bytes, counting what is
/// actually written against the budget: an entry whose data is longer or
/// shorter than its header says is refused.
fn write_entry(
    archive: &Path,
    target: &Path,
    entry: &mut impl io::Read,
    size: u64,
    budget: &mut Budget<'_>,
) -> Result<()> {
    let too_big = |budget: &Budget<'_>| {
        invalid(
            archive,
            format!(
                "unpacks to more than {}x its own size (and {} bytes at most): a zip bomb?",
                budget.limits.max_ratio, budget.limits.max_bytes
            ),
        )
    };
    if size > budget.bytes_left {
        return Err(too_big(budget));
    }
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    }
    let mut out = File::create(target).map_err(|e| io_error(target, e))?;
    // One byte past the header's size tells a lying header from an honest one.
    let written = io::copy(&mut io::Read::take(&mut *entry, size + 1), &mut out)
        .map_err(|e| invalid(archive, e))?;
    if written != size {
        let _ = fs::remove_file(target);
        return Err(invalid(
            archive,
            format!(
                "entry {:?} holds {} bytes, not the {size} its header says",
                target.file_name().unwrap_or_default(),
                if written > size {
                    "more".to_owned()
                } else {
                    written.to_string()
                }
            ),
        ));
    }
    budget.bytes_left -= written;
    Ok(())
}

/// Most bytes of a tar stream between two entries' data: headers, padding
/// and the pax and GNU long-name records that tar reads whole into memory
/// before it hands out the entry they describe.
const MAX_TAR_GAP: u64 = 1 << 20;

/// What a [`Metered`] tar stream has read.
struct Meter {
    read: std::cell::Cell<u64>,
    limit: u64,
    gap: std::cell::Cell<u64>,
    in_entry: std::cell::Cell<bool>,
}

/// The (decompressed) tar stream read through a [`Meter`]: all its bytes
/// count against the budget, and those outside entries' data against
/// [`MAX_TAR_GAP`], so a giant header record fails before it fills memory.
struct Metered<R> {
    inner: R,
    meter: std::rc::Rc<Meter>,
}

impl<R: io::Read> io::Read for Metered<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let meter = &self.meter;
        meter.read.set(meter.read.get() + n as u64);
        if !meter.in_entry.get() {
            meter.gap.set(meter.gap.get() + n as u64);
        }
        if meter.read.get() > meter.limit {
            return Err(io::Error::other(
                "unpacks to more than its budget (a tar bomb?)",
            ));
        }
        if meter.gap.get() > MAX_TAR_GAP {
            return Err(io::Error::other(format!(
                "holds a header record of more than {MAX_TAR_GAP} bytes"
            )));
        }
        Ok(n)
    }
}

fn extract_tar(
    archive: &Path,
    reader: impl io::Read,
    dest: &Path,
    budget: &mut Budget<'_>,
) -> Result<()> {
    let meter = std::rc::Rc::new(Meter {
        read: 0.into(),
        // The entries' data, and a header and its padding for each entry.
        limit: budget
            .bytes_left
            .saturating_add(budget.limits.max_entries.saturating_mul(1024)),
        gap: 0.into(),
        in_entry: false.into(),
    });
    let mut tar = tar::Archive::new(Metered {
        inner: reader,
        meter: meter.clone(),
    });
    for entry in tar.entries().map_err(|e| invalid(archive, e))? {
        let mut entry = entry.map_err(|e| invalid(archive, e))?;
        meter.gap.set(0);
        let raw = entry.path_bytes().into_owned();
        if raw.contains(&0) {
            return Err(invalid(
                archive,
                format!(
                    "entry {:?} has a NUL byte in its name",
                    String::from_utf8_lossy(&raw)
                ),
            ));
        }
        let name = entry.path().map_err(|e| invalid(archive, e))?.into_owned();
        let target = safe_join(archive, dest, &name)?;
        let kind = entry.header().entry_type();
        if !matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader | tar::EntryType::GNULongName
        ) {
            budget.entry(&target)?;
        }
        match kind {
            tar::EntryType::Directory => {
                fs::create_dir_all(&target).map_err(|e| io_error(&target, e))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                meter.in_entry.set(true);
                let written = write_entry(archive, &target, &mut entry, size, budget);
                meter.in_entry.set(false);
                written?;
            }
            // pax/GNU metadata records carry no file.
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName => {}
            other => {
                return Err(invalid(
                    archive,
                    format!(
                        "entry {:?} is a {other:?}; only files and directories are allowed",
                        name.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// `dir`, or its single subdirectory when it holds nothing else.
fn single_top_dir(dir: &Path) -> Result<PathBuf> {
    let entries: Vec<_> = fs::read_dir(dir)
        .map_err(|e| Error::internal(format!("reading {}: {e}", dir.display())))?
        .filter_map(std::result::Result::ok)
        .filter(|e| {
            !e.file_name().to_string_lossy().starts_with('.') && e.file_name() != "__MACOSX"
        })
        .collect();
    match entries.as_slice() {
        [only] if only.path().is_dir() && !looks_like_split_or_class(dir, &only.path()) => {
            Ok(only.path())
        }
        _ => Ok(dir.to_path_buf()),
    }
}

/// A lone `train/` folder is a split, not a wrapper; a lone class folder
/// (a folder of images) is a class. Both mean `dir` is the root.
fn looks_like_split_or_class(_dir: &Path, only: &Path) -> bool {
    let name = only
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    if matches!(name, "train" | "val" | "valid" | "validation" | "test") {
        return true;
    }
    fs::read_dir(only)
        .map(|entries| {
            entries
                .filter_map(std::result::Result::ok)
                .any(|e| e.path().is_file())
        })
        .unwrap_or(false)
}

/// Packs the directory `dir` into a zip at `archive`, every entry under
/// `dir`'s own name (the layout [`extract_archive`] unwraps). Files are
/// stored, not deflated: dataset images are compressed already. Hidden
/// files and symbolic links are left out.
///
/// # Errors
/// [`Error::InvalidInput`] when `dir` is not a readable directory; I/O
/// errors writing `archive` as [`Error::Internal`].
pub fn pack_dir(dir: &Path, archive: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Err(unreadable(dir, "not a directory"));
    }
    let root = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("dataset")
        .to_owned();
    let mut files = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(current) = stack.pop() {
        for entry in fs::read_dir(&current).map_err(|e| unreadable(&current, e))? {
            let entry = entry.map_err(|e| unreadable(&current, e))?;
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let kind = entry
                .file_type()
                .map_err(|e| unreadable(&entry.path(), e))?;
            if kind.is_dir() {
                stack.push(entry.path());
            } else if kind.is_file() {
                files.push(entry.path());
            }
        }
    }
    files.sort();
    let io_err =
        |e: &dyn std::fmt::Display| Error::internal(format!("writing {}: {e}", archive.display()));
    let out = File::create(archive).map_err(|e| io_err(&e))?;
    let mut writer = zip::ZipWriter::new(io::BufWriter::new(out));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Stored)
        .large_file(true);
    for path in files {
        let relative = path.strip_prefix(dir).unwrap_or(&path);
        let mut name = root.clone();
        for part in relative.components() {
            name.push('/');
            name.push_str(&part.as_os_str().to_string_lossy());
        }
        writer.start_file(name, options).map_err(|e| io_err(&e))?;
        let mut input = File::open(&path).map_err(|e| unreadable(&path, e))?;
        io::copy(&mut input, &mut writer).map_err(|e| io_err(&e))?;
    }
    writer.finish().map_err(|e| io_err(&e))?;
    Ok(())
}

fn unreadable(path: &Path, message: impl std::fmt::Display) -> Error {
    Error::invalid("dataset", format!("{}: {message}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn zip_with(entries: &[(&str, &[u8])]) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.zip");
        let mut writer = zip::ZipWriter::new(File::create(&path).unwrap());
        for (name, data) in entries {
            writer
                .start_file(*name, zip::write::SimpleFileOptions::default())
                .unwrap();
            writer.write_all(data).unwrap();
        }
        writer.finish().unwrap();
        (dir, path)
    }

    #[test]
    fn packed_folders_unpack_to_the_same_files() {
        let src = tempfile::tempdir().unwrap();
        let root = src.path().join("shapes");
        fs::create_dir_all(root.join("disc")).unwrap();
        fs::create_dir_all(root.join("square/nested")).unwrap();
        fs::write(root.join("disc/0.png"), b"disc").unwrap();
        fs::write(root.join("square/nested/1.jpg"), b"square").unwrap();
        fs::write(root.join(".DS_Store"), b"junk").unwrap();
        let archive = src.path().join("shapes.zip");
        pack_dir(&root, &archive).unwrap();

        let out = tempfile::tempdir().unwrap();
        let unpacked = extract_archive(&archive, out.path()).unwrap();
        assert_eq!(unpacked, out.path().join("shapes"));
        assert_eq!(fs::read(unpacked.join("disc/0.png")).unwrap(), b"disc");
        assert_eq!(
            fs::read(unpacked.join("square/nested/1.jpg")).unwrap(),
            b"square"
        );
        assert!(
            !unpacked.join(".DS_Store").exists(),
            "hidden files stay out"
        );

        let err = pack_dir(&root.join("missing"), &archive).unwrap_err();
        assert!(err.to_string().contains("not a directory"), "{err}");
    }

    #[test]
    fn zip_unpacks_and_unwraps_a_single_folder() {
        let (dir, path) = zip_with(&[
            ("digits/train/0/a.png", b"x"),
            ("digits/train/1/b.png", b"y"),
        ]);
        let root = extract_archive(&path, &dir.path().join("out")).unwrap();
        assert_eq!(root, dir.path().join("out/digits"));
        assert_eq!(fs::read(root.join("train/1/b.png")).unwrap(), b"y");
    }

    #[test]
    fn zip_escapes_are_refused_and_write_nothing_outside() {
        for name in ["../evil.txt", "a/../../evil.txt", "/tmp/evil.txt"] {
            let (dir, path) = zip_with(&[("ok/a.png", b"x"), (name, b"owned")]);
            let out = dir.path().join("out");
            let err = extract_archive(&path, &out).unwrap_err();
            assert!(err.to_string().contains("escapes"), "{name}: {err}");
            assert!(!dir.path().join("evil.txt").exists());
            assert!(
                !Path::new("/tmp/evil.txt").exists()
                    || name != "/tmp/evil.txt"
                    || fs::read("/tmp/evil.txt").unwrap() != b"owned"
            );
        }
    }

    fn tar_with(build: impl FnOnce(&mut tar::Builder<File>)) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.tar");
        let mut builder = tar::Builder::new(File::create(&path).unwrap());
        build(&mut builder);
        builder.finish().unwrap();
        (dir, path)
    }

    fn raw_header(name: &[u8], kind: tar::EntryType, size: u64) -> tar::Header {
        let mut header = tar::Header::new_old();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(0o644);
        header.set_cksum();
        header
    }

    #[test]
    fn tar_escapes_and_links_are_refused() {
        let (dir, path) = tar_with(|b| {
            let header = raw_header(b"../evil.txt", tar::EntryType::Regular, 5);
            b.append(&header, &b"owned"[..]).unwrap();
        });
        let err = extract_archive(&path, &dir.path().join("out")).unwrap_err();
        assert!(err.to_string().contains("escapes"), "{err}");
        assert!(!dir.path().join("evil.txt").exists());

        let (dir, path) = tar_with(|b| {
            let mut header = raw_header(b"link", tar::EntryType::Symlink, 0);
            header.set_link_name("/etc/passwd").unwrap();
            header.set_cksum();
            b.append(&header, &b""[..]).unwrap();
        });
        let err = extract_archive(&path, &dir.path().join("out")).unwrap_err();
        assert!(err.to_string().contains("Symlink"), "{err}");
        assert!(!dir.path().join("out/link").exists());
    }

    #[test]
    fn corrupt_and_unknown_archives_are_invalid_input() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.zip");
        fs::write(&path, b"this is not a zip").unwrap();
        assert!(matches!(
            extract_archive(&path, &dir.path().join("o")),
            Err(Error::InvalidInput { .. })
        ));
        let rar = dir.path().join("data.rar");
        fs::write(&rar, b"x").unwrap();
        assert!(matches!(
            extract_archive(&rar, &dir.path().join("o")),
            Err(Error::InvalidInput { .. })
        ));
    }

    /// A zip written by hand, as no honest writer would: `locals` are
    /// (name, data) deflated one after the other; `central` lists the
    /// directory's entries as (name, the local entry it points at, a
    /// declared size overriding the real one).
    fn raw_zip(locals: &[(&[u8], &[u8])], central: &[(&[u8], usize, Option<u32>)]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut placed = Vec::new();
        for (name, data) in locals {
            let mut deflate =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
            deflate.write_all(data).unwrap();
            let compressed = deflate.finish().unwrap();
            let mut crc = flate2::Crc::new();
            crc.update(data);
            let len = |n: usize| u32::try_from(n).unwrap();
            placed.push((
                len(out.len()),
                crc.sum(),
                len(compressed.len()),
                len(data.len()),
            ));
            out.extend(0x0403_4b50u32.to_le_bytes());
            for field in [20u16, 0, 8, 0, 0x21] {
                out.extend(field.to_le_bytes());
            }
            for field in [crc.sum(), len(compressed.len()), len(data.len())] {
                out.extend(field.to_le_bytes());
            }
            out.extend(u16::try_from(name.len()).unwrap().to_le_bytes());
            out.extend(0u16.to_le_bytes());
            out.extend(*name);
            out.extend(compressed);
        }
        let start = out.len();
        for (name, index, declared) in central {
            let (offset, crc, compressed, size) = placed[*index];
            out.extend(0x0201_4b50u32.to_le_bytes());
            for field in [20u16, 20, 0, 8, 0, 0x21] {
                out.extend(field.to_le_bytes());
            }
            for field in [crc, compressed, declared.unwrap_or(size)] {
                out.extend(field.to_le_bytes());
            }
            out.extend(u16::try_from(name.len()).unwrap().to_le_bytes());
            for field in [0u16, 0, 0, 0] {
                out.extend(field.to_le_bytes());
            }
            out.extend(0u32.to_le_bytes());
            out.extend(offset.to_le_bytes());
            out.extend(*name);
        }
        let size = u32::try_from(out.len() - start).unwrap();
        let count = u16::try_from(central.len()).unwrap();
        out.extend(0x0605_4b50u32.to_le_bytes());
        for field in [0u16, 0, count, count] {
            out.extend(field.to_le_bytes());
        }
        out.extend(size.to_le_bytes());
        out.extend(u32::try_from(start).unwrap().to_le_bytes());
        out.extend(0u16.to_le_bytes());
        out
    }

    /// Extracts `bytes` saved as `name`; the error's message, or the root.
    fn unpack(
        name: &str,
        bytes: &[u8],
        limits: ArchiveLimits,
    ) -> (tempfile::TempDir, Result<PathBuf>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(name);
        fs::write(&path, bytes).unwrap();
        let out = dir.path().join("out");
        let result = extract_archive_with(&path, &out, limits);
        (dir, result)
    }

    fn refused(result: Result<PathBuf>, why: &str) {
        match result {
            Err(Error::InvalidInput { message, .. }) => {
                assert!(message.contains(why), "{message:?} does not say {why:?}");
            }
            other => panic!("expected a refusal ({why}), got {other:?}"),
        }
    }

    #[test]
    fn the_hand_built_zip_is_a_valid_zip() {
        let bytes = raw_zip(&[(b"a.txt", b"hello")], &[(b"a.txt", 0, None)]);
        let (dir, result) = unpack("ok.zip", &bytes, ArchiveLimits::default());
        assert_eq!(fs::read(result.unwrap().join("a.txt")).unwrap(), b"hello");
        drop(dir);
    }

    #[test]
    fn a_non_recursive_overlapping_entry_bomb_is_refused_before_any_write() {
        // One megabyte of zeros deflates to about a kilobyte; a hundred
        // directory entries all pointing at it would unpack to 100 MB.
        let zeros = vec![0u8; 1 << 20];
        let names: Vec<Vec<u8>> = (0..100).map(|i| format!("{i}.png").into_bytes()).collect();
        let central: Vec<(&[u8], usize, Option<u32>)> =
            names.iter().map(|n| (n.as_slice(), 0, None)).collect();
        let bytes = raw_zip(&[(b"0.png", &zeros)], &central);
        assert!(bytes.len() < 20_000, "{} bytes", bytes.len());
        let (dir, result) = unpack("bomb.zip", &bytes, ArchiveLimits::default());
        refused(result, "overlap");
        assert!(
            !dir.path().join("out/0.png").exists(),
            "nothing was written"
        );
    }

    #[test]
    fn a_high_ratio_entry_is_refused_by_the_bytes_actually_written() {
        let zeros = vec![0u8; 4 << 20];
        let bytes = raw_zip(&[(b"big.bin", &zeros)], &[(b"big.bin", 0, None)]);
        let strict = ArchiveLimits {
            ratio_floor: 0,
            ..ArchiveLimits::default()
        };
        let (_dir, result) = unpack("ratio.zip", &bytes, strict);
        refused(result, "100x its own size");
        // A header that understates the size: the data gives it away.
        let bytes = raw_zip(&[(b"big.bin", &zeros)], &[(b"big.bin", 0, Some(10))]);
        let (_dir, result) = unpack("liar.zip", &bytes, ArchiveLimits::default());
        assert!(
            matches!(result, Err(Error::InvalidInput { .. })),
            "{result:?}"
        );
        // Within the budget it unpacks.
        let (_dir, result) = unpack(
            "fine.zip",
            &raw_zip(&[(b"big.bin", &zeros)], &[(b"big.bin", 0, None)]),
            ArchiveLimits::default(),
        );
        assert_eq!(
            fs::metadata(result.unwrap().join("big.bin")).unwrap().len(),
            4 << 20
        );
    }

    #[test]
    fn a_nested_archive_is_a_file_not_unpacked() {
        let inner = raw_zip(&[(b"a.bin", &vec![0u8; 1 << 20])], &[(b"a.bin", 0, None)]);
        let (_src, inner_path) = zip_with(&[("inner.zip", &inner), ("x.png", b"png")]);
        let out = tempfile::tempdir().unwrap();
        let root = extract_archive(&inner_path, out.path()).unwrap();
        assert_eq!(fs::read(root.join("inner.zip")).unwrap(), inner);
        assert!(!root.join("a.bin").exists() && !root.join("inner").exists());
    }

    #[test]
    fn too_many_entries_duplicates_and_nul_names_are_refused() {
        assert_eq!(ArchiveLimits::default().max_entries, 500_000);
        let few = ArchiveLimits {
            max_entries: 1_000,
            ..ArchiveLimits::default()
        };
        let names: Vec<String> = (0..1_001).map(|i| format!("d/{i}.png")).collect();
        let entries: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &b"x"[..])).collect();
        let (dir, path) = zip_with(&entries);
        refused(
            extract_archive_with(&path, &dir.path().join("o"), few),
            "more than 1000",
        );
        let (dir, path) = tar_with(|builder| {
            for name in &names {
                let mut header = raw_header(name.as_bytes(), tar::EntryType::Regular, 1);
                header.set_cksum();
                builder.append(&header, &b"x"[..]).unwrap();
            }
        });
        refused(
            extract_archive_with(&path, &dir.path().join("o"), few),
            "more than 1000",
        );

        let bytes = raw_zip(
            &[(b"a.png", b"one"), (b"a.png", b"two")],
            &[(b"a.png", 0, None), (b"a.png", 1, None)],
        );
        let (_dir, result) = unpack("dup.zip", &bytes, ArchiveLimits::default());
        refused(result, "same name");
        let (dir, path) = tar_with(|builder| {
            for data in [&b"one"[..], b"two"] {
                let mut header = raw_header(b"a.png", tar::EntryType::Regular, 3);
                header.set_cksum();
                builder.append(&header, data).unwrap();
            }
        });
        refused(
            extract_archive(&path, &dir.path().join("o")),
            "appears twice",
        );

        // A GNU long-name record tar would read whole into memory.
        let (dir, path) = tar_with(|builder| {
            let huge = vec![b'a'; 2 << 20];
            let header = raw_header(b"././@LongLink", tar::EntryType::GNULongName, 2 << 20);
            builder.append(&header, huge.as_slice()).unwrap();
            let header = raw_header(b"x.png", tar::EntryType::Regular, 1);
            builder.append(&header, &b"x"[..]).unwrap();
        });
        refused(
            extract_archive(&path, &dir.path().join("o")),
            "header record",
        );

        let bytes = raw_zip(&[(b"a\0b.png", b"x")], &[(b"a\0b.png", 0, None)]);
        let (_dir, result) = unpack("nul.zip", &bytes, ArchiveLimits::default());
        refused(result, "NUL");
    }
}
