//! A zip of a million tiny entries (Zip64, hand-built): refused by its
//! declared count before its central directory is parsed, with the peak
//! memory of this process (a test binary of its own) barely moving. The
//! other hand-built bombs (overlapping entries, nested archives, lying
//! headers, ratios) are unit tests of `vtp_trainer::data::archive`.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use vtp_trainer::data::archive::{ArchiveLimits, extract_archive, extract_archive_with};

const ENTRIES: u32 = 1_000_000;

/// How the end of a hand-built archive is dressed.
#[derive(Clone, Copy)]
struct Ending<'a> {
    /// The classic record's entry count (`0xFFFF`: "see Zip64").
    classic_count: u16,
    /// The classic record's directory offset (`0xFFFF_FFFF`: "see Zip64").
    classic_offset: u32,
    /// Bytes before the archive (a self-extractor's stub).
    prefix: &'a [u8],
    /// Bytes after the classic record.
    suffix: &'a [u8],
}

const HONEST: Ending<'static> = Ending {
    classic_count: u16::MAX,
    classic_offset: u32::MAX,
    prefix: b"",
    suffix: b"",
};

/// Writes a stored (uncompressed) Zip64 archive of `entries` one-byte files.
fn million_entry_zip(path: &Path, entries: u32) {
    zip64_archive(path, entries, HONEST);
}

fn zip64_archive(path: &Path, entries: u32, ending: Ending<'_>) {
    let mut out = BufWriter::new(File::create(path).unwrap());
    out.write_all(ending.prefix).unwrap();
    let mut offset: u64 = 0;
    let mut offsets = Vec::with_capacity(entries as usize);
    let crc = {
        let mut crc = flate2::Crc::new();
        crc.update(b"x");
        crc.sum()
    };
    let name = |i: u32| format!("d/{i:07}.png");
    for i in 0..entries {
        offsets.push(u32::try_from(offset).unwrap());
        let name = name(i);
        let mut header = Vec::with_capacity(64);
        header.extend(0x0403_4b50u32.to_le_bytes());
        for field in [20u16, 0, 0, 0, 0x21] {
            header.extend(field.to_le_bytes());
        }
        for field in [crc, 1, 1] {
            header.extend(field.to_le_bytes());
        }
        header.extend(u16::try_from(name.len()).unwrap().to_le_bytes());
        header.extend(0u16.to_le_bytes());
        header.extend(name.as_bytes());
        header.push(b'x');
        out.write_all(&header).unwrap();
        offset += header.len() as u64;
    }
    let directory_at = offset;
    for (i, at) in (0..entries).zip(offsets) {
        let name = name(i);
        let mut entry = Vec::with_capacity(64);
        entry.extend(0x0201_4b50u32.to_le_bytes());
        for field in [45u16, 20, 0, 0, 0, 0x21] {
            entry.extend(field.to_le_bytes());
        }
        for field in [crc, 1, 1] {
            entry.extend(field.to_le_bytes());
        }
        entry.extend(u16::try_from(name.len()).unwrap().to_le_bytes());
        for field in [0u16, 0, 0, 0] {
            entry.extend(field.to_le_bytes());
        }
        entry.extend(0u32.to_le_bytes());
        entry.extend(at.to_le_bytes());
        entry.extend(name.as_bytes());
        out.write_all(&entry).unwrap();
        offset += entry.len() as u64;
    }
    let directory_len = offset - directory_at;
    let zip64_record_at = offset;
    // The Zip64 end-of-central-directory record, its locator, and the
    // classic record saying "see Zip64" (0xFFFF entries).
    out.write_all(&0x0606_4b50u32.to_le_bytes()).unwrap();
    out.write_all(&44u64.to_le_bytes()).unwrap();
    for field in [45u16, 45] {
        out.write_all(&field.to_le_bytes()).unwrap();
    }
    for field in [0u32, 0] {
        out.write_all(&field.to_le_bytes()).unwrap();
    }
    for field in [
        u64::from(entries),
        u64::from(entries),
        directory_len,
        directory_at,
    ] {
        out.write_all(&field.to_le_bytes()).unwrap();
    }
    out.write_all(&0x0706_4b50u32.to_le_bytes()).unwrap();
    out.write_all(&0u32.to_le_bytes()).unwrap();
    out.write_all(&zip64_record_at.to_le_bytes()).unwrap();
    out.write_all(&1u32.to_le_bytes()).unwrap();
    out.write_all(&0x0605_4b50u32.to_le_bytes()).unwrap();
    for field in [0u16, 0, ending.classic_count, ending.classic_count] {
        out.write_all(&field.to_le_bytes()).unwrap();
    }
    for field in [u32::MAX, ending.classic_offset] {
        out.write_all(&field.to_le_bytes()).unwrap();
    }
    out.write_all(&0u16.to_le_bytes()).unwrap();
    out.write_all(ending.suffix).unwrap();
    out.flush().unwrap();
}

/// A `kB` line of `/proc/self/status`, in bytes.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|line| line.starts_with(field))
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn a_million_tiny_entries_are_refused_in_bounded_memory() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("million.zip");
    million_entry_zip(&path, ENTRIES);
    // The archive is whole: the zip crate itself reads all million entries.
    let zip = zip::ZipArchive::new(File::open(&path).unwrap()).unwrap();
    assert_eq!(zip.len(), ENTRIES as usize);
    drop(zip);

    // Peak memory from here on (writing 5 to clear_refs resets the peak to
    // the current resident size).
    std::fs::write("/proc/self/clear_refs", "5").unwrap();
    let before = status_bytes("VmRSS:");
    let err = extract_archive(&path, &dir.path().join("out")).unwrap_err();
    let grown = status_bytes("VmHWM:").saturating_sub(before);
    assert!(
        grown < 16 << 20,
        "refusing it took {} MiB more memory",
        grown >> 20
    );
    assert!(
        err.to_string().contains("declares 1000000 entries"),
        "{err}"
    );
    assert!(
        std::fs::read_dir(dir.path().join("out"))
            .unwrap()
            .next()
            .is_none(),
        "nothing was written"
    );
}

#[test]
fn a_declared_count_is_found_however_the_archive_ends() {
    // Above what a classic record can say (65,535), so only a Zip64 count
    // can be over it.
    let limits = ArchiveLimits {
        max_entries: 70_000,
        ..ArchiveLimits::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let refused = |name: &str, ending: Ending<'_>, expected: &str| {
        let path = dir.path().join(name);
        zip64_archive(&path, 80_000, ending);
        let out = dir.path().join(format!("{name}.out"));
        let err = extract_archive_with(&path, &out, limits).unwrap_err();
        assert!(err.to_string().contains(expected), "{name}: {err}");
        assert!(
            std::fs::read_dir(&out).unwrap().next().is_none(),
            "{name}: nothing written"
        );
    };
    refused("honest.zip", HONEST, "declares 80000 entries");
    // The classic count says 1; the zip crate reads the Zip64 record
    // because another field is at its maximum.
    let lying = Ending {
        classic_count: 1,
        ..HONEST
    };
    refused("lying-count.zip", lying, "declares 80000 entries");
    // Junk after the record, as far as the zip crate would still look.
    let junk = vec![0u8; 65_550];
    let trailing = Ending {
        suffix: &junk,
        ..HONEST
    };
    refused("trailing-junk.zip", trailing, "declares 80000 entries");
    // Data in front: the locator points at no Zip64 record, which the
    // crate would search for; refused rather than guessed at.
    let stub = Ending {
        prefix: b"#!stub\n",
        ..HONEST
    };
    refused("prefixed.zip", stub, "points at no Zip64 record");
}
