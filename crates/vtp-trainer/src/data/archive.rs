//! Unpacking dataset archives (zip, tar, tar.gz) without trusting them:
//! entries that would land outside the target directory (`..`, absolute
//! paths), links and special files are refused, and nothing is written
//! outside the target.

use std::fs::{self, File};
use std::io::{self, BufReader};
use std::path::{Component, Path, PathBuf};

use vtp_core::{Error, Result};

/// Largest total of unpacked bytes (guards against zip bombs).
pub const MAX_UNPACKED_BYTES: u64 = 64 * 1024 * 1024 * 1024;

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
    let kind = archive_kind(archive)
        .ok_or_else(|| invalid(archive, "not a .zip, .tar, .tar.gz or .tgz file"))?;
    fs::create_dir_all(dest)
        .map_err(|e| Error::internal(format!("creating {}: {e}", dest.display())))?;
    let file = File::open(archive).map_err(|e| invalid(archive, e))?;
    match kind {
        Kind::Zip => extract_zip(archive, file, dest)?,
        Kind::Tar => extract_tar(archive, BufReader::new(file), dest)?,
        Kind::TarGz => extract_tar(
            archive,
            flate2::read::GzDecoder::new(BufReader::new(file)),
            dest,
        )?,
    }
    single_top_dir(dest)
}

fn io_error(path: &Path, e: io::Error) -> Error {
    Error::internal(format!("writing {}: {e}", path.display()))
}

fn extract_zip(archive: &Path, file: File, dest: &Path) -> Result<()> {
    let mut zip = zip::ZipArchive::new(BufReader::new(file)).map_err(|e| invalid(archive, e))?;
    let mut total = 0u64;
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| invalid(archive, e))?;
        let raw_name = entry.name().map_err(|e| invalid(archive, e))?.into_owned();
        let name = PathBuf::from(&raw_name);
        let target = safe_join(archive, dest, &name)?;
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
        write_entry(archive, &target, &mut entry, size, &mut total)?;
    }
    Ok(())
}

/// Writes one file entry of `size` bytes, keeping the running `total` under
/// [`MAX_UNPACKED_BYTES`]; `take` bounds what a lying size header can write.
fn write_entry(
    archive: &Path,
    target: &Path,
    entry: &mut impl io::Read,
    size: u64,
    total: &mut u64,
) -> Result<()> {
    *total = total.saturating_add(size);
    if *total > MAX_UNPACKED_BYTES {
        return Err(invalid(
            archive,
            format!("unpacks to more than {MAX_UNPACKED_BYTES} bytes"),
        ));
    }
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(|e| io_error(parent, e))?;
    }
    let mut out = File::create(target).map_err(|e| io_error(target, e))?;
    io::copy(&mut io::Read::take(entry, size), &mut out).map_err(|e| invalid(archive, e))?;
    Ok(())
}

fn extract_tar(archive: &Path, reader: impl io::Read, dest: &Path) -> Result<()> {
    let mut tar = tar::Archive::new(reader);
    let mut total = 0u64;
    for entry in tar.entries().map_err(|e| invalid(archive, e))? {
        let mut entry = entry.map_err(|e| invalid(archive, e))?;
        let name = entry.path().map_err(|e| invalid(archive, e))?.into_owned();
        let target = safe_join(archive, dest, &name)?;
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                fs::create_dir_all(&target).map_err(|e| io_error(&target, e))?;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                let size = entry.size();
                write_entry(archive, &target, &mut entry, size, &mut total)?;
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
}
