//! Replays every fuzz input kept in the repository through its target's
//! checks (`fuzz/harness.rs`): the seeds, the corpus libFuzzer grew
//! (`scripts/fuzz.sh`), and the inputs that once crashed a target
//! (`fuzz/regressions/`). A panic here is a regression.

#[path = "../../../fuzz/harness.rs"]
mod harness;

use std::path::PathBuf;

/// Every file under `fuzz/{seeds,corpus,regressions}/<target>/`.
fn inputs(target: &str) -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz");
    let mut files = Vec::new();
    for kind in ["seeds", "corpus", "regressions"] {
        let Ok(dir) = std::fs::read_dir(root.join(kind).join(target)) else {
            continue;
        };
        files.extend(dir.map(|e| e.unwrap().path()).filter(|p| p.is_file()));
    }
    files.sort();
    assert!(!files.is_empty(), "no inputs kept for {target}");
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    for path in inputs(target) {
        let data = std::fs::read(&path).unwrap();
        let result = std::panic::catch_unwind(|| check(&data));
        assert!(result.is_ok(), "{} fails {target}", path.display());
    }
}

#[test]
fn archive_inputs() {
    replay("archive", harness::archive);
}

#[test]
fn yolo_label_inputs() {
    replay("yolo_labels", harness::yolo_labels);
}

#[test]
fn callback_inputs() {
    replay("callback", harness::callback);
}
