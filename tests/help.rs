//! `--help` documents every setting the README names: each `VTP_*`
//! variable in README.md is the `env` of an argument of `vtp-backend`,
//! `vtp-trainer-service` or `vtp` (or one of the few that only the scripts
//! and the test suite read, listed below).

mod support;

use std::collections::BTreeSet;

/// Variables the README names that no binary reads: the test suite's and
/// the scripts'.
const NOT_SETTINGS: [&str; 4] = [
    "VTP_REQUIRE_SERVICES",
    "VTP_UPDATE_OPENAPI",
    "VTP_PYTHON",
    "VTP_CACHE",
];

fn readme_variables() -> BTreeSet<String> {
    let readme = include_str!("../README.md");
    let mut names = BTreeSet::new();
    for (at, _) in readme.match_indices("VTP_") {
        let name: String = readme[at..]
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        // `VTP_S3_*` and the like name a family, not a variable.
        if name.ends_with('_') || name.starts_with("VTP_TEST_") {
            continue;
        }
        if !NOT_SETTINGS.contains(&name.as_str()) {
            names.insert(name);
        }
    }
    names
}

/// Whether `help` names `name` as an argument's variable (`[env: NAME=]`,
/// or `[env: NAME]` for a secret), or, for the few settings that are not
/// arguments (`VTP_LOG`, `VTP_LOG_FORMAT`), in its text.
fn documents(help: &str, name: &str) -> bool {
    help.contains(&format!("env: {name}="))
        || help.contains(&format!("env: {name}]"))
        || help.contains(&format!("{name} "))
        || help.contains(&format!("{name}="))
}

fn help(program: &str, args: &[&str]) -> String {
    let (ok, stdout, stderr) = support::run_binary(program, &[], args);
    assert!(ok, "{program} --help failed: {stderr}");
    stdout
}

#[test]
fn every_variable_the_readme_names_is_in_a_binarys_help() {
    let backend = env!("CARGO_BIN_EXE_vtp-backend");
    let helps = [
        help(backend, &["--help"]),
        help(&support::trainer_bin(), &["--help"]),
        help(&support::trainer_bin(), &["run-job", "--help"]),
        help(&support::vtp_cli(), &["--help"]),
    ]
    .join("\n");
    let variables = readme_variables();
    assert!(variables.len() > 20, "{variables:?}");
    let missing: Vec<&String> = variables
        .iter()
        .filter(|name| !documents(&helps, name))
        .collect();
    assert!(
        missing.is_empty(),
        "not in any --help: {missing:?}\n{helps}"
    );
    // Every S3 and Kubernetes setting is an argument of the backend.
    let backend_help = help(backend, &["--help"]);
    for name in [
        "VTP_S3_ENDPOINT",
        "VTP_S3_REGION",
        "VTP_S3_ACCESS_KEY_ID",
        "VTP_S3_SECRET_ACCESS_KEY",
        "VTP_S3_ALLOW_HTTP",
        "VTP_S3_VIRTUAL_HOSTED_STYLE",
        "VTP_K8S_NAMESPACE",
        "VTP_K8S_IMAGE",
        "VTP_K8S_S3_SECRET",
        "VTP_K8S_MAX_GPU",
    ] {
        assert!(
            documents(&backend_help, name),
            "{name} is not an argument of vtp-backend"
        );
    }
}
