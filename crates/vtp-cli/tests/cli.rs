//! The `vtp` binary's own behaviour, without a backend: completions, a
//! usage error, and one clear line with a non-zero exit when the backend
//! cannot be reached or refuses. The commands against a live backend are
//! tested with the backend (`tests/security.rs`, `tests/tls_e2e.rs`,
//! `tests/detect_e2e.rs`).

use std::process::Command;

fn vtp(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vtp"))
        .args(args)
        .env_remove("VTP_URL")
        .env_remove("VTP_TOKEN")
        .env_remove("VTP_CA_CERT")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn completions_are_printed_for_every_shell() {
    for shell in ["bash", "zsh", "fish"] {
        let (code, out, err) = vtp(&["completions", shell]);
        assert_eq!(code, 0, "{err}");
        for command in [
            "upload", "create", "start", "watch", "metrics", "download", "cancel",
        ] {
            assert!(out.contains(command), "{shell} completions lack {command}");
        }
    }
}

#[test]
fn an_unreachable_backend_is_one_line_and_a_failure() {
    // Port 9 (discard) on loopback: nothing listens.
    let (code, out, err) = vtp(&[
        "--url",
        "http://127.0.0.1:9",
        "get",
        "0192d6a4-7c1e-7b3a-9f00-000000000001",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(out.is_empty(), "{out}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("error: ") && err.contains("unavailable"),
        "{err}"
    );
}

#[test]
fn bad_arguments_are_refused_before_any_request() {
    let (code, _, err) = vtp(&["get", "not-a-uuid"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not-a-uuid"), "{err}");
    let (code, _, err) = vtp(&[
        "--url",
        "http://127.0.0.1:9",
        "create",
        "--dataset",
        "s3://b/d",
        "--config",
        "[1]",
    ]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--config"), "{err}");
    let (code, _, err) = vtp(&["--url", "ftp://x", "list"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("http"), "{err}");
}
