//! libFuzzer target: [`harness::yolo_labels`].
#![no_main]

// Each target drives one of the harness's checks.
#[allow(dead_code)]
#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::yolo_labels(data));
