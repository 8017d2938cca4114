//! libFuzzer target: [`harness::yolo_labels`].
#![no_main]

#[path = "../harness.rs"]
mod harness;

libfuzzer_sys::fuzz_target!(|data: &[u8]| harness::yolo_labels(data));
