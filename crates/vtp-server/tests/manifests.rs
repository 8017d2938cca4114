//! Every manifest under `deploy/` parses into k8s-openapi types with no
//! unknown field (a typo fails here, not in a cluster), and each overlay
//! renders, by a small kustomize (resources, generators, images, namespace,
//! strategic-merge patches), into the objects the platform needs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde_json::{Value, json};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|doc| {
            let value: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            value
        })
        .filter(|v| !v.is_null())
        .collect()
}

/// Keys of `original` that did not survive a round trip through the typed
/// struct: fields k8s-openapi does not know.
fn unknown_keys(original: &Value, typed: &Value, at: &str, out: &mut Vec<String>) {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (key, value) in a {
                match b.get(key) {
                    Some(other) => unknown_keys(value, other, &format!("{at}.{key}"), out),
                    None => out.push(format!("{at}.{key}")),
                }
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                unknown_keys(x, y, &format!("{at}[{i}]"), out);
            }
        }
        _ => {}
    }
}

fn check_typed<T: DeserializeOwned + serde::Serialize>(object: &Value, origin: &str) {
    let typed: T = serde_json::from_value(object.clone())
        .unwrap_or_else(|e| panic!("{origin}: not a valid {}: {e}", object["kind"]));
    let back = serde_json::to_value(&typed).unwrap();
    let mut unknown = Vec::new();
    unknown_keys(object, &back, "", &mut unknown);
    assert!(unknown.is_empty(), "{origin}: unknown fields {unknown:?}");
}

/// Parses `object` into its k8s-openapi type.
fn validate(object: &Value, origin: &str) {
    use k8s_openapi::api::{apps, batch, core, networking, policy, rbac};
    match object["kind"].as_str().unwrap_or_default() {
        "Deployment" => check_typed::<apps::v1::Deployment>(object, origin),
        "Service" => check_typed::<core::v1::Service>(object, origin),
        "ServiceAccount" => check_typed::<core::v1::ServiceAccount>(object, origin),
        "ConfigMap" => check_typed::<core::v1::ConfigMap>(object, origin),
        "Secret" => check_typed::<core::v1::Secret>(object, origin),
        "Namespace" => check_typed::<core::v1::Namespace>(object, origin),
        "Job" => check_typed::<batch::v1::Job>(object, origin),
        "Role" => check_typed::<rbac::v1::Role>(object, origin),
        "RoleBinding" => check_typed::<rbac::v1::RoleBinding>(object, origin),
        "NetworkPolicy" => check_typed::<networking::v1::NetworkPolicy>(object, origin),
        "PodDisruptionBudget" => check_typed::<policy::v1::PodDisruptionBudget>(object, origin),
        other => panic!("{origin}: no check for kind {other:?}"),
    }
}

/// Strategic merge, as far as these manifests need: maps merge, lists of
/// named objects merge by name, anything else is replaced.
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (key, value) in p {
                merge(b.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (Value::Array(b), Value::Array(p)) if p.iter().all(|v| v["name"].is_string()) => {
            for item in p {
                match b.iter_mut().find(|x| x["name"] == item["name"]) {
                    Some(existing) => merge(existing, item),
                    None => b.push(item.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// A generator's data: its `literals` (`KEY=value`) and its `files` (the
/// file's name as the key, its text as the value), relative to `dir`.
fn generated(dir: &Path, generator: &Value) -> serde_json::Map<String, Value> {
    let mut data: serde_json::Map<String, Value> = generator["literals"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|l| {
            let (k, v) = l.as_str().unwrap().split_once('=').unwrap();
            (k.to_owned(), Value::String(v.to_owned()))
        })
        .collect();
    for file in generator["files"].as_array().into_iter().flatten() {
        let file = file.as_str().unwrap();
        let text = std::fs::read_to_string(dir.join(file))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()));
        data.insert(file.to_owned(), Value::String(text));
    }
    data
}

const KUSTOMIZATION_KEYS: [&str; 10] = [
    "apiVersion",
    "kind",
    "namespace",
    "labels",
    "resources",
    "images",
    "configMapGenerator",
    "secretGenerator",
    "generatorOptions",
    "patches",
];

/// Renders the kustomization in `dir`.
fn build(dir: &Path) -> Vec<Value> {
    let file = dir.join("kustomization.yaml");
    let k = yaml_docs(&file).remove(0);
    for key in k.as_object().unwrap().keys() {
        assert!(
            KUSTOMIZATION_KEYS.contains(&key.as_str()),
            "{}: unexpected key {key}",
            file.display()
        );
    }
    let mut objects = Vec::new();
    for resource in k["resources"].as_array().into_iter().flatten() {
        let path = dir.join(resource.as_str().unwrap());
        if path.is_dir() {
            objects.extend(build(&path));
        } else {
            for doc in yaml_docs(&path) {
                validate(&doc, &path.display().to_string());
                objects.push(doc);
            }
        }
    }
    for generator in k["configMapGenerator"].as_array().into_iter().flatten() {
        let name = generator["name"].as_str().unwrap();
        let data = generated(dir, generator);
        match objects.iter_mut().find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == name) {
            Some(existing) if generator["behavior"] == "merge" => {
                merge(&mut existing["data"], &Value::Object(data));
            }
            Some(_) => panic!("{}: ConfigMap {name} generated twice", file.display()),
            None => objects.push(json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": name, "labels": generator["options"]["labels"].as_object().cloned().unwrap_or_default()},
                "data": data})),
        }
    }
    for generator in k["secretGenerator"].as_array().into_iter().flatten() {
        let name = generator["name"].as_str().unwrap();
        objects.push(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "stringData": generated(dir, generator)}));
    }
    for patch in k["patches"].as_array().into_iter().flatten() {
        let path = dir.join(patch["path"].as_str().unwrap());
        for doc in yaml_docs(&path) {
            let target = objects
                .iter_mut()
                .find(|o| {
                    o["kind"] == doc["kind"] && o["metadata"]["name"] == doc["metadata"]["name"]
                })
                .unwrap_or_else(|| panic!("{}: patches nothing", path.display()));
            merge(target, &doc);
        }
    }
    for image in k["images"].as_array().into_iter().flatten() {
        for object in objects.iter_mut().filter(|o| o["kind"] == "Deployment") {
            for container in object["spec"]["template"]["spec"]["containers"]
                .as_array_mut()
                .unwrap()
            {
                let current = container["image"].as_str().unwrap().to_owned();
                let (name, tag) = current.split_once(':').unwrap_or((&current, "latest"));
                if name == image["name"] {
                    let name = image["newName"].as_str().unwrap_or(name);
                    let tag = image["newTag"].as_str().unwrap_or(tag);
                    container["image"] = json!(format!("{name}:{tag}"));
                }
            }
        }
    }
    if let Some(namespace) = k["namespace"].as_str() {
        for object in &mut objects {
            if object["kind"] != "Namespace" {
                object["metadata"]["namespace"] = json!(namespace);
            }
        }
    }
    for object in &objects {
        validate(object, &format!("{} (rendered)", file.display()));
    }
    objects
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

