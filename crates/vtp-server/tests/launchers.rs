//! What the subprocess launcher hands its child: an allow-listed
//! environment (never the backend's database URL or other settings) and a
//! fresh shared token, in the environment rather than on the command line.

use std::os::unix::fs::PermissionsExt;

use vtp_core::{JobStoreExt, NewJob, StartTraining, TrainerLauncher};
use vtp_launch::SubprocessLauncher;
use vtp_storage::Stores;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_child_trainer_gets_an_allow_listed_environment_and_a_token() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("fake-trainer");
    // Records its environment and arguments, then claims to listen on a
    // port where nothing answers (the launch itself then fails, as it should).
    std::fs::write(
        &script,
        "#!/bin/sh\nenv > \"$VTP_WORK_DIR/env\"\necho \"$@\" > \"$VTP_WORK_DIR/args\"\n\
         echo 'vtp-trainer-service listening on http://127.0.0.1:9'\nsleep 30\n",
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let stores = Stores::memory();
    let launcher = SubprocessLauncher::new(&script, stores.jobs.clone())
        .with_env("VTP_WORK_DIR", dir.path().display().to_string());
    let job = stores
        .jobs
        .create_job(NewJob {
            user_id: "u".into(),
            model_name: "small_cnn".into(),
            framework: "tch".into(),
            dataset_s3_uri: "s3://b/users/u/datasets/d/".into(),
            config: serde_json::json!({}),
            priority: 0,
        })
        .await
        .unwrap();
    let request = StartTraining::for_job(&job, "http://127.0.0.1:8000/cb".into());
    assert!(
        launcher.launch(&request).await.is_err(),
        "nothing answers on port 9"
    );

    let env = std::fs::read_to_string(dir.path().join("env")).unwrap();
    let child: Vec<(&str, &str)> = env.lines().filter_map(|l| l.split_once('=')).collect();
    let has = |name: &str| child.iter().any(|(k, _)| *k == name);
    assert!(has("PATH") && has("VTP_WORK_DIR"), "{env}");
    let token = child
        .iter()
        .find(|(k, _)| *k == "VTP_TRAINER_TOKEN")
        .map(|(_, v)| *v)
        .expect("the child gets the shared token");
    assert!(token.starts_with("vtp_") && token.len() > 60, "{token}");
    let args = std::fs::read_to_string(dir.path().join("args")).unwrap();
    assert!(
        !args.contains(token),
        "the token is not on the command line: {args}"
    );
    // What cargo and the test command set here (CARGO_*, VTP_TEST_*, ...)
    // is not passed on.
    for (name, _) in std::env::vars() {
        let allowed = SubprocessLauncher::INHERITED_ENV
            .iter()
            .any(|p| name == *p || (p.ends_with('_') && name.starts_with(p)));
        // The shell that runs the fake trainer sets these itself.
        let by_the_shell = matches!(name.as_str(), "PWD" | "OLDPWD" | "SHLVL" | "_");
        if !allowed && !by_the_shell {
            assert!(!has(&name), "{name} leaked into the child's environment");
        }
    }
    assert!(std::env::var("CARGO_MANIFEST_DIR").is_ok() && !has("CARGO_MANIFEST_DIR"));
}
