//! `deploy/kubernetes/`: every manifest parses, and the pieces agree with each other and with the
//! binary: the container's arguments are accepted by `loraplex serve`, its port is the Service's
//! target and the InferencePool's target port, the selectors match the pod labels, the probes
//! and the metrics annotation name routes the server has, and the HTTPRoute points at the pool.

use serde::Deserialize;
use serde_yaml::Value;
use std::path::PathBuf;

fn manifests() -> Vec<Value> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes");
    let mut docs = Vec::new();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v = Value::deserialize(doc).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            assert!(v["kind"].is_string(), "{}: no kind", f.display());
            docs.push(v);
        }
    }
    docs
}

fn find<'a>(docs: &'a [Value], kind: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"))
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// Every `key: value` of `selector` is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_mapping().expect("selector labels");
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn kubernetes_manifests_agree_with_each_other_and_the_binary() {
    let docs = manifests();
    let deploy = find(&docs, "Deployment");
    let service = find(&docs, "Service");
    let pool = find(&docs, "InferencePool");
    let route = find(&docs, "HTTPRoute");
    assert_eq!(pool["apiVersion"], "inference.networking.k8s.io/v1");

    let pod = &deploy["spec"]["template"];
    let labels = &pod["metadata"]["labels"];
    assert!(selects(&deploy["spec"]["selector"]["matchLabels"], labels));
    assert!(selects(&service["spec"]["selector"], labels));
    assert!(selects(&pool["spec"]["selector"]["matchLabels"], labels));

    let c = &pod["spec"]["containers"][0];
    let args: Vec<&str> = c["args"].as_sequence().unwrap().iter().map(s).collect();
    // The arguments are a valid `loraplex serve` command line, on the port the pod exposes.
    let m = loraplex::cli::Cli::command_with_defaults()
        .try_get_matches_from(std::iter::once("loraplex").chain(args.iter().copied()))
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    let serve = m.subcommand_matches("serve").expect("serve");
    let port: u16 = serve.get_one::<u16>("port").copied().expect("--port");
    assert_eq!(
        serve.get_one::<String>("host").map(String::as_str),
        Some("0.0.0.0")
    );
    let http = c["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "http")
        .expect("a port named http");
    assert_eq!(http["containerPort"].as_u64(), Some(port as u64));
    assert_eq!(
        pool["spec"]["targetPorts"][0]["number"].as_u64(),
        Some(port as u64)
    );
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "http");
    // The config file it names is the shipped one (the image copies configs/).
    let cfg = serve.get_one::<PathBuf>("config").expect("--config");
    let shipped = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("configs")
        .join(cfg.file_name().unwrap());
    loraplex::server::ServeConfig::from_file(&shipped).unwrap();
    assert!(cfg.starts_with("/opt/loraplex/configs"));

    // Probes and metrics on routes the server has.
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(c[probe]["httpGet"]["path"], "/health", "{probe}");
    }
    let ann = &pod["metadata"]["annotations"];
    assert_eq!(ann["prometheus.io/path"], "/metrics");
    assert_eq!(ann["prometheus.io/port"], port.to_string().as_str());

    // The adapters volume is mounted where --adapters-dir points.
    let dir = serve
        .get_one::<PathBuf>("adapters_dir")
        .expect("--adapters-dir");
    let mounts = c["volumeMounts"].as_sequence().unwrap();
    assert!(mounts
        .iter()
        .any(|m| m["mountPath"] == dir.to_str().unwrap()));

    // The route sends /v1 to the pool.
    let backend = &route["spec"]["rules"][0]["backendRefs"][0];
    assert_eq!(backend["kind"], "InferencePool");
    assert_eq!(backend["group"], "inference.networking.k8s.io");
    assert_eq!(backend["name"], pool["metadata"]["name"]);
    assert!(pool["spec"]["endpointPickerRef"]["name"].is_string());
}