/// What every overlay must hold: the backend wired to its config and
/// secrets, tokens required, the launcher's RBAC limited to Jobs, pods and
/// the per-job callback Secrets.
fn check_platform(objects: &[Value]) -> (Value, serde_json::Map<String, Value>) {
    let backend = find(objects, "Deployment", "vtp-backend").clone();
    let pod = &backend["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "vtp-backend");
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    let container = &pod["containers"][0];
    assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/health");
    for source in container["envFrom"].as_array().unwrap() {
        let (kind, name) = if source["configMapRef"].is_object() {
            ("ConfigMap", &source["configMapRef"]["name"])
        } else {
            ("Secret", &source["secretRef"]["name"])
        };
        let name = name.as_str().unwrap();
        if kind == "ConfigMap" {
            find(objects, kind, name);
        }
    }
    let config = find(objects, "ConfigMap", "vtp-backend")["data"]
        .as_object()
        .unwrap()
        .clone();
    assert_eq!(config["VTP_LAUNCHER"], "kubernetes");
    assert_eq!(config["VTP_K8S_S3_SECRET"], "vtp-s3");
    assert_eq!(
        config["VTP_AUTH"], "tokens",
        "every deployment authenticates"
    );
    find(
        objects,
        "ServiceAccount",
        config["VTP_K8S_SERVICE_ACCOUNT"].as_str().unwrap(),
    );

    let role = find(objects, "Role", "vtp-launcher");
    let resources: BTreeSet<&str> = role["rules"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|r| {
            r["resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap())
        })
        .collect();
    assert_eq!(
        resources,
        BTreeSet::from(["jobs", "pods", "secrets", "services", "networkpolicies"])
    );
    let binding = find(objects, "RoleBinding", "vtp-launcher");
    assert_eq!(binding["subjects"][0]["name"], "vtp-backend");
    find(objects, "Service", "vtp-backend");
    // Trainer pods reach the backend, DNS and (each overlay's) S3 store,
    // nothing else; nothing reaches them.
    let trainers = find(objects, "NetworkPolicy", "vtp-trainers");
    assert_eq!(
        trainers["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "vtp-trainer"
    );
    assert_eq!(
        trainers["spec"]["policyTypes"],
        serde_json::json!(["Ingress", "Egress"])
    );
    assert_eq!(trainers["spec"]["ingress"], serde_json::json!([]));
    let egress = trainers["spec"]["egress"].as_array().unwrap();
    assert_eq!(
        egress[0]["to"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "vtp-backend"
    );
    let s3 = find(objects, "NetworkPolicy", "vtp-trainers-to-s3");
    assert_eq!(s3["spec"]["policyTypes"], serde_json::json!(["Egress"]));
    (backend, config)
}

#[test]
fn the_kind_overlay_renders_a_whole_platform() {
    let objects = build(&deploy().join("overlays/kind"));
    let (backend, config) = check_platform(&objects);
    assert_eq!(
        backend["spec"]["template"]["spec"]["containers"][0]["image"],
        "vtp-backend:dev"
    );
    assert_eq!(config["VTP_K8S_IMAGE"], "vtp-trainer:dev");
    assert_eq!(config["VTP_S3_ENDPOINT"], "http://minio:9000");
    find(&objects, "Namespace", "vtp");
    find(&objects, "Deployment", "postgres");
    find(&objects, "Service", "postgres");
    find(&objects, "Service", "minio");
    find(&objects, "Job", "minio-bucket");
    let database = find(&objects, "Secret", "vtp-database");
    assert!(
        database["stringData"]["VTP_DATABASE_URL"]
            .as_str()
            .unwrap()
            .contains("@postgres:5432/")
    );
    let s3 = find(&objects, "Secret", "vtp-s3");
    assert!(s3["stringData"]["VTP_S3_SECRET_ACCESS_KEY"].is_string());
    // The dashboard and the alert rules ride along (tests/monitoring.rs
    // checks what they query).
    let dashboard = find(&objects, "ConfigMap", "vtp-grafana-dashboard");
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");
    assert!(dashboard["data"]["grafana-dashboard.json"].is_string());
    let alerts = find(&objects, "ConfigMap", "vtp-alerts");
    assert!(alerts["data"]["vtp-alerts.yaml"].is_string());
    for object in objects.iter().filter(|o| o["kind"] != "Namespace") {
        assert_eq!(
            object["metadata"]["namespace"], "vtp",
            "{}",
            object["metadata"]["name"]
        );
    }
}

#[test]
fn the_production_overlay_uses_external_stores_with_probes_resources_and_scraping() {
    let objects = build(&deploy().join("overlays/production"));
    let (backend, config) = check_platform(&objects);
    let template = &backend["spec"]["template"];
    assert_eq!(
        template["metadata"]["annotations"]["prometheus.io/scrape"],
        "true"
    );
    let container = &template["spec"]["containers"][0];
    assert!(container["resources"]["limits"]["memory"].is_string());
    assert_eq!(container["startupProbe"]["httpGet"]["path"], "/health");
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"], "/health",
        "the patch keeps the base's probes"
    );
    assert!(
        container["image"]
            .as_str()
            .unwrap()
            .starts_with("registry.example.com/")
    );
    assert!(
        config["VTP_BLOB_URL"]
            .as_str()
            .unwrap()
            .starts_with("s3://")
    );
    assert!(
        objects.iter().all(|o| o["kind"] != "Secret"),
        "production credentials come from outside the repository"
    );
    // Two backends, one of which leads; a drain leaves one serving.
    assert_eq!(backend["spec"]["replicas"], 2);
    assert_eq!(
        backend["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"],
        0
    );
    let budget = find(&objects, "PodDisruptionBudget", "vtp-backend");
    assert_eq!(budget["spec"]["minAvailable"], 1);
    assert_eq!(
        budget["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"],
        "vtp-backend"
    );
    // Trainers reach the external S3 over HTTPS, no private address.
    let s3 = find(&objects, "NetworkPolicy", "vtp-trainers-to-s3");
    let block = &s3["spec"]["egress"][0]["to"][0]["ipBlock"];
    let except: Vec<&str> = block["except"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for private in [
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
    ] {
        assert!(except.contains(&private), "{except:?}");
    }
    assert_eq!(config["VTP_RETENTION_DAYS"], "90");
}

#[test]
fn every_yaml_file_in_deploy_parses_with_no_unknown_field() {
    let mut stack = vec![deploy()];
    let mut files = 0;
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                files += 1;
                let docs = yaml_docs(&path);
                assert!(!docs.is_empty(), "{} is empty", path.display());
                if path.file_name().unwrap() != "kustomization.yaml"
                    && !path.ends_with("backend-patch.yaml")
                {
                    for doc in &docs {
                        validate(doc, &path.display().to_string());
                    }
                }
            }
        }
    }
    assert!(files >= 10, "found {files} manifests");
}

#[test]
fn images_are_multi_stage_and_run_as_non_root() {
    for name in ["backend.Dockerfile", "trainer.Dockerfile"] {
        let path = deploy().join("docker").join(name);
        let text = std::fs::read_to_string(&path).unwrap();
        let stages = text.lines().filter(|l| l.starts_with("FROM ")).count();
        assert!(stages >= 2, "{name}: multi-stage");
        let last_stage = text.rsplit("\nFROM ").next().unwrap();
        let user = last_stage
            .lines()
            .find_map(|l| l.strip_prefix("USER "))
            .unwrap_or_else(|| panic!("{name}: the final stage sets USER"));
        let uid: u32 = user.split(':').next().unwrap().trim().parse().unwrap();
        assert_ne!(uid, 0, "{name}: non-root");
        assert!(last_stage.contains("ENTRYPOINT"), "{name}");
    }
}
