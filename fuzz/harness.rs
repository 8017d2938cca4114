//! What each fuzz target checks on one input. The fuzz targets
//! (`fuzz/fuzz_targets/*.rs`) run these under libFuzzer; the regression test
//! (`crates/vtp-trainer/tests/fuzz_regressions.rs`) replays every input kept
//! under `fuzz/corpus/<target>/` and `fuzz/regressions/<target>/` through
//! them in the test command. A panic is a finding.

use std::path::Path;

use vtp_core::callback_signature::CallbackSecret;
use vtp_core::report::{ReportPlan, plan_report};
use vtp_core::{JobStatus, NewJob, TrainingReport};
use vtp_trainer::data::archive::{ArchiveLimits, extract_archive_with};
use vtp_trainer::data::yolo::parse_labels;

/// Archive extraction: any bytes, as a `.zip`, `.tar` or `.tar.gz` (the
/// first byte picks), are unpacked inside the target directory, within the
/// limits and without links, or refused with an error.
pub fn archive(data: &[u8]) {
    let Some((&kind, bytes)) = data.split_first() else {
        return;
    };
    let ext = ["zip", "tar", "tar.gz"][usize::from(kind % 3)];
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join(format!("input.{ext}"));
    std::fs::write(&archive, bytes).unwrap();
    let dest = dir.path().join("out");
    let limits = ArchiveLimits {
        max_entries: 1000,
        max_bytes: 8 << 20,
        max_ratio: 100,
        ratio_floor: 1 << 20,
    };
    let Ok(root) = extract_archive_with(&archive, &dest, limits) else {
        return;
    };
    assert!(
        root.starts_with(&dest),
        "{} is outside {}",
        root.display(),
        dest.display()
    );
    let (mut entries, mut bytes_out) = (0u64, 0u64);
    walk(&dest, &mut |path, meta| {
        assert!(
            !meta.file_type().is_symlink(),
            "a link was unpacked: {}",
            path.display()
        );
        entries += 1;
        bytes_out += meta.len();
    });
    assert!(entries <= 1000 + 1, "{entries} entries");
    assert!(bytes_out <= 8 << 20, "{bytes_out} bytes unpacked");
}

fn walk(dir: &Path, f: &mut dyn FnMut(&Path, &std::fs::Metadata)) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        f(&path, &meta);
        if meta.is_dir() {
            walk(&path, f);
        }
    }
}

/// YOLO label parsing: any text gives boxes of known classes, positive
/// sizes and coordinates in the image, or an error naming the line.
pub fn yolo_labels(data: &[u8]) {
    let Some((&classes, text)) = data.split_first() else {
        return;
    };
    let classes = usize::from(classes % 80) + 1;
    let text = String::from_utf8_lossy(text);
    match parse_labels(&text, classes, "fuzz.txt") {
        Ok(boxes) => {
            for b in boxes {
                assert!(b.class < classes);
                assert!(b.w > 0.0 && b.h > 0.0, "{b:?}");
                for v in [b.cx, b.cy, b.w, b.h] {
                    assert!(v.is_finite() && (-0.01..=1.01).contains(&v), "{b:?}");
                }
            }
        }
        Err(e) => assert!(e.to_string().contains("fuzz.txt"), "{e}"),
    }
}

/// Callbacks: any body is parsed, validated and planned against a running
/// job without a panic, and a plan keeps progress within 0..=1 and the
/// status table; any headers fail verification (nobody can sign without
/// the secret) without a panic.
pub fn callback(data: &[u8]) {
    let secret = CallbackSecret::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
    // Headers from the first three lines, the body after them.
    let mut parts = data.splitn(4, |b| *b == b'\n');
    let (id, timestamp, signature) = (parts.next(), parts.next(), parts.next());
    let body = parts.next().unwrap_or(data);
    let mut headers = http::HeaderMap::new();
    for (name, value) in [
        ("webhook-id", id),
        ("webhook-timestamp", timestamp),
        ("webhook-signature", signature),
    ] {
        if let Some(value) = value.and_then(|v| http::HeaderValue::from_bytes(v).ok()) {
            headers.insert(name, value);
        }
    }
    assert!(secret.verify(&headers, body, 1_800_000_000).is_err());

    let Ok(update) = serde_json::from_slice::<TrainingReport>(body) else {
        return;
    };
    let mut job = NewJob {
        user_id: "fuzz".into(),
        model_name: "small_cnn".into(),
        framework: "tch".into(),
        dataset_s3_uri: "s3://b/d".into(),
        config: serde_json::json!({}),
        priority: 0,
    }
    .into_job()
    .unwrap();
    job.transition(JobStatus::Queued).unwrap();
    job.transition(JobStatus::Running).unwrap();
    if let Ok(ReportPlan::Apply { job: next, .. }) = plan_report(&job, &update) {
        assert!((0.0..=1.0).contains(&next.progress));
        assert!(next.status == job.status || job.status.can_transition_to(next.status));
        assert!(next.attempt >= job.attempt);
    }
}
